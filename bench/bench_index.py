"""Benchmark "index": FAISS index kinds on a million landmark-shaped vectors, against exact search.

Every index is built by Cairn's own build path (``VectorIndex.build``: seeded training sample, shards of
200,000 vectors with global ids, merge) in a fresh process, so that its peak memory is its own. It is then
loaded from its saved folder and searched at a few settings. Exact search (raw ``faiss.IndexFlatIP``) gives
the ground truth and the reference QPS.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import time

import numpy as np

from bench.common import entry, summary, time_runs

log = logging.getLogger(__name__)

NAME = "index"
TITLE = "FAISS indices at a million vectors: build, memory, size, QPS and recall against exact search"
DESCRIPTION = (
    "Data: `index.synthetic.VectorSet` (seed 0): 1,000,000 L2-normalised 512-d vectors over 13,000 landmark "
    "classes with a long tail (class c drawn with probability ~ (c+1)^-0.6), per-class spread, a decaying "
    "spectrum in a random rotation, and 10% non-landmark vectors around 200 broad modes; 1,000 queries drawn "
    "the same way with another seed (half of them non-landmark). Not uniform random data, which has no "
    "clusters for IVF or spectrum for PQ. Exact search (raw `faiss.IndexFlatIP`, all queries in one call) is "
    "the reference and the ground truth. Each index is built with `VectorIndex.build` in its own process "
    "(peak memory = that process's peak RSS above the input vectors it holds), saved, loaded and searched "
    "with all queries in one call (best of 3). Recall: **R@10** = share of queries whose true nearest "
    "neighbour is in the top 10 (FAISS's 1-recall@10); **10-R@10** = share of the true top 10 found in the "
    "top 10 (the stricter intersection measure). Bytes/vector = index.faiss size / vectors, ids included. "
    "All on this machine's CPU threads; no GPU."
)

DIM = 512
K = 10
SIZES_FULL = dict(nb=1_000_000, nq=1_000)
SIZES_QUICK = dict(nb=100_000, nq=300)

# (factory, search settings); "auto" is the default Cairn chooses for this size
CANDIDATES = [
    ("Flat", [""]),
    ("IVF{nlist},Flat", ["nprobe=16", "nprobe=64", "nprobe=128"]),
    ("IVF{nlist},PQ64", ["nprobe=16", "nprobe=64", "nprobe=128"]),
    ("HNSW32,Flat", ["efSearch=32", "efSearch=64", "efSearch=128", "efSearch=256"]),
    ("auto", ["nprobe=64,k_factor_rf=16", "nprobe=128,k_factor_rf=32", "nprobe=128,k_factor_rf=64",
              "nprobe=256,k_factor_rf=64", "nprobe=256,k_factor_rf=128"]),
    # twice the shortlist codes: a little more recall, just over a tenth of the flat size
    ("IVF{nlist},PQ128x4fs,Refine(PQ128)", ["nprobe=64,k_factor_rf=16", "nprobe=128,k_factor_rf=16",
                                            "nprobe=128,k_factor_rf=32"]),
    # refinement by 8-bit scalar codes: the strict 10-R@10 at 0.95+, at 0.3 of the flat size
    ("IVF{nlist},PQ128x4fs,Refine(SQ8)", ["nprobe=64,k_factor_rf=16", "nprobe=128,k_factor_rf=32",
                                          "nprobe=256,k_factor_rf=32"]),
]


def make_data(nb: int, nq: int):
    from index.synthetic import VectorSet, VectorSetConfig

    vs = VectorSet(VectorSetConfig(dim=DIM))
    xb, yb = vs.draw(nb, seed=1, distractors=0.1, progress=True, desc="database vectors")
    xq, yq = vs.draw(nq, seed=2, distractors=0.5)
    return xb, yb, xq, yq


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS; returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _build_child(xb_path: str, labels_path: str, factory: str, folder: str, queue) -> None:
    """Runs in a fresh process: load the vectors, build, save; report times and peak memory."""
    import faiss

    from index.faiss_index import IndexConfig, VectorIndex

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    xb = np.load(xb_path)
    labels = np.load(labels_path)
    xb.sum()  # every page of the input resident before the baseline
    base = _reset_peak()
    started = time.perf_counter()
    index = VectorIndex.build(xb, [f"img{i:07d}" for i in range(len(xb))], labels,
                              IndexConfig(factory=factory, nonlandmark_index=False), folder=folder)
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM") * 1024
    index.save(folder)
    queue.put({"seconds": seconds, "peak_rss": peak, "input_rss": base, "factory": index.factory,
               "search_params": index.search_params, "info": index.build_info})


def build_in_process(workdir: str, factory: str, folder: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_build_child, args=(os.path.join(workdir, "xb.npy"), os.path.join(workdir, "yb.npy"),
                                                 factory, folder, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"building {factory} failed (exit code {proc.exitcode})")
    return result


def recalls(I: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(R@10: true nearest neighbour in the top 10, 10-R@10: share of the true top 10 in the top 10)."""
    r1 = float(np.mean([gt[i, 0] in I[i, :K] for i in range(len(I))]))
    r10 = float(np.mean([len(set(I[i, :K]) & set(gt[i, :K])) / K for i in range(len(I))]))
    return r1, r10


def _exact(xb: np.ndarray, xq: np.ndarray):
    """(build seconds, search seconds, ground truth [Q, K], serialised bytes) of raw exact search."""
    import faiss

    exact = faiss.IndexFlatIP(DIM)
    build = time_runs(lambda: exact.add(xb), 1)
    exact.search(xq[:10], K)  # warm-up
    times = time_runs(lambda: exact.search(xq, K), 3)
    _, gt = exact.search(xq, K)
    return build, times, gt, int(faiss.serialize_index(exact).size)


def run(workdir: str, quick: bool) -> list[dict]:
    import faiss

    from index.build import nlist_for
    from index.faiss_index import VectorIndex

    sizes = SIZES_QUICK if quick else SIZES_FULL
    nb, nq = sizes["nb"], sizes["nq"]
    threads = os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    os.makedirs(workdir, exist_ok=True)
    nlist = nlist_for(nb)
    group = f"{nb:,} x {DIM}, 13,000 classes, {nq:,} queries, k={K}, {threads} threads"
    xb, yb, xq, _ = make_data(nb, nq)
    np.save(os.path.join(workdir, "xb.npy"), xb)
    np.save(os.path.join(workdir, "yb.npy"), yb)

    build_exact, exact_times, gt, flat_bytes = _exact(xb, xq)
    qps_exact = nq / min(exact_times)
    ref_qps, ref_build, ref_bytes = ("exact search (raw IndexFlatIP), all queries in one call",
                                     "raw IndexFlatIP.add", "raw IndexFlatIP, serialised")
    entries = [
        entry(group, ref_qps, qps_exact, "queries/s", repeats=3, **summary(exact_times)),
        entry(group, ref_build, build_exact[0], "s", better="lower"),
        entry(group, ref_bytes, flat_bytes / nb, "bytes/vector", better="lower", total_bytes=flat_bytes),
    ]
    del xb
    default = None
    for pattern, settings in CANDIDATES:
        factory = pattern.format(nlist=nlist)
        folder = os.path.join(workdir, "ix-" + factory.replace(",", "_").replace("(", "_").replace(")", ""))
        shutil.rmtree(folder, ignore_errors=True)
        log.info("index bench: building %s", factory)
        built = build_in_process(workdir, factory, folder)
        name = built["factory"] + (" (auto)" if factory == "auto" else "")
        index = VectorIndex.load(folder)
        size = os.path.getsize(os.path.join(folder, "index.faiss"))
        info = built["info"]
        entries += [
            entry(group, f"{name}: build", built["seconds"], "s", ref_build, better="lower",
                  note=f"train {info['train_seconds']:.0f} s on {info['train_size']:,}, add {info['add_seconds']:.0f} s, "
                       f"merge {info['merge_seconds']:.0f} s", **info),
            entry(group, f"{name}: peak memory above the input", (built["peak_rss"] - built["input_rss"]) / 2**20,
                  "MiB", better="lower", note=f"peak RSS {built['peak_rss'] / 2**30:.2f} GiB with the "
                  f"{nb * DIM * 4 / 2**30:.2f} GiB of input vectors", peak_rss=built["peak_rss"],
                  input_rss=built["input_rss"]),
            entry(group, f"{name}: size", size / nb, "bytes/vector", ref_bytes, better="lower", total_bytes=size),
        ]
        for params in settings:
            index.search(xq[:10], K, params=params)  # warm-up (and applies the parameters)
            times = time_runs(lambda p=params, ix=index: ix.search(xq, K, params=p), 3)
            _, I = index.search(xq, K, params=params)
            r1, r10 = recalls(I, gt)
            label = f"{name} [{params or 'exact'}]"
            entries.append(entry(group, label, nq / min(times), "queries/s", ref_qps, repeats=3,
                                 note=f"R@10 {r1:.3f}, 10-R@10 {r10:.3f}", recall_at_10=r1,
                                 intersection_recall_at_10=r10, **summary(times)))
            if factory == "auto" and params == built["search_params"]:
                default = (built["factory"], params, nq / min(times) / qps_exact, r1, r10, size / flat_bytes)
        del index
        shutil.rmtree(folder, ignore_errors=True)
    if default is not None:
        factory, params, speedup, r1, r10, size_ratio = default
        met = r1 >= 0.95 and speedup >= 20 and size_ratio <= 0.1
        entries.append(entry(
            group, "default (auto) meets R@10 >= 0.95 at >= 20x exact QPS in <= 1/10 of its size",
            "yes" if met else "no", "", better="",
            note=f"{factory} [{params}]: R@10 {r1:.3f}, 10-R@10 {r10:.3f}, {speedup:.1f}x exact QPS, "
                 f"{size_ratio:.3f} of the flat size", speedup=speedup, recall_at_10=r1,
            intersection_recall_at_10=r10, size_ratio=size_ratio))
    return entries
