"""Recognition from neighbours: each query's landmark and confidence from its k nearest database images.

A class's score (one of two rules):
- ``rule="vote"``: each of the top-k neighbours votes for its landmark with its similarity (clipped at 0). A
  class scores the sum of its votes (``aggregate="sum"``) or its best one (``"max"``; with no margin, penalty or
  threshold this is the plain top-1 rule: the nearest neighbour's landmark, its similarity as confidence). For
  the long tail, a class's sum can be divided by ``min(n_c, k) ** class_norm`` (n_c = its database images): a
  landmark with 2 photos cannot put 10 in the top 10, so without it frequent landmarks win by number. Scores are
  scaled into [0, 1]: the sum by ``k ** (1 - class_norm) * min(n_c, k) ** class_norm``.
- ``rule="verified"`` (methods that re-rank by spatial verification): each verified neighbour of a class gives
  ``sigmoid(a * log(1 + inliers) + b * similarity + c)``, a probability that the class is right fitted on
  validation queries (:func:`fit_calibration`, ``a, b >= 0``: more inliers or a closer neighbour never lowers
  it), or without a calibration its similarity alone (the unverified top-1 rule); a class scores its best
  neighbour. A raw inlier count is a poor confidence (facades of other buildings
  collect inliers too); the fit learns how many inliers mean a match, and how much the similarity adds.

The confidence of the best class, ``s``, then loses (all terms in [0, 1], mapped back into [0, 1]):
- ``margin`` (m) times the score of the best *other* class, ``o``: a query whose two best classes score alike
  is ambiguous, and one of a landmark the database does not have often is;
- ``nonlandmark_weight`` (w) times the mean similarity of the query to its ``nonlandmark_k`` nearest known
  non-landmark images, ``p`` (the penalty of the GLR 2019/2020 winning solutions: queries that look like
  clutter sink to the bottom of the GAP ranking);
giving ``(s - m * o - w * p + m + w) / (1 + m + w)``. Neighbours without a landmark (known non-landmark
database images) vote for "no landmark" when ``nonlandmark_votes`` is on; when that wins, the query gets no
prediction. Below ``min_confidence`` the query gets no prediction.

:func:`tune` chooses these on validation queries made from the database itself (:func:`validation_split`), so
that the validation set looks like real queries, most of which show no landmark the database has:
- held-out landmark images (several per class when classes are few, up to a budget when they are many);
- unseen-landmark queries: the same held-out images again, with every image of their own class removed from
  their neighbour lists, so that each is a query of a landmark the database does not have (no extra images,
  no second index);
- held-out known non-landmark images, when the database has some.
The confidence function is chosen by validation GAP among the candidates (the plain top-1 rule first, so tuning
never loses to it on validation; then the votes, margins, penalties and, for verified methods, the calibrated
inliers); then ``min_confidence`` by validation accuracy, with the landmark and the no-landmark validation
queries weighted as ``1 - nonlandmark_prior`` and ``nonlandmark_prior`` (the share of queries expected to show
no database landmark), weighed against validation GAP (``gap_weight``: dropping a right answer lowers GAP;
dropping a wrong one does not). Once the queries have their answers, :func:`query_threshold` fits the threshold
to them instead (``threshold_from="queries"``): the validation's unseen landmarks are the database's own, and a
real one can look much more like the database.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace

import numpy as np

from pipeline.config import check_numbers

log = logging.getLogger(__name__)
NO_LANDMARK = -1
VOTE_CHUNK = 8192  # queries voted at once
SIMILARITY_ONLY = ()  # a "verified" rule without calibration: the best verified neighbour's similarity


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
    margin: float = 0.0  # confidence -= margin * the best other class's score (0 = off)
    rule: str = "vote"  # "vote" (similarities) or "verified" (calibrated inliers; needs spatial verification)
    calibration: tuple[float, ...] = ()  # rule "verified": (a, b, c) of sigmoid(a log(1 + inliers) + b sim + c);
    # () = the similarity itself

    def __post_init__(self):
        check_numbers(self)
        if self.k < 1 or self.nonlandmark_k < 1:
            raise ValueError("k and nonlandmark_k must be >= 1")
        if self.aggregate not in ("sum", "max"):
            raise ValueError(f"aggregate must be 'sum' or 'max', not {self.aggregate!r}")
        if not 0 <= self.class_norm <= 1:
            raise ValueError(f"class_norm must be in [0, 1], not {self.class_norm}")
        if self.nonlandmark_weight < 0:
            raise ValueError(f"nonlandmark_weight must be a finite number >= 0, not {self.nonlandmark_weight}")
        if not 0 <= self.margin <= 1:
            raise ValueError(f"margin must be in [0, 1], not {self.margin}")
        if not 0 <= self.min_confidence <= 1:
            raise ValueError(f"min_confidence must be in [0, 1], not {self.min_confidence}")
        if self.rule not in ("vote", "verified"):
            raise ValueError(f"rule must be 'vote' or 'verified', not {self.rule!r}")
        if self.calibration and (self.rule != "verified" or len(self.calibration) != 3
                                 or not all(np.isfinite(self.calibration)) or min(self.calibration[:2]) < 0):
            raise ValueError(f"calibration is (a, b, c), finite, a and b >= 0, for rule 'verified' only; got "
                             f"{self.calibration!r}")


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
    # each neighbour's class total (or best) over the neighbours of its query with the same label, by sorting
    # (query, label) pairs: O(Q k log k) time and O(Q k) memory, where comparing every pair took [Q, k, k]
    # (``--k 100000`` asked for 186 GiB); missing neighbours add 0
    Q = len(labels)
    flat = labels.ravel()
    rows = np.repeat(np.arange(Q), k)
    order = np.lexsort((flat, rows))
    starts = np.ones(len(order), bool)
    starts[1:] = (flat[order][1:] != flat[order][:-1]) | (rows[order][1:] != rows[order][:-1])
    group = np.empty(len(order), np.int64)
    group[order] = np.cumsum(starts) - 1
    reduce = np.maximum if config.aggregate == "max" else np.add
    per_class = reduce.reduceat(sims.ravel()[order], np.flatnonzero(starts)) if len(order) else sims.ravel()
    scores = per_class[group].reshape(labels.shape)
    if config.aggregate == "sum":
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


def calibrated(inliers: np.ndarray, sims: np.ndarray, calibration) -> np.ndarray:
    """sigmoid(a * log(1 + inliers) + b * similarity + c), elementwise (inliers < 0, i.e. unverified, count 0);
    the similarity itself (clipped into [0, 1]) for ``calibration`` ()."""
    if not len(calibration):
        return np.clip(np.nan_to_num(sims, neginf=0.0), 0, 1).astype(np.float32)
    a, b, c = (float(v) for v in calibration)
    z = a * np.log1p(np.maximum(inliers, 0).astype(np.float64)) + b * np.clip(np.nan_to_num(sims, neginf=0.0), 0, 1) + c
    return (1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))).astype(np.float32)


def verified_scores(D: np.ndarray, labels: np.ndarray, inliers: np.ndarray, config: VoteConfig) -> np.ndarray:
    """[Q, K] rule "verified": the calibrated probability of each neighbour's class from the class's best inlier
    count and best similarity among its verified neighbours (the features :func:`fit_calibration` fits), at each
    of its positions (-inf for missing or unverified neighbours). ``D``: the global similarities, aligned with
    ``labels`` and ``inliers`` (inliers -1 = not verified)."""
    valid = np.isfinite(D) & (inliers >= 0)
    same = (labels[:, :, None] == labels[:, None, :]) & valid[:, None, :]
    best_inliers = np.max(np.where(same, np.maximum(inliers, 0)[:, None, :], 0), axis=2)
    best_sims = np.max(np.where(same, np.clip(np.nan_to_num(D, neginf=0.0), 0, 1)[:, None, :], 0.0), axis=2)
    scores = calibrated(best_inliers, best_sims, config.calibration)
    return np.where(valid, scores, -np.inf).astype(np.float32)


def vote(D: np.ndarray, labels: np.ndarray, config: VoteConfig = VoteConfig(),
         nonlandmark_sim: np.ndarray | None = None, counts: tuple[np.ndarray, np.ndarray] | None = None,
         inliers: np.ndarray | None = None, threshold: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour votes, vectorised over queries.

    Args:
        D: [Q, K] float32 similarities, best first (K >= config.k; only the first k vote). Rule "verified": the
            re-ranked neighbours' global similarities (the order is the re-ranked one; all verified ones count).
        labels: [Q, K] int64 landmark ids of the neighbours (-1 = no landmark or no neighbour).
        nonlandmark_sim: [Q] float32 mean similarity to the nearest known non-landmark images (None = 0).
        counts: :func:`class_counts` of the database (needed for class_norm).
        inliers: [Q, K] rule "verified": inlier counts aligned with ``labels`` (-1 = not verified).
        threshold: apply ``min_confidence`` (off: every query keeps its best class, for the confidence curves).
    Returns:
        pred [Q] int64 landmark id (-1 = no prediction), conf [Q] float32 (0 where no prediction).
    """
    Q = len(D)
    if Q > VOTE_CHUNK:  # bounded memory
        parts = [vote(D[lo:lo + VOTE_CHUNK], labels[lo:lo + VOTE_CHUNK], config,
                      None if nonlandmark_sim is None else nonlandmark_sim[lo:lo + VOTE_CHUNK], counts,
                      None if inliers is None else inliers[lo:lo + VOTE_CHUNK], threshold)
                 for lo in range(0, Q, VOTE_CHUNK)]
        return np.concatenate([p for p, _ in parts]), np.concatenate([c for _, c in parts])
    pred = np.full(Q, NO_LANDMARK, np.int64)
    conf = np.zeros(Q, np.float32)
    if Q == 0 or D.shape[1] == 0:
        return pred, conf
    if config.rule == "verified":
        if inliers is None:
            raise ValueError("rule 'verified' needs the inlier counts of a spatial verification")
        verified_cols = np.nonzero((inliers >= 0).any(axis=0))[0]  # the verified head of the re-ranked lists
        width = int(verified_cols[-1]) + 1 if len(verified_cols) else 1
        D, labels, inliers = D[:, :width], labels[:, :width], inliers[:, :width]
        scores = verified_scores(D, labels, inliers, config)
    else:
        labels = labels[:, :min(config.k, D.shape[1])]
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
    m, w = config.margin, config.nonlandmark_weight
    if m > 0:  # the best other landmark class (0 when there is none)
        other = np.where(labels != labels[rows, best][:, None], landmark, -np.inf).max(axis=1)
        c = c - m * np.clip(np.where(np.isfinite(other), other, 0.0), 0, 1)
    if nonlandmark_sim is not None and w > 0:
        c = c - w * np.clip(np.asarray(nonlandmark_sim, np.float32), 0, 1)
    else:
        w = 0.0
    # map back into [0, 1] (every term is in [0, 1]): the order is that of the subtraction, without the ties
    # that clipping at 0 would make
    c = (c + m + w) / (1 + m + w)
    if threshold:
        ok &= c >= config.min_confidence
    pred[ok] = labels[rows[ok], best[ok]]
    conf[ok] = c[ok]
    return pred, conf


def nonlandmark_similarity(D: np.ndarray, k: int) -> np.ndarray:
    """[Q] mean of the first k similarities of [Q, K] (missing ones count as 0)."""
    D = D[:, :k]
    return np.where(np.isfinite(D), np.maximum(D, 0), 0).sum(axis=1).astype(np.float32) / max(k, 1)


# ---------------------------------------------------------------------------------------------------------------
# Tuning on validation queries made from the database


@dataclass(frozen=True)
class TuneConfig:
    """Tuning the confidence and the no-landmark threshold on held-out database images."""

    enabled: bool = True  # tune (on by default; `--no-tune` turns it off)
    landmark_queries: int = 2000  # held-out landmark images at most: several per class when classes are few
    class_share: float = 0.2  # a class gives at most this share of its images (at least 1; it keeps 2)
    min_class_images: int = 3  # a class gives held-out images only when it has at least this many
    unseen_queries: int = 2000  # unseen-landmark queries at most (held-out images, their own class removed)
    nonlandmark_share: float = 0.5  # share of the known non-landmark images held out as no-landmark queries
    verify_queries: int = 400  # verified methods: validation queries verified at most (each costs top_k RANSACs)
    aggregates: tuple[str, ...] = ("max", "sum")  # aggregations tried ("max" first: the plain top-1 rule)
    class_norms: tuple[float, ...] = (0.0, 0.5, 1.0)  # class normalisations tried (sum)
    margins: tuple[float, ...] = (0.0, 0.5, 1.0)  # margins to the best other class tried
    weights: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)  # non-landmark penalty weights tried
    nonlandmark_prior: float = 0.5  # expected share of queries without a database landmark (threshold choice)
    gap_weight: float = 0.5  # the threshold maximises gap_weight x GAP + (1 - gap_weight) x accuracy
    threshold_from: str = "queries"  # "queries": the threshold that fits the query set (see query_threshold);
    #                                   "validation": the one that fits the validation queries
    min_threshold_queries: int = 100  # fewer answered queries than this: the validation threshold
    min_win_share: float = 0.95  # another rule replaces the top-1 rule only when it wins this share of resamples
    resamples: int = 200  # bootstrap resamples of the validation queries for that comparison
    seed: int = 0  # the held-out choice

    def __post_init__(self):
        check_numbers(self)
        if not 0 < self.nonlandmark_share < 1:
            raise ValueError(f"nonlandmark_share must be in (0, 1), not {self.nonlandmark_share}")
        if not 0 < self.class_share < 1:
            raise ValueError(f"class_share must be in (0, 1), not {self.class_share}")
        if not 0 <= self.nonlandmark_prior <= 1:
            raise ValueError(f"nonlandmark_prior must be in [0, 1], not {self.nonlandmark_prior}")
        if not 0 <= self.min_win_share <= 1 or self.resamples < 1:
            raise ValueError("min_win_share must be in [0, 1] and resamples >= 1")
        if not 0 <= self.gap_weight <= 1:
            raise ValueError(f"gap_weight must be in [0, 1], not {self.gap_weight}")
        if self.landmark_queries < 1 or self.min_class_images < 3:
            raise ValueError("landmark_queries must be >= 1 and min_class_images >= 3")
        if self.threshold_from not in ("queries", "validation"):
            raise ValueError(f"threshold_from must be 'queries' or 'validation', not {self.threshold_from!r}")
        if self.min_threshold_queries < 1:
            raise ValueError(f"min_threshold_queries must be >= 1, not {self.min_threshold_queries}")
        if self.unseen_queries < 0 or self.verify_queries < 0:
            raise ValueError("unseen_queries and verify_queries must be >= 0")
        if not self.aggregates or any(a not in ("sum", "max") for a in self.aggregates):
            raise ValueError(f"aggregates must be among 'sum', 'max'; got {self.aggregates!r}")
        for name in ("class_norms", "margins"):  # the ranges of VoteConfig's class_norm and margin
            if not getattr(self, name) or any(not 0 <= v <= 1 for v in getattr(self, name)):
                raise ValueError(f"{name} must be values in [0, 1], not {getattr(self, name)!r}")
        if not self.weights or min(self.weights) < 0:
            raise ValueError(f"weights must be values >= 0, not {self.weights!r}")


@dataclass(frozen=True)
class ValidationSplit:
    """Database rows held out as validation queries."""

    landmark: np.ndarray  # held-out landmark images: queries of a landmark the database has
    unseen: np.ndarray  # some of ``landmark`` again, their class removed: a landmark the database does not have
    nonlandmark: np.ndarray  # held-out known non-landmark images

    @property
    def held(self) -> np.ndarray:
        """Every held-out row (left out of every validation query's neighbours)."""
        return np.concatenate([self.landmark, self.nonlandmark])


@dataclass(frozen=True)
class Answers:
    """Validation queries' answers under the tuned confidence, before any threshold."""

    pred: np.ndarray  # [V] int64 landmark id (-1: no answer at all)
    conf: np.ndarray  # [V] float32
    truth: np.ndarray  # [V] int64 (-1: no landmark in the database)


def id_keys(image_ids, seed: int, salt: str = "") -> np.ndarray:
    """[N] uint64: a seeded pseudo-random key per image id (blake2b of seed, ``salt`` and id). Sorting by these
    gives a random order that follows the images' ids, not their rows: the same for an index built in another row
    order (on workers, from other shards) or a trainer reading the images from the manifest."""
    prefix = f"{seed}\x00{salt}\x00".encode()
    return np.fromiter((int.from_bytes(hashlib.blake2b(prefix + str(i).encode(), digest_size=8).digest(), "little")
                        for i in image_ids), np.uint64, count=len(image_ids))


def validation_split(labels: np.ndarray, config: TuneConfig = TuneConfig(), image_ids=None) -> ValidationSplit:
    """The validation queries of a database with ``labels`` (-1 = known non-landmark image).

    From each class with ``min_class_images`` or more: ``ceil(landmark_queries / classes)`` random images, but at
    most ``class_share`` of the class (at least one) and never leaving it fewer than 2; when there are more such
    classes than ``landmark_queries``, one image of that many random classes. Up to ``unseen_queries`` of them
    are unseen-landmark queries too. Deterministic for a seed; with ``image_ids`` (one per row) the random choices
    follow the ids (:func:`id_keys`), so that the same images are held out whatever the rows' order."""
    labels = np.asarray(labels, np.int64)
    rng = np.random.default_rng(config.seed)
    ids, counts = class_counts(labels)
    eligible = counts >= config.min_class_images
    ids, counts = ids[eligible], counts[eligible]
    if len(ids) > config.landmark_queries:
        chosen = np.sort(rng.choice(len(ids), config.landmark_queries, replace=False))
        ids, take = ids[chosen], np.ones(len(chosen), np.int64)
    else:
        per_class = -(-config.landmark_queries // max(len(ids), 1))
        take = np.minimum(per_class, np.floor(counts * config.class_share).astype(np.int64))
        take = np.clip(take, 1, counts - 2)
    if image_ids is None:  # the rows' own order, shuffled
        keys, unseen_keys = rng.permutation(len(labels)), rng.permutation(len(labels))
    else:
        keys, unseen_keys = id_keys(image_ids, config.seed), id_keys(image_ids, config.seed, "unseen")
    rows = np.lexsort((keys, labels))  # every class's images in a random order
    lab = labels[rows]
    rank = np.arange(len(lab)) - np.searchsorted(lab, lab, side="left")  # position within its class
    pos = np.clip(np.searchsorted(ids, lab), 0, max(len(ids) - 1, 0))
    found = (len(ids) > 0) & (ids[pos] == lab if len(ids) else np.zeros(len(lab), bool))
    lm_rows = np.sort(rows[found & (rank < np.where(found, take[pos], 0))]) if len(ids) else np.empty(0, np.int64)
    unseen = np.sort(lm_rows[np.argsort(unseen_keys[lm_rows], kind="stable")][:config.unseen_queries])
    nl = np.nonzero(labels < 0)[0]
    n_nl = min(int(round(len(nl) * config.nonlandmark_share)), max(len(lm_rows), 1))
    nl_rows = np.sort(nl[np.argsort(keys[nl], kind="stable")][:n_nl]) if len(nl) >= 2 else np.empty(0, np.int64)
    return ValidationSplit(lm_rows.astype(np.int64), unseen.astype(np.int64), nl_rows.astype(np.int64))


def keep_first(D: np.ndarray, I: np.ndarray, keep: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k neighbours of each row where ``keep`` [Q, K] holds; padded with -inf / -1."""
    keep = keep & (I >= 0)
    Q = len(D)
    D2 = np.full((Q, k), -np.inf, np.float32)
    I2 = np.full((Q, k), -1, np.int64)
    rank = np.cumsum(keep, axis=1) - 1
    sel = keep & (rank < k)
    q, j = np.nonzero(sel)
    D2[q, rank[sel]] = D[q, j]
    I2[q, rank[sel]] = I[q, j]
    return D2, I2


def validation_neighbours(D: np.ndarray, I: np.ndarray, db_labels: np.ndarray, rows: np.ndarray,
                          split: ValidationSplit, k: int):
    """The validation queries' neighbour lists from a search of the held-out images' vectors.

    ``D``, ``I`` [n, K]: each searched vector's neighbours (database rows); ``rows`` [n]: the held-out database
    row each vector belongs to (an image may have several vectors: regions). Returns ``(seen_D, seen_I)`` [n, k]:
    every vector's first k neighbours that are not held out, and ``(unseen_D, unseen_I, of_unseen)``: for the
    vectors of unseen-landmark queries (``of_unseen`` [n] bool), the first k that are neither held out nor of the
    query's own landmark."""
    held = split.held
    keep = ~np.isin(I, held)
    seen_D, seen_I = keep_first(D, I, keep, k)
    of_unseen = np.isin(rows, split.unseen)
    own = db_labels[rows[of_unseen]]
    other_class = db_labels[np.maximum(I[of_unseen], 0)] != own[:, None]
    unseen_D, unseen_I = keep_first(D[of_unseen], I[of_unseen], keep[of_unseen] & other_class, k)
    return seen_D, seen_I, unseen_D, unseen_I, of_unseen


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


def weighted_accuracy(pred: np.ndarray, truth: np.ndarray, prior: float) -> float:
    """Accuracy with the no-landmark queries weighted ``prior`` and the landmark ones ``1 - prior`` (the plain
    accuracy when one kind is absent)."""
    lm = truth >= 0
    if lm.all() or not lm.any():
        return accuracy_score(pred, truth)
    return float((1 - prior) * np.mean(pred[lm] == truth[lm]) + prior * np.mean(pred[~lm] == NO_LANDMARK))


def class_features(sims: np.ndarray, labels: np.ndarray, inliers: np.ndarray):
    """Per (query, landmark class among its verified neighbours): (query row, class, log(1 + best inliers),
    best similarity): the features of :func:`fit_calibration`."""
    valid = (inliers >= 0) & (labels >= 0) & np.isfinite(sims)
    q, j = np.nonzero(valid)
    lab = labels[q, j]
    f1 = np.log1p(np.maximum(inliers[q, j], 0)).astype(np.float64)
    f2 = np.clip(sims[q, j], 0, 1).astype(np.float64)
    if len(q) == 0:
        return q, lab, f1, f2
    order = np.lexsort((lab, q))
    q, lab, f1, f2 = q[order], lab[order], f1[order], f2[order]
    start = np.nonzero(np.r_[True, (q[1:] != q[:-1]) | (lab[1:] != lab[:-1])])[0]
    return q[start], lab[start], np.maximum.reduceat(f1, start), np.maximum.reduceat(f2, start)


def fit_calibration(sims: np.ndarray, labels: np.ndarray, inliers: np.ndarray, truth: np.ndarray,
                    l2: float = 1e-3) -> tuple[float, float, float] | None:
    """(a, b, c) of P(class right) = sigmoid(a log(1 + inliers) + b similarity + c), fitted by logistic regression
    on every (validation query, landmark class among its verified neighbours) pair, right when the class is the
    query's landmark (unseen-landmark and no-landmark queries give only wrong pairs). a, b >= 0, so more
    inliers or a closer neighbour never lower the confidence. None when the pairs are all right or all wrong."""
    from scipy.optimize import minimize

    q, lab, f1, f2 = class_features(sims, labels, inliers)
    y = (lab == np.asarray(truth)[q]).astype(np.float64)
    if len(y) == 0 or y.min() == y.max():
        return None
    X = np.stack([f1, f2, np.ones_like(f1)], axis=1)

    def loss(theta):
        z = X @ theta
        p = 1.0 / (1.0 + np.exp(-z))
        value = np.mean(np.logaddexp(0.0, z) - y * z) + l2 * (theta[0] ** 2 + theta[1] ** 2)
        grad = X.T @ (p - y) / len(y) + 2 * l2 * np.r_[theta[0], theta[1], 0.0]
        return value, grad

    result = minimize(loss, np.array([1.0, 1.0, -1.0]), jac=True, method="L-BFGS-B",
                      bounds=[(0.0, None), (0.0, None), (None, None)])
    a, b, c = (round(float(v), 6) for v in result.x)
    return a, b, c


def _candidates(base: VoteConfig, config: TuneConfig, penalty: bool, calibrations: list) -> list[VoteConfig]:
    """The confidence functions tuning tries, the plain top-1 rule first (ties keep the earlier one)."""
    weights = config.weights if penalty else (0.0,)
    rules = [("vote", a, n, ()) for a in config.aggregates for n in (config.class_norms if a == "sum" else (0.0,))]
    rules += [("verified", "max", 0.0, tuple(c)) for c in calibrations]
    if calibrations:  # verified methods: the best verified neighbour's similarity is the unverified top-1 rule
        top1 = replace(base, rule="verified", aggregate="max", class_norm=0.0, margin=0.0, nonlandmark_weight=0.0,
                       min_confidence=0.0, calibration=SIMILARITY_ONLY)
    else:
        top1 = replace(base, rule="vote", aggregate="max", class_norm=0.0, margin=0.0, nonlandmark_weight=0.0,
                       min_confidence=0.0, calibration=())
    out = [top1]
    for rule, aggregate, norm, calibration in rules:
        for m in config.margins:
            for w in weights:
                c = replace(base, rule=rule, aggregate=aggregate, class_norm=norm, margin=m, nonlandmark_weight=w,
                            min_confidence=0.0, calibration=calibration)
                if c not in out:
                    out.append(c)
    return out


def describe(config: VoteConfig) -> dict:
    """What tuning chose, as metrics.json and recognize.json show it."""
    out = {"rule": config.rule, "k": config.k, "aggregate": config.aggregate, "class_norm": config.class_norm,
           "margin": config.margin, "nonlandmark_weight": config.nonlandmark_weight,
           "min_confidence": config.min_confidence}
    if config.rule == "verified":
        out["calibration"] = dict(zip(("log1p_inliers", "similarity", "bias"), config.calibration,
                                      strict=True)) if config.calibration else None
        del out["aggregate"], out["class_norm"]
    return out


def tune(D: np.ndarray, labels: np.ndarray, truth: np.ndarray, nonlandmark_sim: np.ndarray | None,
         base: VoteConfig, config: TuneConfig = TuneConfig(), counts=None, verified=None,
         ) -> tuple[VoteConfig, dict, Answers]:
    """Choose the confidence function by validation GAP, then ``min_confidence`` by validation accuracy (see the
    module docstring). ``D``/``labels`` [V, K]: the validation queries' neighbours (held-out images removed;
    unseen-landmark queries without their class); ``truth`` [V] (-1 = no landmark in the database).
    ``verified``: (similarities, labels, inliers) [V, K'] of the re-ranked neighbour lists, for methods that
    verify. Returns (the tuned config, a record of what was tried and reached, the validation queries' answers
    under the tuned rule before its threshold: what :func:`query_threshold` needs)."""
    truth = np.asarray(truth, np.int64)
    prior = config.nonlandmark_prior

    def decide(candidate: VoteConfig, threshold: bool = True):
        if candidate.rule == "verified":
            sims2, labels2, inliers2 = verified
            return vote(sims2, labels2, candidate, nonlandmark_sim, counts, inliers2, threshold=threshold)
        return vote(D, labels, candidate, nonlandmark_sim, counts, threshold=threshold)

    def figures(pred, conf) -> dict:
        return {"gap": round(gap_score(pred, conf, truth), 6), "accuracy": round(accuracy_score(pred, truth), 6),
                "weighted_accuracy": round(weighted_accuracy(pred, truth, prior), 6)}

    record = {"queries": int(len(truth)), "landmark_queries": int((truth >= 0).sum()),
              "no_landmark_queries": int((truth < 0).sum()), "nonlandmark_prior": prior,
              "untuned": figures(*decide(base))}
    calibrations = []
    if verified is not None:
        fitted = fit_calibration(verified[0], verified[1], verified[2], truth)
        record["calibration"] = None if fitted is None else dict(
            zip(("log1p_inliers", "similarity", "bias"), fitted, strict=True))
        # the best verified neighbour's similarity alone (inliers ignored: the unverified method's top-1 rule, the
        # first candidate, so that verification never loses to it on validation), and the fitted calibration
        calibrations = [c for c in (SIMILARITY_ONLY, fitted) if c is not None]
    candidates = _candidates(base, config, nonlandmark_sim is not None, calibrations)
    best, best_gap, tried, answers = candidates[0], -1.0, [], []
    for candidate in candidates:
        pred, conf = decide(candidate)
        answers.append((pred, conf))
        g = gap_score(pred, conf, truth)
        tried.append({**{k: v for k, v in describe(candidate).items() if k not in ("k", "min_confidence",
                                                                                   "calibration")},
                      "gap": round(g, 6)})
        if g > best_gap + 1e-9:
            best, best_gap = candidate, g
    record["top1"] = figures(*answers[0])  # the plain top-1 rule, every query answered
    if best is not candidates[0]:
        # a rule that wins by chance on a small validation set loses on the queries: it must beat the top-1 rule
        # on most bootstrap resamples of the validation queries
        wins = bootstrap_wins(answers[candidates.index(best)], answers[0], truth, config.resamples, config.seed)
        record["win_share_over_top1"] = round(wins, 4)
        if wins < config.min_win_share:
            log.info("recognize: the best rule on validation (GAP %.3f, top-1 rule %.3f) wins only %.0f%% of %d "
                     "resamples; keeping the top-1 rule", best_gap, record["top1"]["gap"], 100 * wins,
                     config.resamples)
            best = candidates[0]
    pred, conf = decide(best, threshold=False)
    threshold, curve = choose_threshold(pred, conf, truth, config)
    tuned = replace(best, min_confidence=threshold)
    answers = Answers(pred, conf, truth)
    record["tuned"] = {**describe(tuned), **threshold_figures(answers, threshold, prior)}
    record["threshold_curve"] = curve
    record["tried"] = tried
    log.info("recognize: tuned on %d validation queries (%d of a database landmark): GAP %.3f -> %.3f (top-1 rule "
             "%.3f), accuracy %.3f -> %.3f (%s)", len(truth), record["landmark_queries"], record["untuned"]["gap"],
             record["tuned"]["gap"], record["top1"]["gap"], record["untuned"]["accuracy"],
             record["tuned"]["accuracy"], {k: v for k, v in describe(tuned).items() if k != "k"})
    return tuned, record, answers


def bootstrap_wins(a: tuple, b: tuple, truth: np.ndarray, resamples: int, seed: int) -> float:
    """Share of bootstrap resamples of the queries on which answers ``a`` (pred, conf) have a higher GAP than
    ``b`` (ties count half)."""
    rng = np.random.default_rng(seed)
    n, wins = len(truth), 0.0
    for _ in range(resamples):
        s = rng.integers(0, n, n)
        ga, gb = gap_score(a[0][s], a[1][s], truth[s]), gap_score(b[0][s], b[1][s], truth[s])
        wins += 1.0 if ga > gb + 1e-12 else 0.5 if abs(ga - gb) <= 1e-12 else 0.0
    return wins / resamples


def choose_threshold(pred: np.ndarray, conf: np.ndarray, truth: np.ndarray, config: TuneConfig,
                     ) -> tuple[float, list[dict]]:
    """The no-landmark threshold: the one that maximises ``gap_weight`` x validation GAP + (1 - ``gap_weight``) x
    prior-weighted validation accuracy (a higher threshold drops wrong answers, which accuracy rewards, and right
    ones, which GAP and accuracy punish). Returns (threshold, [{threshold, gap, accuracy, weighted_accuracy}])."""
    answered = conf[pred >= 0]
    thresholds = np.unique(np.concatenate([[0.0], answered]))
    if len(answered) and answered.max() < 1.0:  # above every answer: "no landmark" for every query
        thresholds = np.append(thresholds, np.nextafter(np.float32(answered.max()), np.float32(2.0)))
    best_t, best_score, curve = 0.0, -1.0, []
    for t in thresholds:  # a prediction is kept when conf >= t
        p = np.where(conf >= t, pred, NO_LANDMARK)
        g = gap_score(p, np.where(p >= 0, conf, 0), truth)
        acc = weighted_accuracy(p, truth, config.nonlandmark_prior)
        curve.append({"threshold": round(float(t), 6), "gap": round(g, 6),
                      "accuracy": round(accuracy_score(p, truth), 6), "weighted_accuracy": round(acc, 6)})
        score = config.gap_weight * g + (1 - config.gap_weight) * acc
        if score > best_score + 1e-9:
            best_t, best_score = float(t), score
    if len(curve) > 200:  # keep the record small: about 200 points of the curve
        curve = curve[::-(-len(curve) // 200)]
    if best_t > 0 and best_t > float(answered.max()):  # every answer dropped: just above the best one
        return min(1.0, float(np.ceil(best_t * 1e6) / 1e6)), curve
    return float(np.floor(best_t * 1e6) / 1e6), curve  # never above a kept confidence


def threshold_figures(answers: Answers, threshold: float, prior: float) -> dict:
    """GAP, accuracy and prior-weighted accuracy of ``answers`` with the no-landmark ``threshold`` applied."""
    p = np.where((answers.pred >= 0) & (answers.conf >= threshold), answers.pred, NO_LANDMARK)
    g = gap_score(p, np.where(p >= 0, answers.conf, 0), answers.truth)
    return {"gap": round(g, 6), "accuracy": round(accuracy_score(p, answers.truth), 6),
            "weighted_accuracy": round(weighted_accuracy(p, answers.truth, prior), 6)}


PRIOR_SUPPORT = 0.2  # the landmark share is estimated where at least this share of validation landmarks lie above
MIN_THRESHOLD_LANDMARKS = 30  # fewer validation landmark queries than this: the validation threshold


def landmark_share(above_q: np.ndarray, above_l: np.ndarray, n_q: int, n_v: int) -> float | None:
    """The share of the queries that show a database landmark, from the shares of the queries (``above_q``, of
    ``n_q``) and of the validation landmark queries (``above_l``, of ``n_v``) at or above each threshold (see
    :func:`query_threshold`). The smallest ratio over the tail is biased low (the minimum of noisy ratios), so
    each ratio first gets one standard error of its two binomial shares, as Scott (2015) bounds it. None when
    fewer than :data:`PRIOR_SUPPORT` of the validation landmark queries have an answer at all."""
    support = above_l >= PRIOR_SUPPORT
    if not support.any():
        return None
    q, lm = above_q[support], above_l[support]
    ratio = q / lm
    error = np.sqrt(q * (1 - q) / n_q + ratio ** 2 * lm * (1 - lm) / n_v) / lm
    return float(np.clip(np.min(ratio + error), 0.0, 1.0))


def query_threshold(validation: Answers, query_pred: np.ndarray, query_conf: np.ndarray, config: TuneConfig,
                    ) -> tuple[float | None, dict]:
    """The no-landmark threshold that fits the query set itself: the validation queries' *unseen* landmarks are
    the database's own ones, and how much a real unseen landmark resembles the database's varies from one query
    set to the next (on Porto, the held-out landmark's median top-1 similarity is 0.67 in one round and 0.78 in
    another); the *landmark* queries' confidences, on the other hand, look like those of the real landmark
    queries. So, with the queries' confidences (before any threshold) a mixture of landmark ones, distributed
    like the validation landmark queries' (CDF ``F_L``; ``C_L(t)``: share of them right and at ``t`` or above),
    and no-landmark ones:

    - the landmark share of the queries, ``pi``, is estimated as in positive-unlabelled learning (mixture
      proportion estimation: Elkan & Noto 2008, Scott 2015): ``min_t (1 - F_Q(t)) / (1 - F_L(t))`` over the
      thresholds above which at least :data:`PRIOR_SUPPORT` of the validation landmarks lie (in the top tail the
      queries are mostly landmark ones), each ratio raised by its standard error (:func:`landmark_share`);
    - the accuracy at threshold ``t`` is then ``pi C_L(t) + (1 - pi) F_U(t)``, with ``(1 - pi) F_U(t) =
      F_Q(t) - pi F_L(t)`` (the no-landmark queries dropped);
    - GAP at ``t``: each right validation answer at ``c >= t`` counts the estimated precision of the answers at
      ``c`` or above, ``pi C_L(c) / (1 - F_Q(c))``;

    and the threshold maximises ``gap_weight`` x GAP + (1 - ``gap_weight``) x accuracy over the queries'
    confidences. Only ranks enter, so it holds for any confidence (votes, calibrated inliers, a classifier's
    probability). ``validation``: the validation queries' answers (their landmark ones are used); query_pred/
    query_conf [Q]: the queries' answers before the threshold (pred -1: no answer). Returns (threshold, record),
    or (None, record with the reason) when there are fewer than ``config.min_threshold_queries`` answered
    queries or fewer than :data:`MIN_THRESHOLD_LANDMARKS` validation landmark queries: the shares of the top
    tails are too uncertain then (the demo's 60 queries, 36 of them of a database landmark, and 17 validation
    landmark queries gave estimates of 0.76 and 1.0 for two methods)."""
    query_conf = np.asarray(query_conf, np.float64)
    answered = np.sort(query_conf[(np.asarray(query_pred) >= 0) & np.isfinite(query_conf)])
    landmark = validation.truth >= 0
    v_conf = np.where((validation.pred[landmark] >= 0) & np.isfinite(validation.conf[landmark]),
                      validation.conf[landmark], -np.inf).astype(np.float64)
    right = (validation.pred[landmark] == validation.truth[landmark]) & np.isfinite(v_conf)
    n_q, n_v = len(query_conf), len(v_conf)
    record = {"queries": int(n_q), "answered_queries": int(len(answered)), "validation_landmark_queries": int(n_v)}
    if len(answered) < config.min_threshold_queries or n_v < MIN_THRESHOLD_LANDMARKS:
        record["skipped"] = (f"{len(answered)} answered queries (fewer than {config.min_threshold_queries})"
                             if len(answered) < config.min_threshold_queries else
                             f"{n_v} validation landmark queries (fewer than {MIN_THRESHOLD_LANDMARKS})")
        return None, record
    v_sorted, right_conf = np.sort(v_conf), np.sort(v_conf[right])

    def below(sorted_values, t, n):  # share of n values strictly below t
        return np.searchsorted(sorted_values, t, side="left") / n

    def queries_below(t):  # F_Q: the unanswered queries count as below every threshold
        return (n_q - len(answered)) / n_q + below(answered, t, n_q)

    def right_at_or_above(t):
        return (len(right_conf) - np.searchsorted(right_conf, t, side="left")) / n_v

    points = np.unique(np.concatenate([answered, v_sorted[np.isfinite(v_sorted)]]))
    above_q = 1 - queries_below(points)
    above_l = 1 - below(v_sorted, points, n_v)
    pi = landmark_share(above_q, above_l, n_q, n_v)
    if pi is None:
        record["skipped"] = f"fewer than {PRIOR_SUPPORT:.0%} of the validation landmark queries have an answer"
        return None, record
    # candidate thresholds: 0 (keep every answer), every confidence of a query or a validation landmark, above
    # them all (keep none); the answers kept change at the queries' confidences only, the estimates in between too
    thresholds = np.unique(np.concatenate([[0.0], points]))
    if answered[-1] < 1.0:  # "no landmark" for every query is a threshold (min_confidence is at most 1)
        thresholds = np.append(thresholds, np.nextafter(max(1.0, points[-1]), np.inf))
    f_q = queries_below(thresholds)
    f_l = below(v_sorted, thresholds, n_v)
    dropped_no_landmark = np.clip(f_q - pi * f_l, 0.0, 1.0 - pi)
    accuracy = pi * right_at_or_above(thresholds) + dropped_no_landmark
    # GAP: the precision at each right validation answer's confidence, summed over those at or above t
    above_c = 1 - queries_below(right_conf)
    precision = np.minimum(1.0, pi * right_at_or_above(right_conf) / np.maximum(above_c, 1.0 / n_q))
    tail = np.concatenate([np.cumsum(precision[::-1])[::-1], [0.0]]) / n_v
    gap = tail[np.searchsorted(right_conf, thresholds, side="left")]
    score = config.gap_weight * gap + (1 - config.gap_weight) * accuracy
    best = int(np.argmax(score))  # the first best: the lowest threshold (fewest answers dropped)
    # the same answers kept, with the threshold half-way between the last query dropped and the first one kept
    first_kept = np.searchsorted(answered, thresholds[best], side="left")
    if first_kept == 0:
        t = 0.0
    elif first_kept == len(answered):
        t = float(min(1.0, np.nextafter(np.float32(answered[-1]), np.float32(2.0))))
    else:
        lo, hi = float(answered[first_kept - 1]), float(answered[first_kept])
        t = min(hi, float(np.ceil((lo + (hi - lo) / 2) * 1e6) / 1e6))
    record.update(landmark_share=round(pi, 6), threshold=t, estimated_accuracy=round(float(accuracy[best]), 6),
                  estimated_gap=round(float(gap[best]), 6), estimated_gap_all_answers=round(float(gap[0]), 6))
    return t, record
