"""The index build (`cairn index`): a FAISS index over a database features folder (trained on a seeded
sample, filled shard by shard with global ids, merged; on Beam workers with pipeline/stages/index_build.py), or
an inverted file over sparse BoVW vectors. Writes OUT/index.faiss, trained.faiss, ids.parquet, index.json and
nonlandmarks/ (index/faiss_index.py)."""

from __future__ import annotations

import logging
import os
import tempfile
import time

import pyarrow.parquet as pq

from index.faiss_index import IndexConfig, VectorIndex
from index.sparse_index import SparseIndex
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.featuresets import features_kind
from pipeline.options import LOCAL_RUNNERS, pipeline_options, runner_name
from pipeline.parquet_io import find_shards, id_ordered_parts, read_file, read_shards
from pipeline.schemas import cairn_metadata, labels_of, sparse_matrix_of, vectors_of
from pipeline.stages import costs
from pipeline.stages.index_build import build_on_workers

log = logging.getLogger(__name__)


def feature_shards(prefix: str) -> tuple[list[str], list[int], int, dict]:
    """(paths, counts, dim, metadata) of a global-features shard set, checked to agree."""
    paths = find_shards(prefix)
    counts, metas, dims = [], [], set()
    for path in paths:
        with fs.FileSystems.open(path) as f:
            pf = pq.ParquetFile(f)
            counts.append(pf.metadata.num_rows)
            metas.append(cairn_metadata(pf.schema_arrow))
            dims.add(pf.schema_arrow.field("vector").type.list_size)
    if any(m != metas[0] for m in metas[1:]) or len(dims) != 1:
        raise CairnError(f"shards under {prefix} were written with different configurations; rerun the job")
    return paths, counts, int(dims.pop()), metas[0]


def shard_parts(paths: list[str]):
    """Database parts (pipeline.stages.index_build) that load one shard each, in the shard's row order."""
    def load(path):
        def part():
            with fs.FileSystems.open(path) as f:
                return _part(read_file(f))
        return part

    return [load(p) for p in paths]


def _part(table):
    return vectors_of(table), table.column("id").to_pylist(), labels_of(table)


def _parts(tables: list):
    """Database parts from table loaders (parquet_io.id_ordered_parts)."""
    return [lambda table=table: _part(table()) for table in tables]


def build_index(features: str, out: str, config: IndexConfig = IndexConfig(), progress: bool = False,
                beam: str = "off", beam_args: list[str] | None = None, workers: int = 0, test_pipeline=None,
                threads: int = 0) -> dict:
    """Build and save the index; returns {count, dim, seconds, index_bytes, factory}.

    ``beam``: "on" adds the vectors on Beam workers (pipeline/stages/index_build.py), "off" here, "auto" on workers
    when ``beam_args`` name a cluster runner. The record has the stage's cost."""
    kind = features_kind(features)
    if kind == "local":
        raise CairnError(f"{features} holds local features; encode them into one vector per image first "
                         "(`cairn train` + `cairn encode`)")
    if fs.has_scheme(out):  # FAISS writes local files: build in a local folder, then copy it to the filesystem
        with tempfile.TemporaryDirectory(prefix="cairn-index-") as local:
            record = build_index(features, local, config, progress, beam, beam_args, workers, test_pipeline, threads)
            # the old index goes first, its record before anything else, and the new record is copied last
            fs.delete([p for p in (fs.join(out, "index.json"), fs.join(out, "nonlandmarks", "index.json"))
                       if fs.exists(p)])
            fs.delete(fs.glob(fs.join(fs.escape(out), "**")))
            fs.upload_folder(local, out, last=("nonlandmarks/index.json", "index.json"))
        log.info("index: copied to %s (workers load it once per process)", out)
        return record
    if kind == "sparse":
        return _build_sparse(features, out)
    paths, counts, dim, meta = feature_shards(fs.join(features, "features"))
    if _on_workers(beam, beam_args):  # each worker adds whole shards: index ids follow the shards' order
        # the training sample is drawn in image-id order, as the local build draws it: both train alike
        with id_ordered_parts(paths) as (tables, ordered):
            sample = (_parts(tables), ordered)
            index = build_on_workers(paths, counts, shard_parts(paths), dim, config, meta, out, beam_args, workers,
                                     test_pipeline, progress, threads, sample=sample)
    else:  # index ids in image-id order, whatever the number of workers that wrote the shards
        with id_ordered_parts(paths) as (tables, counts):
            index = VectorIndex.build_parts(_parts(tables), counts, dim, config, meta, folder=out, progress=progress)
    index.build_info["source"] = fs.absolute(features)  # the features it was built from (recognition tuning)
    index.save(out)
    size = sum(os.path.getsize(os.path.join(out, n)) for n in ("index.faiss", "index.ivfdata")
               if os.path.exists(os.path.join(out, n)))
    seconds = index.build_info["seconds"]
    log.info("index: %d vectors of dim %d (%s, %s) in %.2f s, %.1f MB", index.ntotal, index.dim, index.factory,
             config.metric, seconds, size / 1e6)
    record = {"count": index.ntotal, "dim": index.dim, "seconds": seconds, "index_bytes": size,
              "factory": index.factory, "search_params": index.search_params,
              "nonlandmarks": 0 if index.nonlandmarks is None else index.nonlandmarks.ntotal}
    return {**record, "cost": index_cost(record, index.build_info)}


def index_cost(record: dict, build: dict | None = None) -> dict:
    """An index build's cost: per database vector; the adds, which a cluster runner puts on Beam workers, as a
    part of their own (``build``: the build's timings, index.json's "build")."""
    extra = {}
    add_seconds = (build or {}).get("add_seconds")
    if add_seconds:
        extra = {"parts": [costs.part("index", "index adds", add_seconds, record["count"], [["images", None]],
                                      key="add", parallel=bool(build.get("beam")), cluster_parallel=True)],
                 "rename": "index training and merge"}
    return costs.cost("index", record["count"], [["images", None]], output_bytes=record["index_bytes"],
                      vectors=record["count"], dim=record["dim"], factory=record["factory"], **extra)


def _on_workers(beam: str, beam_args: list[str] | None) -> bool:
    if beam not in ("auto", "on", "off"):
        raise CairnError(f"--beam {beam!r}: use auto, on or off")
    if beam != "auto":
        return beam == "on"
    return runner_name(pipeline_options(list(beam_args or []))) not in LOCAL_RUNNERS


def _build_sparse(features: str, out: str) -> dict:
    table, meta = read_shards(fs.join(features, "sparse"))
    started = time.perf_counter()
    index = SparseIndex.build(sparse_matrix_of(table, meta["dim"]), table.column("id").to_pylist(), labels_of(table),
                              meta)
    seconds = time.perf_counter() - started
    index.save(out)
    record = cfg.load_json(fs.join(out, "index.json"))
    cfg.save_json(fs.join(out, "index.json"), {**record, "build": {"source": fs.absolute(features)}})
    size = os.path.getsize(os.path.join(out, "postings.npz"))
    log.info("index: inverted file over %d images, %d words, %.1f MB", index.ntotal, index.dim, size / 1e6)
    record = {"count": index.ntotal, "dim": index.dim, "seconds": seconds, "index_bytes": size,
              "factory": "sparse-inverted-file", "search_params": "", "nonlandmarks": 0, "nnz": int(index.postings.nnz)}
    return {**record, "cost": index_cost(record)}
