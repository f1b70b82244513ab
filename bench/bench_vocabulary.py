"""Benchmark "vocabulary": training a visual vocabulary, Cairn's Vocabulary (FAISS k-means) vs scikit-learn.

Speed is only meaningful at the quality each method reaches, so both the training time and the quantisation
error (mean squared L2 distance of held-out descriptors to their nearest centroid) are reported. The budget
is the same number of passes over the training data: FAISS runs NITER full Lloyd iterations;
MiniBatchKMeans runs max_iter=NITER epochs (its defaults otherwise, so its early stopping may end it sooner:
the epochs it actually ran are in the entry's note; a second FAISS run gets that many passes, so the two are
also compared at equal work). Both are seeded and run with the same thread count.

The reference is MiniBatchKMeans with init="random" (k random training points), the same initialisation as
FAISS's default. Cairn's Vocabulary is also measured with init="afk-mc2" (FAISS's MCMC approximation of
k-means++). scikit-learn's default k-means++ initialisation is not run: its k sequential sampling steps
dominate its time at large k (79 s at k=1,024 on 2 cores, measured once; far more at k=4,096).
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
from tqdm import tqdm

from bench.common import entry, skipped

log = logging.getLogger(__name__)

NAME = "vocabulary"
TITLE = "Vocabulary training: Vocabulary.fit (FAISS k-means) vs scikit-learn MiniBatchKMeans"
DIM = 128
NITER = 10  # FAISS Lloyd iterations = MiniBatchKMeans epochs (max_iter)
BATCH = 8192  # MiniBatchKMeans batch_size (its docs advise >= 256 x cores; larger batches use BLAS better)
NOISE = 12.0  # per-coordinate standard deviation of a descriptor around its centre
SIZES_FULL = dict(n=1_000_000, k=4096, centres=20_000, held_out=100_000)
SIZES_QUICK = dict(n=100_000, k=1024, centres=2_000, held_out=100_000)
DESCRIPTION = (
    f"Data: seeded synthetic SIFT-like descriptors, {DIM}-d float32 with integer values in [0, 255]: a Gaussian "
    "mixture of 20,000 centres (2,000 in quick mode) whose coordinates are Gamma(0.7, 30) (non-negative, "
    f"mostly small, a few large, like SIFT bins); each descriptor = a random centre + N(0, {NOISE:g}^2) "
    "noise, rounded and clipped. Measured: `features.vocabulary.Vocabulary(k, niter="
    f"{NITER}, seed=0, init=...).fit(X)` (faiss.Kmeans, {NITER} full Lloyd iterations, no subsampling) with "
    "FAISS's default random initialisation and with init=\"afk-mc2\". Reference: "
    f"`sklearn.cluster.MiniBatchKMeans(n_clusters=k, batch_size={BATCH}, max_iter={NITER}, n_init=1, "
    "init=\"random\", random_state=0, compute_labels=False).fit(X)` (at most "
    f"{NITER} epochs, default early stopping; the same initialisation as FAISS's default); full mode also "
    "runs it with its default init=\"k-means++\" (left out of quick mode: its initialisation alone takes "
    "about 80 s at k=1,024 on 2 cores). Same thread count for all (`pipeline.resources.limit_threads` and "
    "threadpoolctl). Quality: quantisation error = mean squared L2 distance of 100,000 held-out "
    "descriptors (another seed, same mixture) to their nearest centroid, computed exactly with "
    "faiss.IndexFlatL2 for all. Each fit runs once (a full fit takes minutes). Ratios are value / reference "
    "for both time and error (lower is better)."
)


def sift_like(n: int, centres: np.ndarray, seed: int, chunk: int = 100_000) -> np.ndarray:
    """[n, DIM] float32: a random centre of ``centres`` plus Gaussian noise, rounded and clipped to [0, 255]."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, centres.shape[1]), np.float32)
    for lo in tqdm(range(0, n, chunk), desc="descriptors", unit="chunk", leave=False, disable=n <= chunk):
        m = min(chunk, n - lo)
        x = centres[rng.integers(0, len(centres), m)]
        x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(NOISE)
        np.clip(np.rint(x, out=x), 0, 255, out=out[lo:lo + m])
    return out


def make_data(n: int, n_centres: int, held_out: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(training [n, DIM], held-out [held_out, DIM]) float32 descriptors of one seeded mixture."""
    rng = np.random.default_rng(seed)
    centres = np.minimum(rng.gamma(0.7, 30.0, (n_centres, DIM)), 255).astype(np.float32)
    return sift_like(n, centres, seed + 1), sift_like(held_out, centres, seed + 2)


def quantisation_error(centroids: np.ndarray, X: np.ndarray) -> float:
    """Mean squared L2 distance of the rows of X to their nearest centroid (exact, FAISS flat index)."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    D, _ = index.search(X, 1)
    return float(np.maximum(D, 0).mean(dtype=np.float64))


def run(workdir: str, quick: bool) -> list[dict]:
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    from features.vocabulary import Vocabulary
    from pipeline.resources import limit_threads

    sizes = SIZES_QUICK if quick else SIZES_FULL
    n, k, n_centres, held_out = sizes["n"], sizes["k"], sizes["centres"], sizes["held_out"]
    threads = os.cpu_count() or 1
    os.makedirs(workdir, exist_ok=True)
    group = f"{n:,} x {DIM} SIFT-like descriptors, k={k:,}, {threads} threads"
    log.info("vocabulary: %s", group)

    import faiss  # noqa: F401 - imported before limit_threads so that its OpenMP pool is capped too

    limit_threads(threads)
    X, Xh = make_data(n, n_centres, held_out)
    common = dict(n_train=n, k=k, d=DIM, held_out=held_out, threads=threads)

    def sklearn_fit(init: str) -> tuple[float, float, str, dict]:
        start = time.perf_counter()
        mbk = MiniBatchKMeans(n_clusters=k, batch_size=BATCH, max_iter=NITER, n_init=1, init=init,
                              random_state=0, compute_labels=False).fit(X)
        seconds = time.perf_counter() - start
        epochs = mbk.n_steps_ * BATCH / n
        ran["epochs"] = epochs
        note = f"init={init}; ran {epochs:.1f} of {NITER} epochs ({mbk.n_steps_} steps of {BATCH:,})"
        return seconds, quantisation_error(mbk.cluster_centers_, Xh), note, dict(n_steps=int(mbk.n_steps_),
                                                                                   epochs=round(epochs, 2))

    ran: dict[str, float] = {}  # epochs MiniBatchKMeans actually ran (its early stopping)

    def faiss_fit(init: str, niter: int = NITER) -> tuple[float, float, str, dict]:
        start = time.perf_counter()
        voc = Vocabulary(k=k, niter=niter, seed=0, sample_size=n, init=init).fit(X)
        seconds = time.perf_counter() - start
        return (seconds, quantisation_error(voc.centroids_, Xh), f"init={init}; {niter} full passes",
                dict(niter=niter, train_inertia_per_point=round(float(voc.inertia_), 3)))

    ref_time = "scikit-learn MiniBatchKMeans.fit, random init"
    ref_err = "held-out quantisation error, MiniBatchKMeans, random init"
    runs = [  # (time entry name, error entry name, fit)
        (ref_time, ref_err, lambda: sklearn_fit("random")),
        ("Vocabulary.fit (FAISS k-means), random init", "held-out quantisation error, Vocabulary, random init",
         lambda: faiss_fit("random")),
        ("Vocabulary.fit (FAISS k-means), random init, as many passes as MiniBatchKMeans ran",
         "held-out quantisation error, Vocabulary, random init, same passes",
         lambda: faiss_fit("random", max(1, math.ceil(ran["epochs"])))),
        ("Vocabulary.fit (FAISS k-means), init=afk-mc2", "held-out quantisation error, Vocabulary, afk-mc2",
         lambda: faiss_fit("afk-mc2")),
        ("scikit-learn MiniBatchKMeans.fit, k-means++ init (its default)",
         "held-out quantisation error, MiniBatchKMeans, k-means++ init", None),
    ]
    entries = []
    with threadpool_limits(limits=threads):
        for time_name, err_name, fit in runs:
            if fit is None:
                reason = ("not run: its k sequential k-means++ seeding took 79 s alone at k=1,024 on 100k points on 2 "
                          "cores (measured once); the reference uses the same random init as FAISS instead")
                entries += [skipped(group, time_name, reason), skipped(group, err_name, reason)]
                continue
            seconds, error, note, details = fit()
            log.info("vocabulary: %s: %.1f s, held-out error %.1f (%s)", time_name, seconds, error, note)
            is_ref = time_name == ref_time
            entries.append(entry(group, time_name, seconds, "s", None if is_ref else ref_time, better="lower",
                                 repeats=1, note=note, **details, **common))
            entries.append(entry(group, err_name, error, "squared L2", None if is_ref else ref_err, better="lower",
                                 note="mean squared distance to the nearest centroid", **common))
    return entries
