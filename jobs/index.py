"""cairn index: build a FAISS index over database descriptors written by `cairn extract` or `cairn encode`.

Reads FEATURES/features-*.parquet (dense vectors) one shard at a time: trains the index on a seeded sample,
adds every vector with a global int64 id shard by shard, merges the shards (with the inverted lists on disk
when an IVF index exceeds the memory budget), and writes OUT/index.faiss, OUT/trained.faiss (the trained empty
index), OUT/ids.parquet (faiss_id -> image id, landmark_id), OUT/index.json (factory as built, metric, dim,
count, search parameters, build times, the features' metadata) and OUT/nonlandmarks/ (an index of the database
images without a landmark, for recognition's no-landmark penalty). Sparse bag-of-visual-words features
(FEATURES/sparse-*.parquet) get an inverted file instead (index/sparse_index.py).

Factories (--factory): Flat (exact), IVF4096,Flat, IVF4096,PQ64, OPQ64_256,IVF4096,PQ64, HNSW32,Flat,
IVF4096,PQ128x4fs,Refine(PQ128) ... or auto (default): Flat up to 50,000 vectors, then an IVF with compressed
codes and a re-ranking stage sized to the memory budget; the README's "Indices" section has the measured
trade-offs.
"""

from __future__ import annotations

import logging
import os

from index.faiss_index import IndexConfig, VectorIndex
from jobs import common
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.parquet_io import find_shards, read_file, read_shards
from pipeline.schemas import cairn_metadata, labels_of, vectors_of

log = logging.getLogger(__name__)


def feature_parts(prefix: str):
    """(parts, counts, dim, metadata) of a global-features shard set, each part loading one shard."""
    import pyarrow.parquet as pq

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
    dim = dims.pop()

    def load(path):
        def part():
            with fs.FileSystems.open(path) as f:
                table = read_file(f)
            return vectors_of(table), table.column("id").to_pylist(), labels_of(table)
        return part

    return [load(p) for p in paths], counts, int(dim), metas[0]


def build_index(features: str, out: str, config: IndexConfig = IndexConfig(), progress: bool = False,
                beam: str = "off", beam_args: list[str] | None = None, workers: int = 0, test_pipeline=None,
                threads: int = 0) -> dict:
    """Build and save the index; returns {count, dim, seconds, index_bytes, factory}.

    ``beam``: "on" adds the vectors on Beam workers (pipeline/index_build.py), "off" here, "auto" on workers
    when ``beam_args`` name a cluster runner."""
    from jobs.encode import features_kind

    kind = features_kind(features)
    if kind == "local":
        raise CairnError(f"{features} holds local features; encode them into one vector per image first "
                         "(`cairn train` + `cairn encode`)")
    if fs.has_scheme(out):  # FAISS writes local files: build in a local folder, then copy it to the filesystem
        import tempfile

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
    parts, counts, dim, meta = feature_parts(fs.join(features, "features"))
    if _on_workers(beam, beam_args):
        from pipeline.index_build import build_on_workers

        index = build_on_workers(find_shards(fs.join(features, "features")), counts, parts, dim, config, meta, out,
                                 beam_args, workers, test_pipeline, progress, threads)
    else:
        index = VectorIndex.build_parts(parts, counts, dim, config, meta, folder=out, progress=progress)
    index.build_info["source"] = fs.absolute(features)  # the features it was built from (recognition tuning)
    index.save(out)
    size = sum(os.path.getsize(os.path.join(out, n)) for n in ("index.faiss", "index.ivfdata")
               if os.path.exists(os.path.join(out, n)))
    seconds = index.build_info["seconds"]
    log.info("index: %d vectors of dim %d (%s, %s) in %.2f s, %.1f MB", index.ntotal, index.dim, index.factory,
             config.metric, seconds, size / 1e6)
    return {"count": index.ntotal, "dim": index.dim, "seconds": seconds, "index_bytes": size,
            "factory": index.factory, "search_params": index.search_params,
            "nonlandmarks": 0 if index.nonlandmarks is None else index.nonlandmarks.ntotal}


def _on_workers(beam: str, beam_args: list[str] | None) -> bool:
    if beam not in ("auto", "on", "off"):
        raise CairnError(f"--beam {beam!r}: use auto, on or off")
    if beam != "auto":
        return beam == "on"
    from pipeline.options import LOCAL_RUNNERS, pipeline_options, runner_name

    return runner_name(pipeline_options(list(beam_args or []))) not in LOCAL_RUNNERS


def _build_sparse(features: str, out: str) -> dict:
    import time

    from index.sparse_index import SparseIndex
    from pipeline.schemas import sparse_matrix_of

    table, meta = read_shards(fs.join(features, "sparse"))
    started = time.perf_counter()
    index = SparseIndex.build(sparse_matrix_of(table, meta["dim"]), table.column("id").to_pylist(), labels_of(table),
                              meta)
    seconds = time.perf_counter() - started
    index.save(out)
    from pipeline import config as cfg

    record = cfg.load_json(fs.join(out, "index.json"))
    cfg.save_json(fs.join(out, "index.json"), {**record, "build": {"source": fs.absolute(features)}})
    size = os.path.getsize(os.path.join(out, "postings.npz"))
    log.info("index: inverted file over %d images, %d words, %.1f MB", index.ntotal, index.dim, size / 1e6)
    return {"count": index.ntotal, "dim": index.dim, "seconds": seconds, "index_bytes": size,
            "factory": "sparse-inverted-file", "search_params": "", "nonlandmarks": 0}


def add_index_args(p) -> None:
    """The index-building flags (shared with `cairn compare`)."""
    d = IndexConfig()
    g = p.add_argument_group("index")
    g.add_argument("--factory", default=d.factory,
                   help="FAISS index_factory string (Flat, IVF4096,PQ64, HNSW32,Flat, ...) or auto (default): "
                        "chosen from the vector count, dimension and --memory-budget")
    g.add_argument("--metric", default=d.metric, choices=["ip", "l2"],
                   help="ip: inner product = cosine on the L2-normalised descriptors (default); l2: Euclidean")
    g.add_argument("--search-params", default=d.search,
                   help="default search parameters stored with the index, FAISS syntax: nprobe=64 (IVF), "
                        "efSearch=128 (HNSW), k_factor_rf=16 (Refine); default: the auto choice's")
    g.add_argument("--memory-budget", default="0",
                   help="RAM the index may take, e.g. 4G (default: half of the available RAM); an IVF index "
                        "above it is merged with its inverted lists on disk")
    g.add_argument("--train-size", type=int, default=d.train_size,
                   help="vectors the index trains on (default: 40 per IVF list, at least 65,536)")
    g.add_argument("--shard-size", type=int, default=d.shard_size,
                   help=f"vectors added per shard before merging (default {d.shard_size:,})")
    g.add_argument("--on-disk", default=d.on_disk, choices=["auto", "on", "off"],
                   help="IVF inverted lists in OUT/index.ivfdata, memory-mapped (default auto: above the budget)")
    g.add_argument("--gpu", action="store_true", help="train, add and search on GPUs when FAISS sees some "
                   "(falls back to the CPU, with a log line, without one or for kinds the GPU lacks)")


def index_config(args) -> IndexConfig:
    from index.build import parse_memory

    try:
        return IndexConfig(factory=args.factory.strip(), metric=args.metric, search=args.search_params.strip(),
                           memory_budget=parse_memory(args.memory_budget), train_size=args.train_size,
                           shard_size=args.shard_size, on_disk=args.on_disk, use_gpu=args.gpu)
    except ValueError as e:
        raise CairnError(f"index flags: {e}") from e


def build_parser():
    p = common.parser("cairn index", __doc__, beam=True)
    p.add_argument("--features", required=True, help="folder written by `cairn extract` for the database images")
    p.add_argument("--out", required=True, help="index folder to write (local, or gs:// etc.: built in a local "
                   "temporary folder, then copied)")
    p.add_argument("--beam", default="auto", choices=["auto", "on", "off"],
                   help="add the vectors on Beam workers, one feature shard each, and merge here (on); all here "
                        "(off); auto (default): on workers with a cluster runner (--runner=DataflowRunner ...)")
    add_index_args(p)
    common.add_worker_args(p)
    return p


def run(argv=None, test_pipeline=None) -> dict:
    import sys

    args, beam_args = common.parse_beam_job(build_parser(), argv)
    record = build_index(args.features, args.out, index_config(args), progress=sys.stderr.isatty(), beam=args.beam,
                         beam_args=beam_args, workers=args.workers, test_pipeline=test_pipeline,
                         threads=args.threads_per_worker)
    print(f"index: {record['count']:,} vectors of dim {record['dim']} as {record['factory']} "
          f"({record['index_bytes'] / 1e6:.1f} MB, {record['seconds']:.1f} s) in {args.out}")
    return record
