"""Geometric (spatial) verification of local-feature matches, and re-ranking of neighbours by it.

Two images show the same landmark when many of their local features match *and* agree on one geometric
transform. :func:`verify` does both steps for a pair of :class:`~features.local.LocalFeatures`:

1. :func:`match` pairs descriptors with an exact FAISS L2 search: Lowe's ratio test on the two nearest
   database descriptors, mutual nearest neighbours, or both. Nothing here is SIFT-specific: descriptors
   arrive as float32 rows (RootSIFT, DELF's 40-d PCA descriptors, ...), prepared by the caller.
2. :func:`estimate` fits a homography, affine or similarity transform from query to database keypoints with
   a robust estimator (OpenCV's MAGSAC++ or RANSAC) and returns the inlier mask.

:func:`rerank` turns the inlier counts of a query's top-k neighbours into new, monotone scores in [0, 1]
(verified neighbours first), so that a neighbour vote (``index.recognize.vote``) works on them unchanged;
:func:`rerank_query` verifies the candidates of one query and re-ranks them.

Estimator notes (OpenCV 4.14, checked):

* ``method="magsac"`` runs USAC with MAGSAC++ scoring and sigma-consensus local optimisation, the settings
  of the ``cv2.USAC_MAGSAC`` flag, passed as ``cv2.UsacParams`` so that ``seed`` is its random generator state
  (``cv2.setRNGSeed`` has no effect on USAC nor on RANSAC, and would be hidden global state).
* ``estimateAffinePartial2D`` (the similarity model) accepts only ``cv2.RANSAC``/``cv2.LMEDS``: with
  ``model="similarity"`` the method is always ``cv2.RANSAC`` (see :func:`effective_method`).
* ``cv2.RANSAC`` draws from an OpenCV-internal generator with a fixed seed: deterministic, ``seed`` unused.

All estimators are deterministic for a given input and config: two runs give identical results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import faiss
import numpy as np

from features.local import LocalFeatures
from pipeline.config import check_numbers

log = logging.getLogger(__name__)

MATCHERS = ("ratio", "mutual", "both")
MODELS = ("homography", "affine", "similarity")
METHODS = ("magsac", "ransac")
MIN_POINTS = {"homography": 4, "affine": 3, "similarity": 2}  # minimal sample of each model
TIE = 1e-3  # weight of the original similarity in re-ranked scores (see rerank)
MAX_SATURATION = 999  # (1 - TIE) / TIE: keeps every verified score >= every unverified one


@dataclass(frozen=True)
class VerifyConfig:
    """Matching and robust model fitting for one image pair."""

    matcher: str = "ratio"  # "ratio": Lowe's test on the 2 nearest; "mutual": mutual nearest neighbours; "both"
    ratio: float = 0.8  # ratio test: keep when dist(1st) < ratio * dist(2nd), on L2 distances (not squared)
    max_matches: int = 0  # keep at most this many matches, most distinctive first (0 = all)
    model: str = "homography"  # "homography" (findHomography), "affine" / "similarity" (estimateAffine[Partial]2D)
    method: str = "magsac"  # "magsac" (USAC MAGSAC++) or "ransac"; similarity always uses RANSAC (OpenCV 4.14)
    threshold: float = 8.0  # max reprojection error in database-image pixels at a long side of reference_side
    reference_side: int = 640  # verify() scales threshold by the database long side / this; 0 = absolute pixels
    max_iters: int = 2000  # robust estimator iterations at most
    confidence: float = 0.999  # robust estimator stops early once this sure of its best model
    min_inliers: int = 10  # a pair with fewer inliers is not verified
    seed: int = 0  # random generator state of the MAGSAC (USAC) estimator; RANSAC's is fixed by OpenCV

    def __post_init__(self):
        check_numbers(self)
        if self.matcher not in MATCHERS:
            raise ValueError(f"matcher {self.matcher!r} not in {MATCHERS}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio {self.ratio} must be in (0, 1]")
        if self.max_matches < 0:
            raise ValueError(f"max_matches {self.max_matches} must be >= 0 (0 = all)")
        if self.model not in MODELS:
            raise ValueError(f"model {self.model!r} not in {MODELS}")
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} not in {METHODS}")
        if not self.threshold > 0:
            raise ValueError(f"threshold {self.threshold} must be > 0")
        if self.reference_side < 0:
            raise ValueError(f"reference_side {self.reference_side} must be >= 0 (0 = absolute pixels)")
        if self.max_iters < 1:
            raise ValueError(f"max_iters {self.max_iters} must be >= 1")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence {self.confidence} must be in (0, 1)")
        if self.min_inliers < 1:
            raise ValueError(f"min_inliers {self.min_inliers} must be >= 1")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed {self.seed} must be in [0, 2**31)")


def effective_method(config: VerifyConfig) -> str:
    """The robust estimator actually run: "magsac" or "ransac" (similarity supports only RANSAC in OpenCV)."""
    return "ransac" if config.model == "similarity" else config.method


def pixel_threshold(config: VerifyConfig, width: int, height: int) -> float:
    """The reprojection threshold in pixels of a database image of ``width x height``.

    ``threshold * max(width, height) / reference_side`` (8 px at 640 px, 16 px at 1280 px), so that a pair is
    judged alike whatever size the images were decoded at; ``threshold`` itself when ``reference_side`` is 0
    or the size is unknown (0).
    """
    side = max(int(width), int(height))
    if config.reference_side == 0 or side <= 0:
        return float(config.threshold)
    return float(config.threshold) * side / config.reference_side


def _as_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be [N, D], got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _search(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 search; D are squared distances (clipped at 0: BLAS rounding can make them slightly negative)."""
    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(xb)
    D, I = index.search(xq, k)
    return np.maximum(D, 0), I


def match(desc_q: np.ndarray, desc_d: np.ndarray, config: VerifyConfig = VerifyConfig()) -> np.ndarray:
    """Tentative correspondences between two descriptor sets, by exact (FAISS flat L2) nearest neighbours.

    Every query descriptor proposes its nearest database descriptor (several may propose the same one).
    ``"ratio"`` keeps it when ``d1 < ratio * d2`` (d1, d2: L2 distances to the nearest and second-nearest
    database descriptors; FAISS returns squared distances, so ``d1² < ratio² * d2²`` is what is compared).
    Equal distances (an exact tie, duplicates) fail. When the database set has a single descriptor there is no
    second neighbour: d2 = inf and the ratio test passes. ``"mutual"`` keeps it when the query descriptor is
    also the nearest query descriptor of its match (ties resolved by FAISS: lowest index). ``"both"`` needs both.
    With ``max_matches`` > 0 the most distinctive ones are kept (smallest d1/d2 with a ratio test, else
    smallest d1).

    Args:
        desc_q: [N, D] float32 query descriptors.
        desc_d: [M, D] float32 database descriptors.
    Returns:
        [P, 2] int64 (query index, database index) pairs, sorted by query index; [0, 2] when N or M is 0.
    """
    xq, xb = _as_rows(desc_q), _as_rows(desc_d)
    if xq.shape[1] != xb.shape[1]:
        raise ValueError(f"descriptor dimensions differ: {xq.shape[1]} vs {xb.shape[1]}")
    if len(xq) == 0 or len(xb) == 0:
        return np.zeros((0, 2), np.int64)
    D, I = _search(xb, xq, min(2, len(xb)))
    nn = I[:, 0].astype(np.int64)
    d1 = D[:, 0].astype(np.float64)
    d2 = D[:, 1].astype(np.float64) if D.shape[1] > 1 else np.full(len(xq), np.inf)
    d2[I[:, -1] < 0] = np.inf  # no second neighbour (FAISS pads with -1)
    keep = nn >= 0
    if config.matcher in ("ratio", "both"):
        keep &= d1 < config.ratio**2 * d2
    if config.matcher in ("mutual", "both"):
        _, back = _search(xq, xb, 1)
        keep &= back[nn, 0] == np.arange(len(xq))
    q = np.flatnonzero(keep)
    if config.max_matches and len(q) > config.max_matches:
        if config.matcher == "mutual":
            key = d1[q]
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                key = np.where(np.isinf(d2[q]), 0.0, d1[q] / d2[q])
        q = np.sort(q[np.argsort(key, kind="stable")[: config.max_matches]])
    return np.stack([q.astype(np.int64), nn[q]], axis=1)


def _usac_params(config: VerifyConfig, threshold: float) -> cv2.UsacParams:
    """The settings of OpenCV's ``USAC_MAGSAC`` flag (calib3d/src/usac/ransac_solvers.cpp), plus a seed."""
    params = cv2.UsacParams()
    params.threshold = threshold
    params.confidence = config.confidence
    params.maxIterations = config.max_iters
    params.sampler = cv2.SAMPLING_UNIFORM
    params.score = cv2.SCORE_METHOD_MAGSAC
    params.loMethod = cv2.LOCAL_OPTIM_SIGMA
    homography = config.model == "homography"
    params.loSampleSize = 75 if homography else 50
    params.loIterations = 15 if homography else 10
    params.final_polisher = cv2.MAGSAC
    params.isParallel = False
    params.randomGeneratorState = config.seed
    return params


def _fit(src: np.ndarray, dst: np.ndarray, config: VerifyConfig, threshold: float):
    method = effective_method(config)
    if method == "magsac":
        params = _usac_params(config, threshold)
        if config.model == "homography":
            return cv2.findHomography(src, dst, params)
        return cv2.estimateAffine2D(src, dst, params)
    if config.model == "homography":
        return cv2.findHomography(src, dst, cv2.RANSAC, threshold, maxIters=config.max_iters,
                                  confidence=config.confidence)
    fit = cv2.estimateAffine2D if config.model == "affine" else cv2.estimateAffinePartial2D
    return fit(src, dst, method=cv2.RANSAC, ransacReprojThreshold=threshold, maxIters=config.max_iters,
               confidence=config.confidence)


def estimate(pts_q: np.ndarray, pts_d: np.ndarray, config: VerifyConfig = VerifyConfig(),
             threshold: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Robustly fit ``config.model`` mapping query points onto database points.

    Args:
        pts_q: [P, 2] float32 (x, y) query keypoints of the tentative matches.
        pts_d: [P, 2] float32 (x, y) database keypoints, row i matched with pts_q row i.
        threshold: reprojection threshold in database pixels; ``config.threshold`` when None
            (:func:`verify` passes :func:`pixel_threshold`).
    Returns:
        inliers [P] bool, and the model: [3, 3] float64 homography or [2, 3] float64 affine / similarity
        (``x_d ~ model @ [x_q, y_q, 1]``), or None when no model was found. Fewer finite points than the
        model's minimal sample (4 / 3 / 2), degenerate configurations (coincident or collinear points) and
        OpenCV errors give no inliers and None; they never raise.
    """
    pts_q = np.asarray(pts_q, np.float32).reshape(-1, 2)
    pts_d = np.asarray(pts_d, np.float32).reshape(-1, 2)
    if len(pts_q) != len(pts_d):
        raise ValueError(f"{len(pts_q)} query points vs {len(pts_d)} database points")
    inliers = np.zeros(len(pts_q), bool)
    finite = np.flatnonzero(np.isfinite(pts_q).all(axis=1) & np.isfinite(pts_d).all(axis=1))
    if len(finite) < MIN_POINTS[config.model]:
        return inliers, None
    src = np.ascontiguousarray(pts_q[finite])
    dst = np.ascontiguousarray(pts_d[finite])
    try:
        model, mask = _fit(src, dst, config, float(config.threshold if threshold is None else threshold))
    except cv2.error as e:  # degenerate input some estimators reject instead of returning None
        log.debug("robust estimation failed on %d points: %s", len(src), e)
        return inliers, None
    if model is None or mask is None or not np.all(np.isfinite(model)):
        return inliers, None
    inliers[finite] = np.asarray(mask).reshape(-1).astype(bool)
    if not inliers.any():
        return inliers, None
    return inliers, np.asarray(model, np.float64)


@dataclass
class Verification:
    """The outcome of verifying one (query, database) image pair."""

    matches: int  # tentative correspondences (after the matcher)
    inliers: int  # correspondences consistent with the model
    model: np.ndarray | None  # [3, 3] or [2, 3] float64 query -> database transform; None when none found
    inlier_pairs: np.ndarray  # [I, 2] int64 (query keypoint index, database keypoint index)
    verified: bool = False  # inliers >= config.min_inliers


def verify(q: LocalFeatures, d: LocalFeatures, config: VerifyConfig = VerifyConfig(),
           desc_q: np.ndarray | None = None, desc_d: np.ndarray | None = None) -> Verification:
    """Match ``q`` against ``d`` and fit the model (query -> database image); see the module docstring.

    ``desc_q`` / ``desc_d`` ([N, D] / [M, D] float32, rows aligned with the keypoints) replace the descriptors
    of ``q`` / ``d``, e.g. RootSIFT prepared once by the caller; otherwise the stored descriptors are used as
    float32. The reprojection threshold is :func:`pixel_threshold` of the database image.
    """
    xq = q.descriptors if desc_q is None else desc_q
    xb = d.descriptors if desc_d is None else desc_d
    if len(xq) != len(q) or len(xb) != len(d):
        raise ValueError(f"descriptors ({len(xq)}, {len(xb)}) do not align with keypoints ({len(q)}, {len(d)})")
    pairs = match(np.asarray(xq, np.float32), np.asarray(xb, np.float32), config)
    inliers, model = estimate(q.keypoints[pairs[:, 0]], d.keypoints[pairs[:, 1]], config,
                              pixel_threshold(config, d.width, d.height))
    n = int(inliers.sum())
    return Verification(matches=len(pairs), inliers=n, model=model, inlier_pairs=pairs[inliers],
                        verified=n >= config.min_inliers)


@dataclass(frozen=True)
class RerankConfig:
    """Geometric re-ranking of a query's nearest neighbours."""

    top_k: int = 20  # neighbours verified (and re-ranked) per query; the rest keep their order after them
    saturation: int = 40  # inlier count at which a verified neighbour's score reaches 1 (<= 999, see rerank)
    verify: VerifyConfig = field(default_factory=VerifyConfig)  # matching and model fitting per pair

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k {self.top_k} must be >= 1")
        if not self.verify.min_inliers <= self.saturation <= MAX_SATURATION:
            raise ValueError(f"saturation {self.saturation} must be in [min_inliers={self.verify.min_inliers}, "
                             f"{MAX_SATURATION}]")


def rerank(scores: np.ndarray, inliers: np.ndarray,
           config: RerankConfig = RerankConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank one query's neighbours by their inlier counts.

    With ``s`` = clip(score, 0, 1) (NaN -> 0), ``n`` = inliers, ``w`` = ``TIE`` = 1e-3, ``S`` = saturation and
    ``t = min(top_k, K)``, each neighbour falls in one of three bands, ranked in this order:

    1. verified (among the first t, ``n >= min_inliers``): score ``(1 - w) * min(n, S) / S + w * s``, ordered
       by ``min(n, S)`` descending, then by original rank (beyond saturation the similarity decides);
    2. unverified among the first t: score ``w * s``, original order;
    3. beyond the first t (never verified; their inliers are ignored): score ``w**2 * s``, original order.

    Band 1 scores are >= (1 - w) / S >= w (S <= 999), band 2 scores <= w and band 3 scores <= w * (band 2
    scores) since the input is best first, so the new scores are non-increasing along the new order and lie in
    [0, 1]; a vote (``index.recognize.vote``) on them is dominated by verified neighbours, weighted by inliers.

    Args:
        scores: [K] float32 similarities, best first (non-increasing).
        inliers: [K] int inlier counts (only the first t are read).
    Returns:
        order [K] int64 (new rank -> original position) and new_scores [K] float32 aligned with ``order``
        (apply ``I[order]``, ``labels[order]``).
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    inliers = np.asarray(inliers).reshape(-1)
    if len(inliers) != len(scores):
        raise ValueError(f"{len(scores)} scores vs {len(inliers)} inlier counts")
    s = np.clip(np.nan_to_num(scores, nan=0.0), 0.0, 1.0)
    if np.any(np.diff(s) > 0):
        raise ValueError("scores must be sorted best first")
    K = len(s)
    t = min(config.top_k, K)
    head = np.arange(t)
    n = np.minimum(inliers[:t].astype(np.int64), config.saturation)
    ok = inliers[:t] >= config.verify.min_inliers
    ver = head[ok][np.lexsort((head[ok], -n[ok]))]  # last key is primary: capped inliers desc, then rank
    unver = head[~ok]
    order = np.concatenate([ver, unver, np.arange(t, K)]).astype(np.int64)
    new = np.empty(K, np.float64)
    new[: len(ver)] = (1 - TIE) * n[ver] / config.saturation + TIE * s[ver]
    new[len(ver): t] = TIE * s[unver]
    new[t:] = TIE**2 * s[t:]
    return order, new.astype(np.float32)


def rerank_query(query: LocalFeatures, candidates: Sequence[LocalFeatures | None], scores: np.ndarray,
                 config: RerankConfig = RerankConfig(),
                 prepare: Callable[[np.ndarray], np.ndarray] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Verify one query against its first ``top_k`` candidates and re-rank them (:func:`rerank`).

    Args:
        query: the query's local features.
        candidates: K neighbours' local features, aligned with ``scores``; None (features missing or
            unreadable) counts as 0 inliers.
        scores: [K] float32 similarities, best first.
        prepare: optional descriptors -> [N, D] float32 descriptors (e.g. RootSIFT), applied to the query once
            and to each verified candidate.
    Returns:
        order [K] int64, new_scores [K] float32 (see :func:`rerank`), inliers [K] int64 in the original order
        (0 beyond top_k).
    """
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates vs {len(scores)} scores")
    prep = prepare or (lambda x: np.asarray(x, np.float32))
    desc_q = prep(query.descriptors)
    inliers = np.zeros(len(candidates), np.int64)
    for i, cand in enumerate(candidates[: config.top_k]):
        if cand is not None:
            inliers[i] = verify(query, cand, config.verify, desc_q, prep(cand.descriptors)).inliers
    order, new_scores = rerank(scores, inliers, config)
    return order, new_scores, inliers
