"""Benchmark "faiss_flat": exact search through our VectorIndex vs the raw FAISS IndexFlatIP call.

Same data, same thread count, same k. The wrapper's cost is the query checks and copies, the lock and the
batching loop (a Flat index numbers vectors by position, so no id map); the results must be identical (our
faiss ids are the row numbers 0..N-1, so they compare directly with the raw index's).
"""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
from tqdm import tqdm

from bench.common import entry, summary, time_runs

log = logging.getLogger(__name__)

NAME = "faiss_flat"
TITLE = "Exact search: VectorIndex (Flat, inner product) vs raw faiss.IndexFlatIP"
DESCRIPTION = (
    "Data: seeded synthetic clustered vectors (1,000 Gaussian centres in 512-d, each point = its centre + "
    "noise, L2-normalised, float32); queries are drawn the same way with another seed. Reference: "
    "`faiss.IndexFlatIP(d)`, `add(xb)`, `search(xq, k)`. Measured: "
    "`index.faiss_index.VectorIndex.build(xb, ids, labels, IndexConfig(factory=\"Flat\", metric=\"ip\"))` and "
    "`.search(xq, k=10)`. Both use `faiss.omp_set_num_threads(os.cpu_count())`. \"All queries in one call\" "
    "sends the whole query matrix; \"one query per call\" measures per-call overhead. Build and size ratios "
    "are ours / raw (lower is better); QPS ratios are ours / raw (higher is better)."
)

DIM = 512
CENTRES = 1000
NOISE = 0.7  # norm of the noise added to a unit centre, before normalisation
K = 10
SIZES_FULL = dict(nb=100_000, nq=1_000, single=200)
SIZES_QUICK = dict(nb=10_000, nq=1_000, single=100)


def clustered(n: int, seed: int, centres: np.ndarray, chunk: int = 20_000, desc: str = "",
              ) -> tuple[np.ndarray, np.ndarray]:
    """A random centre of ``centres`` plus isotropic noise of norm ~NOISE, for each of ``n`` points.

    Returns [n, d] float32 L2-normalised points and [n] int64 the centre of each point.
    """
    rng = np.random.default_rng(seed)
    d = centres.shape[1]
    out = np.empty((n, d), np.float32)
    assign = rng.integers(0, len(centres), n)
    for lo in tqdm(range(0, n, chunk), desc=desc or "vectors", unit="chunk", leave=False, disable=n <= chunk):
        m = min(chunk, n - lo)
        x = centres[assign[lo:lo + m]]
        x += rng.standard_normal((m, d), dtype=np.float32) * np.float32(NOISE / np.sqrt(d))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[lo:lo + m] = x
    return out, assign.astype(np.int64)


def make_data(nb: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xb [nb, DIM], xq [nq, DIM] float32 and the centre of every database vector [nb] int64."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    xb, labels = clustered(nb, seed + 1, centres, desc="database vectors")
    xq, _ = clustered(nq, seed + 2, centres, desc="query vectors")
    return xb, xq, labels


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def run(workdir: str, quick: bool) -> list[dict]:
    import faiss

    from index.faiss_index import IndexConfig, VectorIndex

    sizes = SIZES_QUICK if quick else SIZES_FULL
    nb, nq, single = sizes["nb"], sizes["nq"], sizes["single"]
    repeats = 3 if quick else 5
    threads = os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    os.makedirs(workdir, exist_ok=True)
    group = f"{nb:,} x {DIM} database, {nq:,} queries, k={K}, {threads} threads"
    log.info("faiss_flat: %s", group)

    xb, xq, labels = make_data(nb, nq)
    image_ids = [f"img{i:07d}" for i in range(nb)]
    config = IndexConfig(factory="Flat", metric="ip")

    def build_raw() -> faiss.Index:
        index = faiss.IndexFlatIP(DIM)
        index.add(xb)
        return index

    def build_ours() -> VectorIndex:
        return VectorIndex.build(xb, image_ids, labels, config)

    built: dict[str, object] = {}
    raw_build, our_build = [], []
    for _ in range(3):  # alternate, so that neither side gets a warmer cache or a quieter moment
        raw_build += time_runs(lambda: built.__setitem__("raw", build_raw()), 1)
        our_build += time_runs(lambda: built.__setitem__("ours", build_ours()), 1)
    raw, ours = built["raw"], built["ours"]
    assert raw.ntotal == nb and ours.ntotal == nb

    # warm-up, then the comparison of results
    D_raw, I_raw = raw.search(xq, K)
    D_ours, I_ours = ours.search(xq, k=K)
    same_ids = bool(np.array_equal(I_raw, I_ours))
    same_scores = bool(np.array_equal(D_raw, D_ours))
    max_diff = float(np.max(np.abs(D_raw - D_ours))) if D_raw.size else 0.0
    identical = "yes" if same_ids and same_scores else "no"
    if identical == "no":
        log.warning("faiss_flat: results differ: ids equal %s, scores equal %s (max |dD| %.3g)", same_ids,
                    same_scores, max_diff)

    raw_times, our_times = [], []
    for _ in tqdm(range(repeats), desc="search, all queries", unit="run", leave=False):
        raw_times += time_runs(lambda: raw.search(xq, K), 1)
        our_times += time_runs(lambda: ours.search(xq, k=K), 1)

    xq1 = [xq[i:i + 1] for i in range(single)]
    raw1_times, our1_times = [], []
    for _ in tqdm(range(repeats), desc="search, one query per call", unit="run", leave=False):
        raw1_times += time_runs(lambda: [raw.search(q, K) for q in xq1], 1)
        our1_times += time_runs(lambda: [ours.search(q, k=K) for q in xq1], 1)

    # sizes: FAISS's own serialised bytes, and the whole saved folder (index.faiss + ids.parquet + index.json)
    raw_bytes = int(faiss.serialize_index(raw).size)
    our_bytes = int(faiss.serialize_index(ours.index).size)
    folder = os.path.join(workdir, "saved-index")
    shutil.rmtree(folder, ignore_errors=True)
    ours.save(folder)
    saved_bytes = _folder_bytes(folder)
    shutil.rmtree(folder, ignore_errors=True)  # 200 MB of scratch at full size

    qps_raw, qps_ours = nq / min(raw_times), nq / min(our_times)
    log.info("faiss_flat: raw %.0f QPS, ours %.0f QPS (ratio %.3f); identical: %s", qps_raw, qps_ours,
             qps_ours / qps_raw, identical)
    raw_qps_name = "raw IndexFlatIP.search, all queries in one call"
    raw1_name = "raw IndexFlatIP.search, one query per call"
    raw_build_name, raw_size_name = "raw IndexFlatIP() + add", "raw IndexFlatIP, serialised"
    common = dict(nb=nb, nq=nq, d=DIM, k=K, threads=threads)
    return [
        entry(group, raw_qps_name, qps_raw, "queries/s", repeats=repeats, **common, **summary(raw_times)),
        entry(group, "VectorIndex.search, all queries in one call", qps_ours, "queries/s", raw_qps_name,
              repeats=repeats, **common, **summary(our_times)),
        entry(group, "identical results (ids and scores)", identical, "", raw_qps_name, better="",
              note=f"max abs score difference {max_diff:.3g}", ids_equal=same_ids, scores_equal=same_scores,
              max_abs_score_diff=max_diff),
        entry(group, raw1_name, single / min(raw1_times), "queries/s", repeats=repeats, queries=single,
              **summary(raw1_times)),
        entry(group, "VectorIndex.search, one query per call", single / min(our1_times), "queries/s", raw1_name,
              repeats=repeats, queries=single, **summary(our1_times)),
        entry(group, raw_build_name, min(raw_build), "s", better="lower", repeats=3, **summary(raw_build)),
        entry(group, "VectorIndex.build (Flat, ids = positions 0..N-1)", min(our_build), "s", raw_build_name,
              better="lower", repeats=3, **summary(our_build)),
        entry(group, raw_size_name, raw_bytes / nb, "bytes/vector", better="lower",
              note=f"{DIM} x 4 bytes = {DIM * 4} of vector data", total_bytes=raw_bytes),
        entry(group, "VectorIndex index.faiss, serialised", our_bytes / nb, "bytes/vector",
              raw_size_name, better="lower", note="ids are positions: no id map", total_bytes=our_bytes),
        entry(group, "VectorIndex saved folder (index.faiss + ids.parquet + index.json)", saved_bytes / nb,
              "bytes/vector", raw_size_name, better="lower", total_bytes=saved_bytes),
    ]
