"""The FAISS index build as a Beam job, for databases whose adds are too slow for one machine.

1. On the launching machine: choose the factory, train the empty index on a seeded sample drawn across the
   feature shards (index/build.py), and save it (OUT/trained.faiss, and a copy in the staging folder the
   workers read).
2. On the workers: one element per feature shard. Each worker process loads the trained index once
   (``apache_beam.utils.shared.Shared``), reads its shard's vectors, adds them with their global ids (the shard's
   first row in the database, counted up front from the Parquet footers) and writes the filled copy to the
   staging folder.
3. On the launching machine: the filled shards are merged in id order (in memory, or with the inverted lists in
   one on-disk file for IVF indices above the memory budget), the id table is read from the features' id and
   landmark_id columns, and the folder is saved as `cairn index` saves it.

The staging folder is OUT/shards on DirectRunner; a cluster's workers cannot write to the launching machine, so
there it is a folder under the pipeline's --temp_location. Index kinds whose filled copies cannot be merged
(HNSW graphs, fast-scan IVF lists) are refused; the auto factory takes the plain IVF-PQ choice instead of the
fast-scan one for a Beam build.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid

import apache_beam as beam
import faiss
import numpy as np
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import GoogleCloudOptions
from apache_beam.utils import shared

from index import build as B
from index.faiss_index import VectorIndex, _write_index, empty_index, invalidate, train_on_sample
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.options import LOCAL_RUNNERS, runner_name
from pipeline.parquet_io import read_file
from pipeline.resources import limit_threads
from pipeline.schemas import labels_of, vectors_of
from pipeline.stages import beamjob

log = logging.getLogger(__name__)


class _Trained:
    """A weak-referenceable holder of the trained, empty index (what Shared keeps per worker process)."""

    def __init__(self, index):
        self.index = index


class AddShard(beam.DoFn):
    """(shard number, features path, first global id, rows) -> the filled copy of the trained index, written to
    the staging folder; yields (shard number, rows added, path)."""

    def __init__(self, trained_path: str, staging: str, shards: int, handle: shared.Shared, threads: int = 0,
                 use_gpu: bool = False, gpu_float16: bool = True):
        self.trained_path = trained_path
        self.staging = staging
        self.shards = shards
        self.handle = handle
        self.threads = threads
        self.use_gpu = use_gpu
        self.gpu_float16 = gpu_float16
        self.trained = None

    def setup(self):
        if self.threads:
            limit_threads(self.threads)
        path = self.trained_path

        def load():
            return _Trained(faiss.deserialize_index(np.frombuffer(fs.read_bytes(path), dtype=np.uint8)))

        self.trained = self.handle.acquire(load)

    def process(self, element):
        number, path, first_id, rows = element
        if self.threads:
            faiss.omp_set_num_threads(self.threads)
        with fs.FileSystems.open(path) as f:
            xb = vectors_of(read_file(f, columns=["vector"]))
        if len(xb) != rows:
            raise CairnError(f"{path} holds {len(xb)} vectors where {rows} were counted; the features changed "
                             "during the build, rerun it")
        ids = np.arange(first_id, first_id + rows, dtype=np.int64)
        filled = B.add_shard(self.trained.index, xb, ids, self.use_gpu, self.gpu_float16)
        target = shard_path(self.staging, number, self.shards)
        fs.write_bytes(target, faiss.serialize_index(filled).tobytes())
        yield number, rows, target


def shard_path(staging: str, number: int, shards: int) -> str:
    return fs.join(staging, f"shard-{number:05d}-of-{shards:05d}.faiss")


def staging_folder(out: str, options) -> str:
    """Where the workers read the trained index and write their filled shards: OUT/shards on DirectRunner, a
    new folder under --temp_location with a cluster runner (the launching machine's disk is not theirs)."""
    if runner_name(options) in LOCAL_RUNNERS:
        return os.path.join(out, "shards")
    temp = options.view_as(GoogleCloudOptions).temp_location
    if not temp:
        raise CairnError(f"--runner={runner_name(options)}: the index build's workers write their shards under "
                         "--temp_location; give one on a filesystem they share (gs://, s3://, hdfs://)")
    return fs.join(temp, f"cairn-index-{uuid.uuid4().hex[:12]}")


def build_on_workers(paths: list[str], counts: list[int], parts: list, dim: int, config, meta: dict, out: str,
                     beam_args: list[str] | None = None, workers: int = 0, test_pipeline=None, progress: bool = False,
                     threads: int = 0, sample: tuple[list, list[int]] | None = None):
    """Build the index of the feature shards ``paths`` (rows ``counts``, loaders ``parts``) with the adds on
    Beam workers; returns the VectorIndex (saved by the caller). ``sample``: (parts, counts) to draw the
    training sample from instead (the same rows in another order)."""
    n = int(sum(counts))
    started = time.perf_counter()
    index, factory, search, budget, on_disk = empty_index(n, dim, config, mergeable_only=True)
    job = beamjob.start(out, beam_args, workers, threads, images=n, test_pipeline=test_pipeline, dry_run="refuse",
                        dry_run_message="dry run: the options were validated for --runner={runner}; the index "
                        "build's Beam step needs the trained index, so nothing was trained, translated or submitted")
    p, options, workers, threads = job.pipeline, job.options, job.workers, job.threads
    staging = staging_folder(out, options)
    remote = staging != os.path.join(out, "shards")
    invalidate(out)
    try:
        # 1. train here, on a seeded sample across all shards
        size, train_seconds = train_on_sample(index, *(sample or (parts, counts)), dim, config, progress)
        _write_index(index, os.path.join(out, "trained.faiss"))
        if not remote:
            shutil.rmtree(staging, ignore_errors=True)
        fs.makedirs(staging)
        trained_path = fs.join(staging, "trained.faiss")
        fs.copy_file(os.path.join(out, "trained.faiss"), trained_path)

        # 2. add shard by shard on the workers
        firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        elements = [(i, path, first, count) for i, (path, first, count)
                    in enumerate(zip(paths, firsts, counts, strict=True)) if count]
        log.info("index: %s over %d vectors of dim %d; adding %d shards on %s (%d worker%s)", factory, n, dim,
                 len(elements), job.runner, workers, "s"[: workers > 1])
        t0 = time.perf_counter()
        _ = (p | "Shards" >> beam.Create(elements) | "Spread" >> beam.Reshuffle()
             | "AddShard" >> beam.ParDo(AddShard(trained_path, staging, len(paths), shared.Shared(), threads,
                                                 config.use_gpu, config.gpu_float16)))
        job.run()
        add_seconds = time.perf_counter() - t0

        # 3. merge in id order, here, one shard in memory at a time (copied from the staging folder first)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="cairn-shards-", dir=out) as local_dir:
            merged = _merge(elements, staging, len(paths), local_dir, index, on_disk, out)
        if merged.ntotal != n:
            raise CairnError(f"the merged index holds {merged.ntotal} vectors where {n} were added; rerun the build")
        merge_seconds = time.perf_counter() - t0
    finally:
        if remote:
            fs.delete(fs.glob(fs.join(fs.escape(staging), "*")))
        shutil.rmtree(os.path.join(out, "shards"), ignore_errors=True)
    info = {"train_size": int(size), "train_seconds": round(train_seconds, 3), "add_seconds": round(add_seconds, 3),
            "merge_seconds": round(merge_seconds, 3), "shards": len(elements), "on_disk": on_disk,
            "memory_budget": int(budget), "beam": True, "runner": job.runner, "workers": workers}
    log.info("index: %s over %d vectors (train %.1f s on %d, adds on workers %.1f s, merge %.1f s)", factory, n,
             train_seconds, size, add_seconds, merge_seconds)
    return _finish(merged, paths, firsts, config, meta, factory, search, info, started)


def _merge(elements: list, staging: str, shards: int, local_dir: str, trained, on_disk: bool, out: str):
    """The filled shards merged in id order: in memory, or into OUT/index.ivfdata on disk."""
    merged, on_disk_paths = None, []
    for number, _, first, count in elements:
        source = shard_path(staging, number, shards)
        local = os.path.join(local_dir, os.path.basename(source))
        fs.copy_file(source, local)
        shard = faiss.read_index(local, faiss.IO_FLAG_MMAP) if on_disk else faiss.read_index(local)
        if shard.ntotal != count:
            raise CairnError(f"shard {number} holds {shard.ntotal} vectors where {count} were added; rerun the build")
        if on_disk:
            on_disk_paths.append(local)
        elif merged is None:
            merged = shard
        else:
            B.merge_into(merged, shard, src_first_id=first)
        del shard
        if not on_disk:
            os.remove(local)
    if on_disk:
        merged = B.merge_on_disk(trained, on_disk_paths, os.path.join(out, "index.ivfdata"))
    if merged is None:
        raise CairnError("no vectors were added; check the features folder")
    return merged


def _finish(merged, paths: list[str], firsts: list[int], config, meta: dict, factory: str, search: str, info: dict,
            started: float):
    """The VectorIndex of the merged index: the id table and the non-landmark side index from the features."""
    # the id table, and the non-landmark side index, from the features themselves (vectors only where needed)
    image_ids, labels, nl_vectors, nl_rows = [], [], [], []
    for path, first in zip(paths, firsts, strict=True):
        with fs.FileSystems.open(path) as f:
            shard = pq.ParquetFile(f)  # synchronous reads, as parquet_io.read_file
            table = shard.read(columns=["id", "landmark_id"])
            labs = labels_of(table)
            if config.nonlandmark_index and (labs < 0).any():
                nl_vectors.append(vectors_of(shard.read(columns=["vector"]))[labs < 0])
                nl_rows.append(np.nonzero(labs < 0)[0] + first)
        image_ids.extend(table.column("id").to_pylist())
        labels.append(labs)
    labels = np.concatenate(labels) if labels else np.empty(0, np.int64)
    nonlandmarks = VectorIndex.nonlandmark_index(nl_vectors, nl_rows, image_ids, labels, config, meta)
    info["seconds"] = round(time.perf_counter() - started, 3)
    return VectorIndex(merged, image_ids, labels, config, meta, factory, config.search or search, nonlandmarks, info)
