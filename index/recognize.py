"""Recognition from neighbours: each query's landmark and confidence from its k nearest database images.

Votes: each of the top-k neighbours votes for its landmark with its similarity (clipped at 0). A class scores
the sum of its votes (``aggregate="sum"``) or its best one (``"max"``). For the long tail, a class's sum can be
divided by ``min(n_c, k) ** class_norm`` (n_c = its database images): a landmark with 2 photos cannot put 10 in
the top 10, so without it frequent landmarks win by number. Scores are scaled into [0, 1]: the sum by
``k ** (1 - class_norm) * min(n_c, k) ** class_norm``.

No landmark: most queries in Google Landmark Recognition show none, and GAP punishes confident wrong answers.
- Neighbours without a landmark (known non-landmark database images) vote for "no landmark" when
  ``nonlandmark_votes`` is on; when that wins, the query gets no prediction.
- The penalty of the GLR 2019/2020 winning solutions: the mean similarity of the query to its
  ``nonlandmark_k`` nearest known non-landmark images, times ``nonlandmark_weight`` (w), is subtracted from the
  confidence, so that queries that look like clutter sink to the bottom of the GAP ranking. The result is
  mapped back into [0, 1] as ``(score - w * sim + w) / (1 + w)``.
- Below ``min_confidence`` the query gets no prediction.
:func:`tune` chooses these on a validation split of the database (held-out landmark images and held-out
non-landmark images as queries): aggregate, class_norm and the penalty weight by GAP, then the threshold by
accuracy among the thresholds that do not cost GAP (dropping a right answer lowers GAP; dropping a wrong one
at the bottom of the ranking does not).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

log = logging.getLogger(__name__)
NO_LANDMARK = -1
VOTE_CHUNK = 8192  # queries voted at once


@dataclass(frozen=True)
class VoteConfig:
    """How neighbours become a prediction."""

    k: int = 10  # neighbours that vote
    min_confidence: float = 0.0  # below this the query gets no prediction
    aggregate: str = "sum"  # a class's score: "sum" or "max" of its neighbours' similarities
    class_norm: float = 0.0  # divide a class's sum by min(n_c, k) ** class_norm (0 = off, 1 = mean)
    nonlandmark_votes: bool = True  # non-landmark neighbours vote for "no landmark"
    nonlandmark_k: int = 5  # known non-landmark images whose mean similarity is the penalty
    nonlandmark_weight: float = 0.0  # confidence -= weight * that similarity (0 = no penalty)

    def __post_init__(self):
        if self.k < 1 or self.nonlandmark_k < 1:
            raise ValueError("k and nonlandmark_k must be >= 1")
        if self.aggregate not in ("sum", "max"):
            raise ValueError(f"aggregate must be 'sum' or 'max', not {self.aggregate!r}")
        if not 0 <= self.class_norm <= 1:
            raise ValueError(f"class_norm must be in [0, 1], not {self.class_norm}")
        if self.nonlandmark_weight < 0:
            raise ValueError(f"nonlandmark_weight must be >= 0, not {self.nonlandmark_weight}")


def class_counts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted landmark ids, database images of each) of a database's labels (-1 left out)."""
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    return ids, counts


def class_scores(D: np.ndarray, labels: np.ndarray, config: VoteConfig,
                 counts: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """[Q, k] score of the class of each of the first k neighbours (every position of a class holds the same
    score; -inf for missing neighbours)."""
    k = min(config.k, D.shape[1])
    D, labels = D[:, :k], labels[:, :k]
    valid = np.isfinite(D)
    sims = np.where(valid, np.maximum(D, 0.0), 0.0).astype(np.float32)
    same = (labels[:, :, None] == labels[:, None, :]) & valid[:, None, :]  # [Q, k, k]
    if config.aggregate == "max":
        scores = np.max(np.where(same, sims[:, None, :], 0.0), axis=2)
    else:
        scores = np.einsum("qij,qj->qi", same.astype(np.float32), sims)
        if config.class_norm > 0 and counts is not None:
            n_c = np.full(labels.shape, float(k))
            ids, cnt = counts
            pos = np.clip(np.searchsorted(ids, labels), 0, max(len(ids) - 1, 0))
            found = (labels >= 0) & (len(ids) > 0) & (ids[pos] == labels if len(ids) else False)
            n_c[found] = np.minimum(cnt[pos[found]], k)
            scores = scores / (k ** (1 - config.class_norm) * n_c ** config.class_norm)
        else:
            scores = scores / k
    return np.where(valid, scores, -np.inf).astype(np.float32)


def vote(D: np.ndarray, labels: np.ndarray, config: VoteConfig = VoteConfig(),
         nonlandmark_sim: np.ndarray | None = None, counts: tuple[np.ndarray, np.ndarray] | None = None,
         ) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour votes, vectorised over queries.

    Args:
        D: [Q, K] float32 similarities, best first (K >= config.k; only the first k vote).
        labels: [Q, K] int64 landmark ids of the neighbours (-1 = no landmark or no neighbour).
        nonlandmark_sim: [Q] float32 mean similarity to the nearest known non-landmark images (None = 0).
        counts: :func:`class_counts` of the database (needed for class_norm).
    Returns:
        pred [Q] int64 landmark id (-1 = no prediction), conf [Q] float32 (0 where no prediction).
    """
    Q = len(D)
    if Q > VOTE_CHUNK:  # bounded memory: the class scores take [chunk, k, k]
        parts = [vote(D[lo:lo + VOTE_CHUNK], labels[lo:lo + VOTE_CHUNK], config,
                      None if nonlandmark_sim is None else nonlandmark_sim[lo:lo + VOTE_CHUNK], counts)
                 for lo in range(0, Q, VOTE_CHUNK)]
        return np.concatenate([p for p, _ in parts]), np.concatenate([c for _, c in parts])
    pred = np.full(Q, NO_LANDMARK, np.int64)
    conf = np.zeros(Q, np.float32)
    if Q == 0 or D.shape[1] == 0:
        return pred, conf
    k = min(config.k, D.shape[1])
    labels = labels[:, :k]
    scores = class_scores(D, labels, config, counts)
    landmark = np.where(labels >= 0, scores, -np.inf)
    best = np.argmax(landmark, axis=1)  # the first position of the best class: ties go to the class seen first
    rows = np.arange(Q)
    top = landmark[rows, best]
    ok = np.isfinite(top) & (top > 0)
    if config.nonlandmark_votes:
        nl = np.where(labels < 0, scores, -np.inf).max(axis=1)
        ok &= ~(nl > top)  # "no landmark" wins
    c = top.copy()
    if nonlandmark_sim is not None and config.nonlandmark_weight > 0:
        # subtract the penalty, then map back into [0, 1] (score and similarity are both in [0, 1]): the
        # order is that of the subtraction, without the ties that clipping at 0 would make
        w = config.nonlandmark_weight
        c = (c - w * np.clip(np.asarray(nonlandmark_sim, np.float32), 0, 1) + w) / (1 + w)
    ok &= c >= config.min_confidence
    pred[ok] = labels[rows[ok], best[ok]]
    conf[ok] = c[ok]
    return pred, conf


def nonlandmark_similarity(D: np.ndarray, k: int) -> np.ndarray:
    """[Q] mean of the first k similarities of [Q, K] (missing ones count as 0)."""
    D = D[:, :k]
    return np.where(np.isfinite(D), np.maximum(D, 0), 0).sum(axis=1).astype(np.float32) / max(k, 1)


# ---------------------------------------------------------------------------------------------------------------
# Tuning on a validation split


@dataclass(frozen=True)
class TuneConfig:
    """Tuning the no-landmark handling on held-out database images."""

    enabled: bool = True  # tune when the database holds known non-landmark images
    landmark_queries: int = 2000  # held-out landmark images (one per class, from classes with enough images)
    min_class_images: int = 3  # a class gives a held-out image only when it has at least this many
    nonlandmark_share: float = 0.5  # share of the known non-landmark images held out as no-landmark queries
    weights: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # penalty weights tried
    class_norms: tuple[float, ...] = (0.0, 0.5, 1.0)  # class normalisations tried (sum)
    aggregates: tuple[str, ...] = ("sum", "max")  # aggregations tried
    gap_tolerance: float = 0.005  # the no-landmark threshold may cost at most this much validation GAP
    seed: int = 0  # the held-out choice

    def __post_init__(self):
        if not 0 < self.nonlandmark_share < 1:
            raise ValueError(f"nonlandmark_share must be in (0, 1), not {self.nonlandmark_share}")
        if self.landmark_queries < 1 or self.min_class_images < 2:
            raise ValueError("landmark_queries must be >= 1 and min_class_images >= 2")


def validation_split(labels: np.ndarray, config: TuneConfig) -> tuple[np.ndarray, np.ndarray]:
    """(landmark rows, non-landmark rows) of the database held out as validation queries."""
    rng = np.random.default_rng(config.seed)
    ids, counts = class_counts(labels)
    eligible = ids[counts >= config.min_class_images]
    chosen = rng.permutation(eligible)[:config.landmark_queries]
    order = rng.permutation(len(labels))
    first = {}
    for r in order:  # one random image of each chosen class
        lab = int(labels[r])
        if lab >= 0 and lab not in first:
            first[lab] = r
    lm_rows = np.sort(np.array([first[int(c)] for c in chosen], np.int64))
    nl = np.nonzero(labels < 0)[0]
    take = min(int(round(len(nl) * config.nonlandmark_share)), max(len(lm_rows), 1))
    nl_rows = np.sort(rng.permutation(nl)[:take]) if len(nl) >= 2 else np.empty(0, np.int64)
    return lm_rows, nl_rows


def drop_held_out(D: np.ndarray, I: np.ndarray, held_out: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k neighbours of each row that are not in ``held_out`` (ids); padded with -inf / -1."""
    keep = (I >= 0) & ~np.isin(I, held_out)
    Q = len(D)
    D2 = np.full((Q, k), -np.inf, np.float32)
    I2 = np.full((Q, k), -1, np.int64)
    rank = np.cumsum(keep, axis=1) - 1
    sel = keep & (rank < k)
    q, j = np.nonzero(sel)
    D2[q, rank[sel]] = D[q, j]
    I2[q, rank[sel]] = I[q, j]
    return D2, I2


def gap_score(pred: np.ndarray, conf: np.ndarray, truth: np.ndarray) -> float:
    """GAP of predictions (-1 = none) against truth (-1 = no landmark); ties broken by query order."""
    m = int((truth >= 0).sum())
    if m == 0:
        return 0.0
    order = np.argsort(-conf, kind="stable")
    made = pred[order] >= 0
    correct = (pred[order] == truth[order]) & made
    ranks = np.cumsum(made)
    hits = np.cumsum(correct)
    return float(np.sum(np.where(correct, hits / np.maximum(ranks, 1), 0.0)) / m)


def accuracy_score(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(pred == truth)) if len(truth) else 0.0


def tune(D: np.ndarray, labels: np.ndarray, truth: np.ndarray, nonlandmark_sim: np.ndarray | None,
         base: VoteConfig, config: TuneConfig = TuneConfig(), counts=None) -> tuple[VoteConfig, dict]:
    """Choose aggregate, class_norm and nonlandmark_weight by validation GAP, then min_confidence by validation
    accuracy. ``D``/``labels`` [V, K]: the validation queries' neighbours (held-out images removed); ``truth`` [V]
    (-1 = no landmark). Returns (the tuned config, a record of what was tried and reached)."""
    untuned_pred, untuned_conf = vote(D, labels, base, nonlandmark_sim, counts)
    record = {"queries": int(len(truth)), "landmark_queries": int((truth >= 0).sum()),
              "untuned": {"gap": gap_score(untuned_pred, untuned_conf, truth),
                          "accuracy": accuracy_score(untuned_pred, truth)}}
    weights = config.weights if nonlandmark_sim is not None else (0.0,)
    best, best_gap, tried = base, -1.0, []
    for aggregate in config.aggregates:
        for norm in (config.class_norms if aggregate == "sum" else (0.0,)):
            for w in weights:
                candidate = replace(base, aggregate=aggregate, class_norm=norm, nonlandmark_weight=w,
                                    min_confidence=0.0)
                pred, conf = vote(D, labels, candidate, nonlandmark_sim, counts)
                g = gap_score(pred, conf, truth)
                tried.append({"aggregate": aggregate, "class_norm": norm, "nonlandmark_weight": w, "gap": g})
                if g > best_gap + 1e-9:
                    best, best_gap = candidate, g
    pred, conf = vote(D, labels, best, nonlandmark_sim, counts)
    thresholds = np.unique(np.concatenate([[0.0], conf[pred >= 0]]))
    best_t, best_acc = 0.0, -1.0
    for t in thresholds:  # a prediction is kept when conf >= t; a threshold may not cost GAP (beyond 0.005)
        p = np.where(conf >= t, pred, NO_LANDMARK)
        if gap_score(p, np.where(p >= 0, conf, 0), truth) < best_gap - config.gap_tolerance:
            break  # higher thresholds only drop more predictions
        acc = accuracy_score(p, truth)
        if acc > best_acc + 1e-9:
            best_t, best_acc = float(t), acc
    tuned = replace(best, min_confidence=float(np.floor(best_t * 1e6) / 1e6))  # never above a kept confidence
    pred, conf = vote(D, labels, tuned, nonlandmark_sim, counts)
    record["tuned"] = {"gap": gap_score(pred, conf, truth), "accuracy": accuracy_score(pred, truth),
                       "aggregate": tuned.aggregate, "class_norm": tuned.class_norm,
                       "nonlandmark_weight": tuned.nonlandmark_weight, "min_confidence": tuned.min_confidence}
    record["tried"] = tried
    log.info("recognize: tuned on %d validation queries: GAP %.3f -> %.3f, accuracy %.3f -> %.3f (%s)",
             len(truth), record["untuned"]["gap"], record["tuned"]["gap"], record["untuned"]["accuracy"],
             record["tuned"]["accuracy"], {k: v for k, v in record["tuned"].items() if k not in ("gap", "accuracy")})
    return tuned, record
