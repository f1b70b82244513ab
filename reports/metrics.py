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

Diagnostics beside the headline numbers: recall@k (hit rate) for retrieval; the precision-recall curve whose
step area is GAP, per-class AP and accuracy, and the most frequent confusions for recognition; IoU, PASCAL VOC
AP and best-box mean IoU for (class-agnostic) landmark boxes, given as (xmin, ymin, xmax, ymax) in continuous
pixel coordinates (area = (xmax - xmin) * (ymax - ymin), no +1).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from features.boxes import iou, iou_matrix  # noqa: F401 - part of the metrics API (detection AP, mean IoU)


def _landmark(x: int | None) -> int | None:
    """A landmark id, or None for "no landmark" (None or a negative id)."""
    return None if x is None or x < 0 else int(x)


def _gap_order(pred: Sequence[int | None], conf: Sequence[float], truth: Sequence[int | None],
               ids: Sequence[str] | None) -> tuple[list[int], list[int | None]]:
    """The queries with a prediction in GAP's order, and the normalised truth (None: no landmark).

    Order: confidence descending, ties by query id (default: input position), then landmark id, ascending.
    """
    if not (len(pred) == len(conf) == len(truth)):
        raise ValueError("pred, conf and truth must have one entry per query")
    norm = [_landmark(t) for t in truth]
    keys = list(ids) if ids is not None else list(range(len(pred)))
    made = [i for i, p in enumerate(pred) if p is not None and p >= 0]
    made.sort(key=lambda i: (keys[i], int(pred[i])))
    made.sort(key=lambda i: -float(conf[i]))  # stable: equal confidences keep the (id, class) order
    return made, norm


def gap(pred: Sequence[int | None], conf: Sequence[float], truth: Sequence[int | None],
        ids: Sequence[str] | None = None) -> float:
    """Global Average Precision.

    Args:
        pred: predicted landmark per query, None (or a negative id) for no prediction.
        conf: confidence per query (ignored where pred is None).
        truth: true landmark per query, None (or a negative id) for no landmark.
        ids: query ids, for the tie-break between equal confidences (default: the input order).
    """
    made, norm = _gap_order(pred, conf, truth, ids)
    m = sum(t is not None for t in norm)
    if m == 0:
        return 0.0
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


def recall_at_k(retrieved: Sequence[Sequence[str]], relevant: Sequence[set[str]],
                ks: Sequence[int] = (1, 5, 10, 100)) -> dict[int, float]:
    """Recall@k (hit rate) of retrieval.

    Over the queries with at least one relevant id, the share whose first k retrieved ids contain at least one
    relevant id. Every k maps to 0.0 when no query has a relevant id.

    Returns:
        {k: recall@k} for each k in ks.
    """
    first_hits = []  # 1-based rank of the first relevant id, inf when none is retrieved
    for ranked, rel in zip(retrieved, relevant, strict=True):
        if rel:
            first_hits.append(next((r for r, item in enumerate(ranked, start=1) if item in rel), np.inf))
    if not first_hits:
        return {int(k): 0.0 for k in ks}
    first = np.asarray(first_hits, dtype=np.float64)
    return {int(k): float(np.mean(first <= k)) for k in ks}


def threshold_curve(pred: Sequence[int | None], conf: Sequence[float], truth: Sequence[int | None],
                    thresholds: Sequence[float], ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(GAP, accuracy) [T] of the answers ``pred``/``conf`` if every prediction below each threshold became "no
    landmark": the predictions kept at a threshold are a prefix of GAP's order, so one pass gives every point."""
    made, norm = _gap_order(pred, conf, truth, ids)
    m = sum(t is not None for t in norm)
    right = np.array([norm[i] is not None and int(pred[i]) == norm[i] for i in made], bool)
    nolm = np.array([norm[i] is None for i in made], bool)  # a no-landmark query answered: wrong unless dropped
    ranks = np.arange(1, len(made) + 1)
    gap_prefix = np.r_[0.0, np.cumsum(np.where(right, np.cumsum(right) / ranks, 0.0))] / max(m, 1)
    right_prefix = np.r_[0, np.cumsum(right)]
    nolm_dropped = np.r_[0, np.cumsum(nolm[::-1])][::-1]  # no-landmark queries after each prefix
    unanswered_nolm = sum(t is None for t in norm) - int(nolm.sum())  # right at every threshold
    confs = np.array([float(conf[i]) for i in made])
    kept = np.array([int(np.sum(confs >= t)) for t in thresholds])  # GAP's order is by confidence descending
    gaps = gap_prefix[kept] if m else np.zeros(len(kept))
    accs = (right_prefix[kept] + nolm_dropped[kept] + unanswered_nolm) / max(len(pred), 1)
    return gaps, accs


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for telling the ``positive`` items from the others (the chance that
    a random positive scores above a random negative, ties counting half); None when one side is empty."""
    s = np.asarray(scores, np.float64)
    pos = np.asarray(positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.sort(s[~pos])
    below = np.searchsorted(order, s[pos], side="left")
    ties = np.searchsorted(order, s[pos], side="right") - below
    return float((below + 0.5 * ties).sum() / (n_pos * n_neg))


def precision_recall_curve(pred: Sequence[int | None], conf: Sequence[float], truth: Sequence[int | None],
                           ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall after each prediction, in GAP's order (see `gap`).

    precision[i] = correct among the first i + 1 predictions / (i + 1); recall[i] = the same correct count / M,
    with M the number of queries that show a landmark (recall is all 0 when M = 0). Queries without a prediction
    (None or a negative id) are not on the curve. GAP is the area under the curve's step:
    GAP = sum_i precision[i] * (recall[i] - recall[i - 1]), with recall[-1] = 0.

    Returns:
        precision, recall, confidence: [P] float64 each, P = the number of predictions (empty when none).
    """
    made, norm = _gap_order(pred, conf, truth, ids)
    m = sum(t is not None for t in norm)
    hit = np.array([norm[i] is not None and int(pred[i]) == norm[i] for i in made], dtype=np.float64)
    correct = np.cumsum(hit)
    precision = correct / np.arange(1, len(made) + 1, dtype=np.float64)
    recall = correct / m if m else np.zeros(len(made), dtype=np.float64)
    confidence = np.array([float(conf[i]) for i in made], dtype=np.float64)
    return precision, recall, confidence


def per_class_ap(pred: Sequence[int | None], conf: Sequence[float], truth: Sequence[int | None],
                 ids: Sequence[str] | None = None) -> dict[int, float]:
    """GAP restricted to one landmark class, for each class that is the truth of at least one query.

    For class c: the predictions of c, in GAP's order (see `gap`); a prediction of c is relevant when its query
    shows c; AP(c) = 1/M_c * sum over the relevant ones of the precision among the predictions of c up to it,
    with M_c the number of queries that show c. Classes only ever predicted are left out.

    Returns:
        {class: AP}, classes ascending.
    """
    made, norm = _gap_order(pred, conf, truth, ids)
    m = Counter(t for t in norm if t is not None)
    made_c: Counter[int] = Counter()
    correct_c: Counter[int] = Counter()
    total = dict.fromkeys(m, 0.0)
    for i in made:
        c = int(pred[i])
        made_c[c] += 1
        if norm[i] == c:
            correct_c[c] += 1
            total[c] += correct_c[c] / made_c[c]
    return {c: total[c] / m[c] for c in sorted(m)}


def per_class_accuracy(pred: Sequence[int | None], truth: Sequence[int | None]) -> dict[int, tuple[int, int]]:
    """For each landmark class that is the truth of at least one query: (its queries predicted right, its queries).

    Returns:
        {class: (correct, queries)}, classes ascending.
    """
    queries: Counter[int] = Counter()
    correct: Counter[int] = Counter()
    for p, t in zip(pred, truth, strict=True):
        t = _landmark(t)
        if t is not None:
            queries[t] += 1
            correct[t] += _landmark(p) == t
    return {c: (correct[c], queries[c]) for c in sorted(queries)}


def _none_first(c: int | None) -> tuple[int, int]:
    return (0, 0) if c is None else (1, c)


def confused_pairs(pred: Sequence[int | None], truth: Sequence[int | None],
                   top: int | None = 10) -> list[tuple[int | None, int | None, int]]:
    """The most frequent wrong answers.

    Each wrong answer counts once for its (true class, predicted class); None stands for "no landmark" on either
    side: (None, c) is a no-landmark query given landmark c, (c, None) a query of c given no prediction.

    Returns:
        [(true, predicted, count)] by count descending, then by (true, predicted) ascending with None first;
        the first `top` of them (all when top is None).
    """
    answers = [(_landmark(t), _landmark(p)) for p, t in zip(pred, truth, strict=True)]
    counts = Counter((t, p) for t, p in answers if t != p)
    pairs = sorted(counts.items(), key=lambda kv: (-kv[1], _none_first(kv[0][0]), _none_first(kv[0][1])))
    if top is not None:
        pairs = pairs[:top]
    return [(t, p, n) for (t, p), n in pairs]


def _gt_arrays(ground_truth: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, np.ndarray]:
    return {img: np.asarray(boxes, dtype=np.float64).reshape(-1, 4) for img, boxes in ground_truth.items()}


def detection_ap(detections: Sequence[tuple[str, float, Sequence[float]]],
                 ground_truth: Mapping[str, Sequence[Sequence[float]]], iou_threshold: float = 0.5) -> float:
    """PASCAL VOC (2010+) all-point interpolated AP of class-agnostic detections.

    Detections (image_id, score, box) are taken by score descending (ties: image id, then input order). Each is
    compared with the ground-truth boxes of its image and takes the one it overlaps best (highest IoU, first box
    on ties), as VOC's evaluation does: a true positive when that IoU >= iou_threshold and the box is not yet
    taken (it is then taken); otherwise a false positive, also when its best box is already taken by a
    higher-scoring detection (a duplicate), even if another free box overlaps it enough. A detection in an image
    without ground truth is a false positive. With recall = TP / (all ground-truth boxes) and precision =
    TP / (TP + FP) after each detection, precision is made monotone (running max from the right) and summed over
    the recall steps: AP = sum (r_i - r_{i-1}) * max_{j >= i} p_j. 0.0 when there is no ground-truth box.

    Args:
        detections: (image_id, score, box) per detection, box (xmin, ymin, xmax, ymax).
        ground_truth: image_id -> its boxes; images may have none.
        iou_threshold: the least IoU for a true positive.
    """
    gt = _gt_arrays(ground_truth)
    n_pos = sum(len(boxes) for boxes in gt.values())
    if n_pos == 0:
        return 0.0
    taken = {img: np.zeros(len(boxes), dtype=bool) for img, boxes in gt.items()}
    order = sorted(range(len(detections)), key=lambda i: (-float(detections[i][1]), detections[i][0], i))
    tp = np.zeros(len(order), dtype=np.float64)
    for rank, i in enumerate(order):
        img, _, box = detections[i]
        boxes = gt.get(img)
        if boxes is None or len(boxes) == 0:
            continue
        overlaps = iou_matrix(np.asarray(box, dtype=np.float64)[None, :], boxes)[0]
        best = int(np.argmax(overlaps))
        if overlaps[best] >= iou_threshold and not taken[img][best]:
            taken[img][best] = True
            tp[rank] = 1.0
    hits = np.cumsum(tp)
    recall = np.concatenate(([0.0], hits / n_pos))
    precision = np.concatenate(([0.0], hits / np.arange(1, len(order) + 1)))
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(recall) * precision[1:]))


def mean_iou(detections: Sequence[tuple[str, float, Sequence[float]]],
             ground_truth: Mapping[str, Sequence[Sequence[float]]]) -> float:
    """Best-box mean IoU: for each ground-truth box, the largest IoU of any detection of its image with it.

    Scores are not used; a box in an image without detections counts 0. Averaged over all ground-truth boxes;
    0.0 when there are none.

    Args:
        detections: (image_id, score, box) per detection, box (xmin, ymin, xmax, ymax).
        ground_truth: image_id -> its boxes.
    """
    by_image: dict[str, list[Sequence[float]]] = {}
    for img, _, box in detections:
        by_image.setdefault(img, []).append(box)
    best = []
    for img, boxes in _gt_arrays(ground_truth).items():
        if len(boxes) == 0:
            continue
        if img in by_image:
            best.append(iou_matrix(boxes, np.asarray(by_image[img], dtype=np.float64)).max(axis=1))
        else:
            best.append(np.zeros(len(boxes)))
    return float(np.mean(np.concatenate(best))) if best else 0.0
