"""Benchmark "classifier": training time at 13,000 classes, NearestClassMean and SoftmaxClassifier vs one-vs-rest.

One-vs-rest linear models (LinearSVC, SGDClassifier) solve one binary problem over all N images per class, so
their cost is C x (one problem). Training all 13,000 would take far too long here, so a few class-vs-rest
problems are timed on the same data and the time is extrapolated x 13,000 (the note says so). Our two
classifiers are timed whole. Every time is also extrapolated to N = 1,000,000 images (linear in N, which is a
lower bound for liblinear).
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import numpy as np

from bench.common import entry

log = logging.getLogger(__name__)

NAME = "classifier"
TITLE = "Classifiers at 13,000 classes: NearestClassMean and softmax SGD vs one-vs-rest LinearSVC / SGDClassifier"
CLASSES = 13_000
NOISE = 1.0  # norm of the isotropic noise added to a unit class centre
NUISANCE = 1.5  # norm (rms) of the noise in NUISANCE_DIRS shared directions (viewpoint/lighting-like)
NUISANCE_DIRS = 16
TAIL_SIGMA = 1.2  # log-normal spread of the images per class
PRODUCTION_N = 1_000_000
SIZES_FULL = dict(dim=512, n=130_000, queries=5_000, problems=3)
SIZES_QUICK = dict(dim=128, n=26_000, queries=2_000, problems=3)
DESCRIPTION = (
    f"Data: seeded synthetic features for {CLASSES:,} classes: each class a random unit centre in D dimensions; "
    f"an image is its centre + isotropic noise of norm {NOISE} + noise of rms {NUISANCE} in {NUISANCE_DIRS} "
    "directions shared by all classes (nuisance factors a discriminative model can learn to ignore), "
    "L2-normalised float32. Images per class are long-tailed: 1 + a multinomial share with log-normal "
    f"(sigma {TAIL_SIGMA}) weights, so many classes have 1-5 images. Full: D=512, 130,000 images; quick: "
    "D=128, 26,000. Queries are drawn the same way (classes in proportion to their images) with another seed. "
    "Measured: `models.classifiers.NearestClassMean().fit(X, y)` and `SoftmaxClassifier().fit(X, y)` (default "
    "hyperparameters, including held-out temperature calibration), then `predict_top(xq, k=1)`: top-1 accuracy "
    "and GAP on the queries. Reference: sklearn `LinearSVC(dual=\"auto\")` one-vs-rest, timed on a few "
    "class-vs-rest problems over the same X and extrapolated x 13,000; likewise one `partial_fit` epoch of "
    "`SGDClassifier(loss=\"log_loss\")` per class. Time ratios are ours / LinearSVC (lower is better)."
)


def long_tail_counts(classes: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """[classes] int64 images per class: 1 each plus a multinomial share of the rest, log-normal weights."""
    if n < classes:
        raise ValueError(f"need at least one image per class: n={n} < classes={classes}")
    w = rng.lognormal(0.0, TAIL_SIGMA, classes)
    return 1 + rng.multinomial(n - classes, w / w.sum()).astype(np.int64)


def make_data(dim: int, n: int, queries: int, seed: int = 0):
    """X [n, dim], y [n] int64, xq [queries, dim], yq [queries] int64; float32 L2-normalised rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLASSES, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = np.linalg.qr(rng.standard_normal((dim, NUISANCE_DIRS)))[0].T.astype(np.float32)  # [r, dim]
    counts = long_tail_counts(CLASSES, n, rng)
    y = np.repeat(np.arange(CLASSES, dtype=np.int64), counts)
    yq = rng.choice(CLASSES, size=queries, p=counts / counts.sum()).astype(np.int64)

    def images(labels: np.ndarray, seed: int, chunk: int = 32768) -> np.ndarray:
        r = np.random.default_rng(seed)
        out = np.empty((len(labels), dim), np.float32)
        for lo in range(0, len(labels), chunk):
            lab = labels[lo:lo + chunk]
            x = centres[lab] + r.standard_normal((len(lab), dim), dtype=np.float32) * np.float32(NOISE / np.sqrt(dim))
            x += (r.standard_normal((len(lab), NUISANCE_DIRS), dtype=np.float32)
                  * np.float32(NUISANCE / np.sqrt(NUISANCE_DIRS))) @ basis
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[lo:lo + len(lab)] = x
        return out

    return images(y, seed + 1), y, images(yq, seed + 2), yq, counts


def _time(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _one_vs_rest(make, X: np.ndarray, y: np.ndarray, picked: np.ndarray, partial: bool) -> tuple[list[float], int]:
    """Seconds of one class-vs-rest problem for each class in ``picked``; and the convergence warnings."""
    from sklearn.exceptions import ConvergenceWarning

    times, warned = [], 0
    for c in picked:
        yb = (y == c).astype(np.int64)
        model = make()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            if partial:
                t, _ = _time(lambda m=model, t=yb: m.partial_fit(X, t, classes=np.array([0, 1])))
            else:
                t, _ = _time(lambda m=model, t=yb: m.fit(X, t))
        warned += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        times.append(t)
    return times, warned


def _quality(model, xq: np.ndarray, yq: np.ndarray) -> dict:
    from reports.metrics import gap

    t, (labels, probs) = _time(lambda: model.predict_top(xq, k=1))
    pred, conf = labels[:, 0], probs[:, 0]
    return {"top1_accuracy": round(float((pred == yq).mean()), 4), "gap": round(gap(pred, conf, yq), 4),
            "mean_confidence": round(float(conf.mean()), 4), "temperature": round(float(model.temperature_), 5),
            "calibration": model.calibration_, "predict_top_queries_per_s": round(len(xq) / t, 1)}


def run(workdir: str, quick: bool) -> list[dict]:
    from sklearn.linear_model import SGDClassifier
    from sklearn.svm import LinearSVC

    from models.classifiers import NearestClassMean, SoftmaxClassifier

    sizes = SIZES_QUICK if quick else SIZES_FULL
    dim, n, nq, problems = sizes["dim"], sizes["n"], sizes["queries"], sizes["problems"]
    threads = os.cpu_count() or 1
    os.makedirs(workdir, exist_ok=True)
    X, y, xq, yq, counts = make_data(dim, n, nq)
    group = f"{CLASSES:,} classes, {n:,} training images (long-tailed), D={dim}, {threads} cores"
    log.info("classifier: %s", group)
    scale = PRODUCTION_N / n
    tail = {"classes_with_1_image": int((counts == 1).sum()), "classes_with_at_most_5": int((counts <= 5).sum()),
            "largest_class": int(counts.max())}
    common = dict(n=n, d=dim, classes=CLASSES, queries=nq, threads=threads)

    # references: a few class-vs-rest problems, extrapolated x CLASSES (the largest, a median and a 1-image class)
    order = np.argsort(counts, kind="stable")
    picked = order[np.linspace(0, CLASSES - 1, problems).round().astype(int)][::-1]
    svc_times, svc_warn = _one_vs_rest(lambda: LinearSVC(dual="auto"), X, y, picked, partial=False)
    sgd_times, _ = _one_vs_rest(lambda: SGDClassifier(loss="log_loss", random_state=0), X, y, picked, partial=True)
    svc_s = float(np.mean(svc_times)) * CLASSES
    sgd_s = float(np.mean(sgd_times)) * CLASSES
    log.info("classifier: LinearSVC %.2f s per problem -> %.0f s for %d classes", np.mean(svc_times), svc_s, CLASSES)

    ncm_s, ncm = _time(lambda: NearestClassMean().fit(X, y))
    ncm_q = _quality(ncm, xq, yq)
    log.info("classifier: NearestClassMean %.2f s, %s", ncm_s, ncm_q)
    softmax = SoftmaxClassifier()
    sm_s, _ = _time(lambda: softmax.fit(X, y))
    sm_q = _quality(softmax, xq, yq)
    log.info("classifier: SoftmaxClassifier %.2f s, %s", sm_s, sm_q)

    def costs(seconds: float) -> dict:
        return {"us_per_image": round(seconds / n * 1e6, 3), "extrapolated_1M_images_s": round(seconds * scale, 1),
                "extrapolated_1M_images_h": round(seconds * scale / 3600, 2)}

    svc_name = "LinearSVC one-vs-rest fit (extrapolated)"
    ncm_acc_name, ncm_gap_name = "NearestClassMean top-1 accuracy", "NearestClassMean GAP"
    k = len(picked)
    return [
        entry(group, svc_name, svc_s, "s", better="lower", repeats=1,
              note=f"extrapolated from {k} measured binary problems x {CLASSES:,}",
              problem_s=[round(t, 4) for t in svc_times], problem_class_sizes=counts[picked].tolist(),
              convergence_warnings=svc_warn, days=round(svc_s / 86400, 2),
              extrapolated_1M_images_days=round(svc_s * scale / 86400, 1), **costs(svc_s), **common, **tail),
        entry(group, "SGDClassifier(log_loss) one-vs-rest, 1 epoch (extrapolated)", sgd_s, "s", svc_name,
              better="lower", repeats=1, note=f"extrapolated from {k} measured binary partial_fit epochs x "
              f"{CLASSES:,}", problem_s=[round(t, 4) for t in sgd_times], **costs(sgd_s), **common),
        entry(group, "NearestClassMean.fit", ncm_s, "s", svc_name, better="lower", repeats=1,
              note="whole fit: class means + held-out temperature", **costs(ncm_s), **ncm_q, **common),
        entry(group, f"SoftmaxClassifier.fit ({softmax.epochs} epochs)", sm_s, "s", svc_name, better="lower",
              repeats=1, note=f"whole fit: NCM init, {softmax.epochs} epochs of Adam, held-out temperature",
              loss_curve=[round(float(v), 4) for v in softmax.loss_curve_], params=softmax.get_params(),
              **costs(sm_s), **sm_q, **common),
        entry(group, ncm_acc_name, ncm_q["top1_accuracy"], "fraction", note="on the query set"),
        entry(group, "SoftmaxClassifier top-1 accuracy", sm_q["top1_accuracy"], "fraction", ncm_acc_name),
        entry(group, ncm_gap_name, ncm_q["gap"], "GAP", note="confidence = calibrated top-1 probability"),
        entry(group, "SoftmaxClassifier GAP", sm_q["gap"], "GAP", ncm_gap_name),
    ]
