"""cairn index: build a FAISS index over database descriptors written by `cairn extract` or `cairn encode`.

Reads FEATURES/features-*.parquet (dense vectors), indexes every vector with an int64 id, and writes
OUT/index.faiss, OUT/ids.parquet (faiss_id -> image id, landmark_id) and OUT/index.json (factory, metric, dim,
count, the features' metadata). Sparse bag-of-visual-words features (FEATURES/sparse-*.parquet) get an
inverted file instead (index/sparse_index.py: OUT/postings.npz, ids.parquet, index.json).
"""

from __future__ import annotations

import logging
import os
import time

from index.faiss_index import IndexConfig, VectorIndex
from jobs import common
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.parquet_io import read_shards
from pipeline.schemas import labels_of, vectors_of

log = logging.getLogger(__name__)


def build_index(features: str, out: str, config: IndexConfig = IndexConfig()) -> dict:
    """Build and save the index; returns {count, dim, seconds, index_bytes}."""
    from jobs.encode import features_kind

    kind = features_kind(features)
    if kind == "local":
        raise CairnError(f"{features} holds local features; encode them into one vector per image first "
                         "(`cairn train` + `cairn encode`)")
    if kind == "sparse":
        return _build_sparse(features, out)
    table, meta = read_shards(fs.join(features, "features"))
    xb = vectors_of(table)
    started = time.perf_counter()
    index = VectorIndex.build(xb, table.column("id").to_pylist(), labels_of(table), config, meta)
    seconds = time.perf_counter() - started
    index.save(out)
    size = os.path.getsize(os.path.join(out, "index.faiss"))
    log.info("index: %d vectors of dim %d (%s, %s) in %.2f s, %.1f MB", index.ntotal, index.dim, config.factory,
             config.metric, seconds, size / 1e6)
    return {"count": index.ntotal, "dim": index.dim, "seconds": seconds, "index_bytes": size}


def _build_sparse(features: str, out: str) -> dict:
    from index.sparse_index import SparseIndex
    from pipeline.schemas import sparse_matrix_of

    table, meta = read_shards(fs.join(features, "sparse"))
    started = time.perf_counter()
    index = SparseIndex.build(sparse_matrix_of(table, meta["dim"]), table.column("id").to_pylist(), labels_of(table),
                              meta)
    seconds = time.perf_counter() - started
    index.save(out)
    size = os.path.getsize(os.path.join(out, "postings.npz"))
    log.info("index: inverted file over %d images, %d words, %.1f MB", index.ntotal, index.dim, size / 1e6)
    return {"count": index.ntotal, "dim": index.dim, "seconds": seconds, "index_bytes": size}


def build_parser():
    p = common.parser("cairn index", __doc__)
    p.add_argument("--features", required=True, help="folder written by `cairn extract` for the database images")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--factory", default="Flat", help="FAISS index_factory string (default: Flat, exact search)")
    p.add_argument("--metric", default="ip", choices=["ip", "l2"],
                   help="ip: inner product = cosine on the L2-normalised descriptors (default); l2: Euclidean")
    p.add_argument("--gpu", action="store_true", help="search on GPUs when FAISS sees some (else CPU)")
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, _ = common.parse(build_parser(), argv)
    return build_index(args.features, args.out, IndexConfig(args.factory, args.metric, args.gpu))
