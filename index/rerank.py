"""Spatial re-ranking of search results: verify each query's top neighbours with local features + RANSAC.

The pure re-ranking rule is features.verify.rerank; this module feeds it from local-features Parquet shards.
:class:`LocalStore` reads the id column of every row group once and then fetches rows by id, reading only the
row groups that hold them. Queries are processed in chunks: for each chunk, the query rows and the database
rows among their top neighbours are fetched, verified pair by pair, and the neighbour lists re-ordered.
Memory is bounded by the chunk (``chunk x top_k`` database images' features) plus the id map (about 100 bytes
per database image). Each chunk reads the row groups its candidates fall in, so a large query set costs about
(queries / chunk) passes over the database's local features; spreading the pairs over workers (a Beam join on
the database id) is the scale-out issue's work.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from features.local import LocalFeatures, local_features_from_table
from features.verify import RerankConfig, rerank_query
from pipeline import fs
from pipeline.parquet_io import find_shards

log = logging.getLogger(__name__)


class LocalStore:
    """Local features of a shard set, fetched by image id."""

    def __init__(self, prefix: str):
        self.paths = find_shards(prefix)
        self.where: dict[str, tuple[int, int, int]] = {}  # image id -> (shard, row group, row)
        for s, path in enumerate(self.paths):
            with fs.FileSystems.open(path) as f:
                pf = pq.ParquetFile(f)
                for g in range(pf.num_row_groups):
                    for r, image_id in enumerate(pf.read_row_group(g, columns=["id"]).column("id").to_pylist()):
                        self.where[image_id] = (s, g, r)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.where

    def get(self, wanted) -> dict[str, LocalFeatures]:
        """image id -> LocalFeatures for the ids in ``wanted`` that the store holds."""
        groups: dict[tuple[int, int], list[int]] = {}
        for image_id in wanted:
            if image_id in self.where:
                s, g, r = self.where[image_id]
                groups.setdefault((s, g), []).append(r)
        found: dict[str, LocalFeatures] = {}
        for s in sorted({s for s, _ in groups}):
            with fs.FileSystems.open(self.paths[s]) as f:
                pf = pq.ParquetFile(f)
                for (s2, g), rows in sorted(groups.items()):
                    if s2 != s:
                        continue
                    table = pf.read_row_group(g).take(pa.array(sorted(rows), pa.int64()))
                    found.update(zip(table.column("id").to_pylist(), local_features_from_table(table), strict=True))
        return found


def load_local(prefix: str, wanted: set[str]) -> dict[str, LocalFeatures]:
    """image id -> LocalFeatures for the ids in ``wanted`` found in the shards at ``prefix``."""
    return LocalStore(prefix).get(wanted) if wanted else {}


def spatial_rerank(query_ids: list[str], D: np.ndarray, I: np.ndarray, db_ids: list[str], query_prefix: str,
                   db_prefix: str, config: RerankConfig, prepare=None, chunk: int = 500, progress: bool = False,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-rank every query's neighbours.

    Args:
        D, I: [Q, K] similarities (best first) and database row ids (-1 = none) from an index search.
        db_ids: image id of each database row.
        query_prefix, db_prefix: local-features shard prefixes of the queries and the database.
        prepare: descriptors -> float32 descriptors to match (e.g. RootSIFT).
    Returns:
        D2, I2 [Q, K] re-ranked (D2 = -inf where I2 = -1), inliers [Q, K] aligned with I2 (-1 = not verified).
    """
    import faiss
    # one verification matches ~1000 x 1000 descriptors: FAISS's OpenMP threads cost more than they save there
    # (about 6 ms on one thread vs 30+ ms on two), so match single-threaded and restore the setting after
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return _rerank_chunks(query_ids, D, I, db_ids, query_prefix, db_prefix, config, prepare, chunk, progress)
    finally:
        faiss.omp_set_num_threads(threads)


def _rerank_chunks(query_ids, D, I, db_ids, query_prefix, db_prefix, config, prepare, chunk, progress):
    D2, I2 = D.copy(), I.copy()
    inliers_out = np.full(I.shape, -1, np.int64)
    top = min(config.top_k, I.shape[1])
    missing = 0
    query_store = LocalStore(query_prefix)
    db_store = query_store if db_prefix == query_prefix else LocalStore(db_prefix)
    candidates = {db_ids[j] for j in np.unique(I[:, :top]) if j >= 0}
    absent = sum(1 for image_id in candidates if image_id not in db_store)
    if absent:
        log.warning("verify: %d of the %d database images among the top %d neighbours have no local features in "
                    "%s; they count as unverified", absent, len(candidates), top, db_prefix)
    for lo in tqdm(range(0, len(query_ids), chunk), desc="verify", unit="chunk", disable=not progress):
        hi = min(lo + chunk, len(query_ids))
        queries = query_store.get(query_ids[lo:hi])
        needed = {db_ids[j] for j in I[lo:hi, :top].ravel() if j >= 0}
        database = db_store.get(needed)
        for q in range(lo, hi):
            query = queries.get(query_ids[q])
            if query is None:
                missing += 1
                continue
            cands = [database.get(db_ids[j]) if (j >= 0 and r < top) else None for r, j in enumerate(I[q])]
            scores = np.where(I[q] >= 0, np.nan_to_num(D[q], neginf=0.0), 0.0).astype(np.float32)
            scores = np.minimum.accumulate(scores)  # exactly non-increasing (ties from float rounding)
            order, new_scores, inl = rerank_query(query, cands, scores, config, prepare)
            I2[q] = I[q][order]
            D2[q] = np.where(I2[q] >= 0, new_scores, -np.inf)
            inliers_out[q, :top] = np.asarray(inl)[order][:top]
    if missing:
        log.warning("verify: %d queries have no local features; their neighbours keep the global order", missing)
    return D2, I2, inliers_out
