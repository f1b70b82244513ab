"""Recognition and retrieval metrics with the Google Landmark challenges' definitions.

GAP (Global Average Precision, a.k.a. micro-AP; Google Landmark Recognition, and the reference in
tensorflow/models ``delf/python/datasets/google_landmarks_dataset/metrics.py``): every query with a
prediction is one (landmark, confidence) pair; predictions are sorted by confidence, descending, ties broken by query id then
landmark id ascending (Kaggle's convention, as the reference does), and

    GAP = 1/M * sum_i P(i) * rel(i)

where P(i) is the precision over the first i predictions, rel(i) is 1 when prediction i is correct, and M is
the number of queries that show a landmark. A prediction for a no-landmark query is simply wrong (it lowers
the precision of everything ranked below it); a no-landmark query without a prediction costs nothing.

mAP@k (Google Landmark Retrieval): for each query with at least one relevant database image,
AP@k = 1/min(m, k) * sum_{i<=k} P(i) rel(i), with m the number of relevant images; averaged over those queries.
A database id retrieved twice counts once (at its first rank), as in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def gap(pred: Sequence[int | None], conf: Sequence[float], truth: Sequence[int | None],
        ids: Sequence[str] | None = None) -> float:
    """Global Average Precision.

    Args:
        pred: predicted landmark per query, None (or a negative id) for no prediction.
        conf: confidence per query (ignored where pred is None).
        truth: true landmark per query, None (or a negative id) for no landmark.
        ids: query ids, for the tie-break between equal confidences (default: the input order).
    """
    if not (len(pred) == len(conf) == len(truth)):
        raise ValueError("pred, conf and truth must have one entry per query")
    norm = [None if (t is None or t < 0) else int(t) for t in truth]
    m = sum(t is not None for t in norm)
    if m == 0:
        return 0.0
    keys = list(ids) if ids is not None else list(range(len(pred)))
    made = [i for i, p in enumerate(pred) if p is not None and p >= 0]
    made.sort(key=lambda i: (keys[i], int(pred[i])))
    made.sort(key=lambda i: -float(conf[i]))  # stable: equal confidences keep the (id, class) order
    correct = 0
    total = 0.0
    for rank, i in enumerate(made, start=1):
        if norm[i] is not None and int(pred[i]) == norm[i]:
            correct += 1
            total += correct / rank
    return total / m


def accuracy(pred: Sequence[int | None], truth: Sequence[int | None]) -> float:
    """Share of queries answered right: the true landmark, or no prediction for a no-landmark query."""
    if len(pred) == 0:
        return 0.0
    ok = 0
    for p, t in zip(pred, truth, strict=True):
        p = None if p is None or p < 0 else int(p)
        t = None if t is None or t < 0 else int(t)
        ok += p == t
    return ok / len(pred)


def landmark_accuracy(pred: Sequence[int | None], truth: Sequence[int | None]) -> float:
    """Top-1 accuracy over the queries that show a landmark only."""
    pairs = [(p, t) for p, t in zip(pred, truth, strict=True) if t is not None and t >= 0]
    if not pairs:
        return 0.0
    return sum(p is not None and p >= 0 and int(p) == int(t) for p, t in pairs) / len(pairs)


def average_precision_at_k(retrieved: Sequence[str], relevant: set[str], k: int = 100) -> float:
    """AP@k of one ranked list against a set of relevant ids (0 when nothing is relevant)."""
    if not relevant:
        return 0.0
    hits = 0
    total = 0.0
    seen: set[str] = set()
    for rank, item in enumerate(retrieved[:k], start=1):
        if item in seen:
            continue
        seen.add(item)
        if item in relevant:
            hits += 1
            total += hits / rank
    return total / min(len(relevant), k)


def mean_average_precision_at_k(retrieved: Sequence[Sequence[str]], relevant: Sequence[set[str]],
                                k: int = 100) -> float:
    """mAP@k over the queries with at least one relevant image (0.0 when there are none)."""
    aps = [average_precision_at_k(r, rel, k) for r, rel in zip(retrieved, relevant, strict=True) if rel]
    return float(np.mean(aps)) if aps else 0.0
