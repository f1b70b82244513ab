"""Calibrated linear classifiers on global descriptors, at 13,000 classes and a million training images.

The production set is ~1,000,000 training images over ~13,000 long-tailed landmark classes (many with 1-5
images), with D = 512 (CNN), 256-512 (VLAD-PCA) or 1764 (HoG). Predictions are scored with GAP, which sorts
the predictions of *all* queries by confidence, so a confidence must mean the same thing for every query:
each classifier here outputs softmax probabilities with a temperature fitted on held-out data (Guo et al.
2017), and :meth:`predict_top` returns the top-k labels and their probabilities batch by batch, never
materialising the N x C matrix (1M x 13k float32 would be 52 GB).

Why these two, and not one-vs-rest linear SVMs (the arithmetic, N = 1e6, D = 512, C = 13,000):

* :class:`NearestClassMean` (cosine NCM, Mensink et al. 2013): one pass over the data, O(N D) = 5e8
  multiply-adds to sum the class means: seconds. Scores are cosines to the L2-normalised class means; a class
  with one image is as well represented as its image allows. No iterations, nothing to tune but the
  temperature.
* :class:`SoftmaxClassifier` (multinomial logistic regression, one weight vector per class, trained jointly
  with mini-batch Adam in numpy float32): each step is two BLAS matmuls of batch x D x C (logits, weight
  gradient) plus an O(batch x C) softmax, so an epoch is ~4-6 N D C flops and 5 epochs are
  5 x 1e6 x 512 x 13e3 x 6 ~ 2e14 flops: minutes to an hour at 50-200 GFLOP/s on a few cores (the benchmark
  measured 115 s for 5 epochs over 130k x 512 at 13k classes on 2 cores, i.e. ~15 min for 1M images).
  Memory is O(D C): weights plus two Adam moments, 3 x 13e3 x 512 x 4 B = 80 MB, plus one batch x C block.
  Initialised from the scaled class means ("ncm"), it starts where NCM ends and a few epochs refine it.
* One-vs-rest LinearSVC (liblinear), the classical baseline, solves C independent binary problems over all N
  images: one 190k x 512 class-vs-rest problem takes ~9 s here (3.4 s at 130k x 512 in the benchmark), so
  13,000 of them over 1M images take 13e3 x 9 s x (1e6 / 190e3) ~ 7 days. sklearn's SGDClassifier is
  one-vs-rest too (C passes over the data per epoch: ~5 h per epoch at 1M images, extrapolated).
  ``bench/bench_classifier.py`` measures all of these on the same synthetic data.
* The third option needs no training: kNN over the FAISS index with neighbour votes
  (:func:`index.recognize.vote`), which the pipeline already has.

Labels are int64 landmark ids; -1 (:data:`index.recognize.NO_LANDMARK`: database images known to show no
landmark) is just another class here, and the caller turns a predicted -1 into "no prediction".

Calibration (both classifiers). Unless ``temperature`` is given, a held-out split is drawn from the classes with
at least two examples, keeping at least one example of every class in training: ``validation_fraction`` of
the examples, but at most :func:`calibration_rows` (a few thousand rows at 13k classes, because the held-out
scores [rows, C] are kept in memory while the temperature is fitted; one scalar needs thousands of examples,
not a hundred thousand). The model is trained on the rest, the temperature T minimises the held-out negative
log-likelihood (:func:`fit_temperature`), and then

* NearestClassMean recomputes its means on *all* data (one more cheap pass; the held-out examples come back
  into their classes' means) and keeps the temperature fitted against the train-part means (with a few
  thousand held-out rows among up to a million, the means barely move);
* SoftmaxClassifier keeps the weights trained on the train part (retraining would double the cost, and a
  second run's logits would no longer match the fitted temperature).

When no class has two examples there is nothing to hold out: T = 1 and ``calibration_`` says so.

Artefacts: :meth:`save` / :meth:`load` write and read a ``features.artifacts`` file of kind "classifier" whose
config names the estimator class; :func:`load_classifier` loads either class.
"""

from __future__ import annotations

import abc
import logging
import math

import numpy as np
from scipy import sparse
from scipy.optimize import minimize_scalar
from sklearn.base import BaseEstimator, ClassifierMixin

from features import artifacts
from pipeline.errors import CairnError

log = logging.getLogger(__name__)

KIND = "classifier"
TEMPERATURE_BOUNDS = (1e-3, 1e3)  # the range fit_temperature searches (on log T)
CALIBRATION_ELEMENTS = 1 << 25  # held-out rows x classes kept in memory for calibration (128 MB of float32)
MIN_CALIBRATION_ROWS = 2000  # ... but at least this many rows (when validation_fraction allows)
MIN_FIT_ROWS = 20  # fewer held-out examples than this cannot fit one scalar reliably: T = 1
INIT_TEMPERATURE = 0.1  # SoftmaxClassifier "ncm" init: coef_ = means / this, when no class has 2+ examples
_NO_CALIBRATION = "none (no class with 2+ examples)"


# ---------------------------------------------------------------------------------------------- validation


def _check_finite(X: np.ndarray, what: str, chunk: int = 65536) -> None:
    for lo in range(0, len(X), chunk):  # chunked: np.isfinite of 1M x 512 would be a 512 MB temporary
        if not np.isfinite(X[lo:lo + chunk]).all():
            raise ValueError(f"{what} contains NaN or infinity")


def _check_X(X, n_features: int | None = None, what: str = "X") -> np.ndarray:
    """[N, D] float32 view or copy of X, or a ValueError saying what is wrong."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [N, D]; got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.floating):
        raise ValueError(f"{what} must hold floats (float32 descriptors); got dtype {X.dtype}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {X.shape})")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"{what} has {X.shape[1]} features; the classifier was fitted on {n_features}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    _check_finite(X, what)
    return X


def _check_Xy(X, y) -> tuple[np.ndarray, np.ndarray]:
    X = _check_X(X)
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-D array of int labels; got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer labels (int64 landmark ids, -1 = no landmark); got dtype {y.dtype}")
    if len(y) != len(X):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)} labels")
    return X, y.astype(np.int64, copy=False)


def _encode(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """classes [C] int64 (sorted), y_index [N] int64 in 0..C-1, counts [C]; at least 2 classes."""
    classes, y_index, counts = np.unique(y, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes to train a classifier; y has {len(classes)} "
                         f"({classes.tolist()})")
    return classes.astype(np.int64), y_index.astype(np.int64).ravel(), counts


# ---------------------------------------------------------------------------------------------- calibration


def calibration_rows(n_classes: int) -> int:
    """The most held-out rows used for calibration at ``n_classes`` classes (scores kept: rows x C)."""
    return max(MIN_CALIBRATION_ROWS, CALIBRATION_ELEMENTS // max(n_classes, 1))


def training_rows(n: int, n_classes: int, fraction: float) -> int:
    """About how many of ``n`` rows a classifier trains on once the calibration rows are held out (as
    holdout_split draws them, assuming every class has two examples or more): cairn plan's step count."""
    return n - min(math.ceil(fraction * n), calibration_rows(n_classes))


def holdout_split(y_index: np.ndarray, fraction: float, max_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train [n] int64, held_out [m] int64) row numbers.

    The held-out rows come only from classes with >= 2 examples, and every class keeps at least one example in
    training: one random example per class is reserved, and m = min(ceil(fraction * N), max_rows, candidates)
    rows are drawn at random from the others. m is 0 when fraction is 0 or no class has two examples.
    """
    n = len(y_index)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    _, first = np.unique(y_index[perm], return_index=True)  # one random keeper per class
    candidate = np.ones(n, bool)
    candidate[perm[first]] = False
    candidates = np.flatnonzero(candidate)
    m = min(math.ceil(fraction * n), max_rows, len(candidates))
    if m <= 0:
        return np.arange(n, dtype=np.int64), np.empty(0, np.int64)
    held = np.sort(rng.choice(candidates, size=m, replace=False)).astype(np.int64)
    mask = np.ones(n, bool)
    mask[held] = False
    return np.flatnonzero(mask).astype(np.int64), held


def fit_temperature(logits: np.ndarray, y_index: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
                    batch_size: int = 4096) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 that minimises the NLL of softmax(logits / T).

    Args:
        logits: [N, C] float scores (cosines, or a linear model's logits) of held-out examples.
        y_index: [N] int true class of each row, as a column number 0..C-1.
        bounds: the range of T searched (bounded Brent search on log T; the NLL is convex in 1/T, so
            unimodal in log T).
        batch_size: rows per block; temporaries are batch_size x C.
    Returns:
        T (float). A T at a bound means the data wanted a more extreme one.
    """
    logits = np.asarray(logits)
    y_index = np.asarray(y_index)
    if logits.ndim != 2 or y_index.ndim != 1 or len(logits) != len(y_index) or len(logits) == 0:
        raise ValueError(f"logits must be [N, C] and y_index [N] with N > 0; got {logits.shape} and {y_index.shape}")
    if not np.issubdtype(y_index.dtype, np.integer) or y_index.min() < 0 or y_index.max() >= logits.shape[1]:
        raise ValueError(f"y_index must be ints in 0..{logits.shape[1] - 1}")
    logits = np.asarray(logits, np.float32)
    _check_finite(logits, "logits")
    n = len(logits)
    row_max = logits.max(axis=1)
    gap_to_max = (row_max - logits[np.arange(n), y_index]).astype(np.float64)  # >= 0
    buf = np.empty((min(batch_size, n), logits.shape[1]), np.float32)

    def nll(log_t: float) -> float:
        inv_t = np.float32(math.exp(-log_t))
        total = 0.0
        for lo in range(0, n, batch_size):
            b = buf[:min(batch_size, n - lo)]
            np.subtract(logits[lo:lo + len(b)], row_max[lo:lo + len(b), None], out=b)
            b *= inv_t
            np.exp(b, out=b)
            total += float(np.log(b.sum(axis=1).astype(np.float64)).sum())
        # -log softmax(z/T)_y = logsumexp((z - max)/T) + (max - z_y)/T
        return (total + float(gap_to_max.sum()) * float(inv_t)) / n

    lo_b, hi_b = math.log(bounds[0]), math.log(bounds[1])
    res = minimize_scalar(nll, bounds=(lo_b, hi_b), method="bounded", options={"xatol": 1e-3})
    return float(math.exp(res.x))


# ---------------------------------------------------------------------------------------------- shared base


def _softmax_rows(s: np.ndarray) -> np.ndarray:
    """In-place row softmax of a float32 block; returns it."""
    s -= s.max(axis=1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=1, keepdims=True)
    return s


class _CalibratedLinear(ClassifierMixin, BaseEstimator, metaclass=abc.ABCMeta):
    """Shared prediction, calibration and persistence; subclasses define ``_scores`` and the fit."""

    _ARRAYS: tuple[str, ...] = ()  # learned array attributes saved besides classes_ and temperature_

    @abc.abstractmethod
    def _scores(self, X: np.ndarray) -> np.ndarray:
        """[n, C] float32 scores of X [n, D] (a new array, which the caller may modify)."""

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise ValueError(f"this {type(self).__name__} is not fitted yet; call fit(X, y) first")

    def decision_function(self, X) -> np.ndarray:
        """[N, C] float32 raw scores (before temperature), columns in ``classes_`` order. N x C: small C only."""
        self._check_fitted()
        return self._scores(_check_X(X, self.n_features_in_))

    def predict_proba(self, X) -> np.ndarray:
        """[N, C] float32 calibrated probabilities softmax(scores / temperature_). N x C: small C only."""
        s = self.decision_function(X)
        s *= np.float32(1.0 / self.temperature_)
        return _softmax_rows(s)

    def predict(self, X) -> np.ndarray:
        """[N] int64 most probable label (may be -1 = no landmark), batch-wise."""
        return self.predict_top(X, k=1)[0][:, 0]

    def predict_top(self, X, k: int = 1, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """The k most probable labels and their calibrated probabilities, best first.

        Computed batch_size rows at a time (temporaries batch_size x C), so N = 1M, C = 13k is fine.

        Returns:
            labels [N, k] int64 (from ``classes_``; -1 is a class like any other), probs [N, k] float32.
        """
        self._check_fitted()
        X = _check_X(X, self.n_features_in_)
        C = len(self.classes_)
        if not 1 <= k <= C:
            raise ValueError(f"k must be in 1..{C} (the number of classes); got {k}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        n = len(X)
        labels = np.empty((n, k), np.int64)
        probs = np.empty((n, k), np.float32)
        inv_t = np.float32(1.0 / self.temperature_)
        for lo in range(0, n, batch_size):
            s = self._scores(X[lo:lo + batch_size])
            s *= inv_t
            s -= s.max(axis=1, keepdims=True)
            np.exp(s, out=s)
            z = s.sum(axis=1, keepdims=True)
            if k < C:
                top = np.argpartition(-s, k - 1, axis=1)[:, :k]
            else:
                top = np.broadcast_to(np.arange(C), s.shape).copy()
            p = np.take_along_axis(s, top, axis=1)
            order = np.argsort(-p, axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            labels[lo:lo + len(s)] = self.classes_[top]
            probs[lo:lo + len(s)] = np.take_along_axis(p, order, axis=1) / z
        return labels, probs

    # --- calibration helpers used by the fits

    def _calibrate(self, X: np.ndarray, y_index: np.ndarray, held: np.ndarray, counts: np.ndarray) -> None:
        """Set temperature_ and calibration_ from the held-out rows (scores with the current parameters)."""
        if self.temperature is not None:
            self.temperature_, self.calibration_ = float(self.temperature), "fixed"
        elif len(held) < MIN_FIT_ROWS:
            if counts.max() < 2:
                why = _NO_CALIBRATION
            elif len(held) == 0:
                why = "none (validation_fraction = 0)"
            else:  # a temperature fitted on a handful of examples runs to the bounds (seen: T = 1000 on 6)
                why = f"none (only {len(held)} held-out examples; {MIN_FIT_ROWS} or more are needed)"
            self.temperature_, self.calibration_ = 1.0, why
            log.info("%s: temperature 1.0: %s", type(self).__name__, why)
        else:
            scores = np.concatenate([self._scores(X[held[lo:lo + 4096]]) for lo in range(0, len(held), 4096)])
            self.temperature_ = fit_temperature(scores, y_index[held])
            self.calibration_ = "temperature"
            log.info("%s: temperature %.4g fitted on %d held-out examples", type(self).__name__,
                     self.temperature_, len(held))

    def _split(self, y_index: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1); got {self.validation_fraction}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 or None; got {self.temperature}")
        if self.temperature is not None:  # nothing to calibrate: train on everything
            return np.arange(len(y_index), dtype=np.int64), np.empty(0, np.int64)
        return holdout_split(y_index, self.validation_fraction, calibration_rows(n_classes), self.seed)

    # --- persistence

    def _meta(self) -> dict:
        return {"n_features_in": int(self.n_features_in_), "n_classes": int(len(self.classes_)),
                "calibration": self.calibration_}

    def save(self, path: str, meta: dict | None = None) -> None:
        """Write the fitted classifier as a Cairn artefact (kind "classifier"; config names the class); ``meta`` is
        added to its header (e.g. ``trained_on``: the features it was fitted on)."""
        self._check_fitted()
        arrays = {"classes": self.classes_, "temperature": np.float64(self.temperature_)}
        arrays.update({name: getattr(self, name + "_") for name in self._ARRAYS})
        config = {"estimator": type(self).__name__, "params": self.get_params()}
        artifacts.save(path, KIND, arrays, config, {**(meta or {}), **self._meta()})

    @classmethod
    def load(cls, path: str):
        """Read a classifier written by :meth:`save`; a CairnError when the file holds another class."""
        arrays, header = artifacts.load(path, KIND)
        return cls._from_artifact(path, arrays, header)

    @classmethod
    def _from_artifact(cls, path: str, arrays: dict[str, np.ndarray], header: dict):
        name = header.get("config", {}).get("estimator")
        if name != cls.__name__:
            raise CairnError(f"{path} holds a {name} classifier, not a {cls.__name__}; load it with "
                             f"{name}.load or models.classifiers.load_classifier")
        missing = [a for a in ("classes", "temperature", *cls._ARRAYS) if a not in arrays]
        if missing:
            raise CairnError(f"{path} lacks the arrays {missing}; it is not a complete {cls.__name__}")
        try:
            model = cls(**header["config"].get("params", {}))
        except TypeError as e:  # written by another version of the class
            raise CairnError(f"{path}: its {cls.__name__} hyperparameters do not match this version: {e}") from e
        model.classes_ = arrays["classes"].astype(np.int64)
        model.temperature_ = float(arrays["temperature"])
        for a in cls._ARRAYS:
            setattr(model, a + "_", arrays[a])
        model.n_features_in_ = int(arrays[cls._ARRAYS[0]].shape[1])
        model.calibration_ = header.get("meta", {}).get("calibration", "")
        model.trained_on_ = header.get("meta", {}).get("trained_on") or {}  # the features it was fitted on
        return model


# ---------------------------------------------------------------------------------------------- NCM


class NearestClassMean(_CalibratedLinear):
    """Cosine nearest class mean (Mensink et al. 2013) with temperature-scaled softmax confidences.

    Args:
        temperature: softmax temperature; None = fit it by temperature scaling on a held-out split.
        validation_fraction: share of examples held out for calibration (see the module docstring).
        seed: seed of the held-out split.

    Attributes (after fit):
        classes_ [C] int64 sorted labels; means_ [C, D] float32 L2-normalised class means (all data);
        temperature_ float; calibration_ str ("temperature", "fixed" or why none); n_features_in_ int.

    X rows are expected L2-normalised (every Cairn global descriptor is); they are used as given, so scores
    are cosines.
    """

    _ARRAYS = ("means",)

    def __init__(self, temperature: float | None = None, validation_fraction: float = 0.1, seed: int = 0):
        self.temperature = temperature
        self.validation_fraction = validation_fraction
        self.seed = seed

    @staticmethod
    def _class_means(X: np.ndarray, y_index: np.ndarray, rows: np.ndarray, n_classes: int) -> np.ndarray:
        """[C, D] float32 L2-normalised means of X[rows] per class (one sparse pass, no copy of X)."""
        indicator = sparse.csr_array((np.ones(len(rows), np.float32), (y_index[rows], rows)),
                                     shape=(n_classes, len(X)))
        sums = np.asarray(indicator @ X, dtype=np.float32)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        return sums / np.maximum(norms, np.float32(1e-12))

    def fit(self, X, y) -> NearestClassMean:
        """X [N, D] float32 L2-normalised descriptors, y [N] int64 labels (-1 allowed, >= 2 classes)."""
        X, y = _check_Xy(X, y)
        classes, y_index, counts = _encode(y)
        self.classes_, self.n_features_in_ = classes, X.shape[1]
        train, held = self._split(y_index, len(classes))
        self.means_ = self._class_means(X, y_index, train, len(classes))
        self._calibrate(X, y_index, held, counts)
        if len(held):
            self.means_ = self._class_means(X, y_index, np.arange(len(X)), len(classes))
        return self

    def _scores(self, X: np.ndarray) -> np.ndarray:
        return X @ self.means_.T


# ---------------------------------------------------------------------------------------------- softmax


def _adam(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, buf: np.ndarray | None,
          step: np.float32) -> None:
    """One Adam update of p in place (betas 0.9, 0.999; eps 1e-8); g is overwritten; buf a scratch like p."""
    m *= np.float32(0.9)
    m += np.float32(0.1) * g
    g *= g
    v *= np.float32(0.999)
    g *= np.float32(0.001)
    v += g
    buf = np.sqrt(v, out=buf)
    buf += np.float32(1e-8)
    np.divide(m, buf, out=buf)
    buf *= step
    p -= buf


def _adam_state(W: np.ndarray, b: np.ndarray) -> dict:
    """Adam's moments for the weights and biases, and a scratch buffer like W."""
    return {"mW": np.zeros_like(W), "vW": np.zeros_like(W), "buf": np.empty_like(W), "mb": np.zeros_like(b),
            "vb": np.zeros_like(b)}


def _sgd_step(xb: np.ndarray, yb: np.ndarray, W: np.ndarray, b: np.ndarray, state: dict,
              adjust: np.ndarray | None, lr: np.float32, wd: np.float32, t: int) -> float:
    """One mini-batch step of the softmax classifier (W, b and ``state`` updated in place, ``t`` the 1-based
    step number); returns the batch's summed cross-entropy."""
    n = len(yb)
    z = xb @ W.T
    z += b
    if adjust is not None:
        z += adjust
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)  # z is now P [n, C]
    p_true = z[np.arange(n), yb]
    loss = float(-np.log(np.maximum(p_true, 1e-30)).sum(dtype=np.float64))
    z[np.arange(n), yb] -= 1.0
    z *= np.float32(1.0 / n)  # dL/dlogits
    gW = z.T @ xb
    gb = z.sum(axis=0)
    step = lr * np.float32(math.sqrt(1.0 - 0.999 ** t) / (1.0 - 0.9 ** t))
    if wd > 0:  # decoupled weight decay (AdamW), on the weights only
        W *= 1 - lr * wd
    _adam(W, gW, state["mW"], state["vW"], state["buf"], step)
    _adam(b, gb, state["mb"], state["vb"], None, step)
    return loss


def softmax_step_seconds(batch: int, dim: int, classes: int, repeats: int = 3, seed: int = 0) -> float:
    """Seconds one training step of :class:`SoftmaxClassifier` takes on this machine at this shape (a batch of
    ``batch`` rows of ``dim`` features, ``classes`` classes): the median of ``repeats`` steps on random data,
    after one untimed step. `cairn plan` prices a classifier at the target's class count with it, since a
    sample's few classes say little about the BLAS speed at 13,000."""
    import time

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, dim), dtype=np.float32)
    y = rng.integers(0, classes, batch)
    W, b = np.zeros((classes, dim), np.float32), np.zeros(classes, np.float32)
    state = _adam_state(W, b)
    times = []
    for t in range(1, repeats + 2):
        started = time.perf_counter()
        _sgd_step(X, y, W, b, state, None, np.float32(1e-2), np.float32(1e-4), t)
        times.append(time.perf_counter() - started)
    return float(np.median(times[1:]))


class SoftmaxClassifier(_CalibratedLinear):
    """Multinomial logistic regression (linear softmax) trained with mini-batch Adam in numpy float32.

    logits = X @ coef_.T + intercept_; cross-entropy loss; decoupled weight decay (AdamW). Each step costs
    O(batch_size x D x C) in two BLAS matmuls; memory is O(D x C).

    Args:
        epochs: passes over the training part.
        batch_size: examples per step.
        learning_rate: Adam step size.
        weight_decay: decoupled weight decay per step (times learning_rate), on coef_ only.
        init: "ncm" (coef_ = the class means scaled by a temperature fitted on the training part, so training
            starts from the nearest-class-mean classifier and few epochs suffice) or "zeros".
        class_balance: tau of the logit-adjusted loss (Menon et al. 2021): training adds tau * log(prior) to
            the logits, prediction does not, which shifts decisions towards rare classes. 0 = plain
            cross-entropy (what GAP, which counts every query alike, usually prefers).
        validation_fraction: share of examples held out for calibration (see the module docstring).
        temperature: softmax temperature at prediction; None = fit it on the held-out split.
        seed: seed of the split, the shuffling and the init subsample.
        verbose: show a tqdm progress bar and log the loss per epoch.

    Attributes (after fit):
        classes_ [C] int64; coef_ [C, D] float32; intercept_ [C] float32; temperature_ float; calibration_
        str; loss_curve_ [epochs] float32 mean training loss per epoch; n_iter_ int epochs run;
        n_features_in_ int.
    """

    _ARRAYS = ("coef", "intercept", "loss_curve")

    def __init__(self, epochs: int = 5, batch_size: int = 1024, learning_rate: float = 1e-2,
                 weight_decay: float = 1e-4, init: str = "ncm", class_balance: float = 0.0,
                 validation_fraction: float = 0.1, temperature: float | None = None, seed: int = 0,
                 verbose: bool = False):
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.init = init
        self.class_balance = class_balance
        self.validation_fraction = validation_fraction
        self.temperature = temperature
        self.seed = seed
        self.verbose = verbose

    def _check_params(self) -> None:
        if self.init not in ("ncm", "zeros"):
            raise ValueError(f"init must be 'ncm' or 'zeros'; got {self.init!r}")
        if int(self.epochs) < 1 or int(self.batch_size) < 1:
            raise ValueError(f"epochs and batch_size must be >= 1; got {self.epochs} and {self.batch_size}")
        if not self.learning_rate > 0 or self.weight_decay < 0 or self.class_balance < 0:
            raise ValueError("learning_rate must be > 0, weight_decay and class_balance >= 0")

    def _init_weights(self, X: np.ndarray, y_index: np.ndarray, train: np.ndarray, C: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """coef_ = class means / T0 (init "ncm") or zeros, intercept_ = zeros.

        T0 is the temperature of the NCM classifier on the training part, fitted on leave-one-out scores of a
        subsample of its examples from classes with 2+ training examples (an example's own mean would make
        it look certain); INIT_TEMPERATURE when there are none.
        """
        D = X.shape[1]
        if self.init == "zeros":
            return np.zeros((C, D), np.float32), np.zeros(C, np.float32)
        indicator = sparse.csr_array((np.ones(len(train), np.float32), (y_index[train], train)), shape=(C, len(X)))
        sums = np.asarray(indicator @ X, dtype=np.float32)
        sum_norm = np.linalg.norm(sums, axis=1)
        means = sums / np.maximum(sum_norm, np.float32(1e-12))[:, None]
        n_train = np.bincount(y_index[train], minlength=C)
        eligible = train[n_train[y_index[train]] >= 2]
        t0 = INIT_TEMPERATURE
        if len(eligible):
            sub = rng.choice(eligible, size=min(len(eligible), MIN_CALIBRATION_ROWS), replace=False)
            xs, ys = X[sub], y_index[sub]
            scores = xs @ means.T
            own = np.einsum("nd,nd->n", xs, sums[ys])  # x . S_c
            xx = np.einsum("nd,nd->n", xs, xs)
            rest = np.sqrt(np.maximum(sum_norm[ys] ** 2 - 2 * own + xx, 1e-12))  # |S_c - x|
            scores[np.arange(len(sub)), ys] = (own - xx) / rest  # cos(x, mean of the class without x)
            t0 = fit_temperature(scores, ys, bounds=(1e-3, 1.0))
        return means * np.float32(1.0 / t0), np.zeros(C, np.float32)

    def fit(self, X, y) -> SoftmaxClassifier:
        """X [N, D] float32 descriptors, y [N] int64 labels (-1 allowed, >= 2 classes)."""
        from tqdm import tqdm

        self._check_params()
        X, y = _check_Xy(X, y)
        classes, y_index, counts = _encode(y)
        C, D = len(classes), X.shape[1]
        self.classes_, self.n_features_in_ = classes, D
        train, held = self._split(y_index, C)
        rng = np.random.default_rng(self.seed)
        W, b = self._init_weights(X, y_index, train, C, rng)

        adjust = None
        if self.class_balance > 0:
            prior = np.bincount(y_index[train], minlength=C).astype(np.float64) + 1e-12
            adjust = (self.class_balance * np.log(prior / prior.sum())).astype(np.float32)

        lr, wd = np.float32(self.learning_rate), np.float32(self.weight_decay)
        state = _adam_state(W, b)
        bs = int(self.batch_size)
        steps_per_epoch = math.ceil(len(train) / bs)
        t = 0
        losses = []
        bar = tqdm(total=int(self.epochs) * steps_per_epoch, desc="softmax SGD", unit="step",
                   disable=not self.verbose, leave=False)
        for epoch in range(int(self.epochs)):
            order = train[rng.permutation(len(train))]
            total = 0.0
            for lo in range(0, len(order), bs):
                rows = order[lo:lo + bs]
                t += 1
                total += _sgd_step(X[rows], y_index[rows], W, b, state, adjust, lr, wd, t)
                bar.update(1)
            losses.append(total / len(train))
            if self.verbose:
                log.info("softmax epoch %d/%d: training loss %.4f", epoch + 1, self.epochs, losses[-1])
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        self.coef_, self.intercept_ = W, b
        self.loss_curve_ = np.asarray(losses, np.float32)
        self._calibrate(X, y_index, held, counts)
        return self

    def _scores(self, X: np.ndarray) -> np.ndarray:
        s = X @ self.coef_.T
        s += self.intercept_
        return s

    @property
    def n_iter_(self) -> int:
        """Epochs run (one mean loss per epoch in loss_curve_)."""
        return len(self.loss_curve_)


# ---------------------------------------------------------------------------------------------- loading

CLASSIFIERS = {c.__name__: c for c in (NearestClassMean, SoftmaxClassifier)}


def load_classifier(path: str) -> _CalibratedLinear:
    """Load whichever classifier class ``path`` holds (NearestClassMean or SoftmaxClassifier)."""
    arrays, header = artifacts.load(path, KIND)
    name = header.get("config", {}).get("estimator")
    if name not in CLASSIFIERS:
        raise CairnError(f"{path} holds an unknown classifier {name!r}; known: {sorted(CLASSIFIERS)}")
    return CLASSIFIERS[name]._from_artifact(path, arrays, header)
