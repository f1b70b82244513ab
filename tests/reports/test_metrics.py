import numpy as np
import pytest

from reports import metrics as M
from reports.metrics import (
    accuracy,
    average_precision_at_k,
    confused_pairs,
    detection_ap,
    gap,
    iou,
    iou_matrix,
    landmark_accuracy,
    mean_average_precision_at_k,
    mean_iou,
    per_class_accuracy,
    per_class_ap,
    precision_recall_curve,
    recall_at_k,
)


def test_gap_hand_computed_with_no_landmark_queries():
    # queries:      q0    q1    q2    q3     q4
    truth = [1, 2, 3, None, None]
    pred = [1, 9, 3, 4, None]
    conf = [0.9, 0.8, 0.5, 0.95, 0.0]
    # sorted by confidence: q3 (wrong, no-landmark), q0 (right), q1 (wrong), q2 (right)
    # GAP = (1/2 + 2/4) / M with M = 3 queries showing a landmark
    assert gap(pred, conf, truth) == pytest.approx((1 / 2 + 2 / 4) / 3)


def test_gap_perfect_and_empty():
    assert gap([1, 2], [0.5, 0.4], [1, 2]) == pytest.approx(1.0)
    assert gap([None, None], [0, 0], [1, 2]) == 0.0
    assert gap([1], [1.0], [None]) == 0.0  # no landmark queries at all: M = 0


def test_gap_ties_break_by_query_id_like_the_reference():
    truth = [1, 2]
    pred = [1, 5]  # b is right, a is wrong, same confidence
    ids = ["b", "a"]
    # reference order: a (wrong) then b (right): GAP = (1/2) / 2
    assert gap(pred, [0.5, 0.5], truth, ids) == pytest.approx(0.25)
    # without ids, input order: b (right) first: GAP = 1 / 2
    assert gap(pred, [0.5, 0.5], truth) == pytest.approx(0.5)


def _reference_gap(predictions: dict, recognition_solution: dict) -> float:
    """Transcription of GlobalAveragePrecision (ignore_non_gt_test_images=False) in tensorflow/models
    research/delf/delf/python/datasets/google_landmarks_dataset/metrics.py, with its input format.

    predictions: query id -> {"class": int, "score": float}; recognition_solution: query id -> list of classes.
    The one change: the reference divides by zero when no query shows a landmark; this returns 0.0, as gap does.
    """
    num_positives = sum(1 for v in recognition_solution.values() if v)
    if num_positives == 0:
        return 0.0
    gap_value = 0.0
    total_predictions = 0
    correct_predictions = 0
    # Kaggle's convention: score descending, then key ascending, then class ascending (two stable sorts)
    sorted_predictions_by_key_class = sorted(predictions.items(), key=lambda item: (item[0], item[1]["class"]))
    sorted_predictions = sorted(sorted_predictions_by_key_class, key=lambda item: item[1]["score"], reverse=True)
    for key, prediction in sorted_predictions:
        total_predictions += 1
        if prediction["class"] in recognition_solution[key]:
            correct_predictions += 1
            gap_value += correct_predictions / total_predictions
    return gap_value / num_positives


def _random_recognition(rng: np.random.Generator, p_no_landmark: float, p_no_prediction: float, n_max: int = 30,
                        n_classes: int = 4):
    """Random queries with few confidence levels (many ties); None and -1 both mean "none"."""
    n = int(rng.integers(0, n_max + 1))
    ids = [f"{x:04x}" for x in rng.choice(5000, n, replace=False)]  # unique, not in input order
    truth = [(None if rng.random() < 0.5 else -1) if rng.random() < p_no_landmark else int(rng.integers(0, n_classes))
             for _ in range(n)]
    pred = [(None if rng.random() < 0.5 else -1) if rng.random() < p_no_prediction
            else int(rng.integers(0, n_classes)) for _ in range(n)]
    conf = [float(rng.integers(0, 4)) / 4 for _ in range(n)]
    return ids, pred, conf, truth


def test_gap_matches_the_tensorflow_models_reference_on_random_inputs():
    rng = np.random.default_rng(0)
    regimes = [(0.4, 0.2), (0.0, 0.0), (1.0, 0.2), (0.4, 1.0), (0.0, 0.5), (0.8, 0.0)]  # (no landmark, no prediction)
    for trial in range(480):
        p_none, p_nopred = regimes[trial % len(regimes)]
        ids, pred, conf, truth = _random_recognition(rng, p_none, p_nopred)
        solution = {i: ([t] if t is not None and t >= 0 else []) for i, t in zip(ids, truth, strict=True)}
        predictions = {i: {"class": p, "score": c} for i, p, c in zip(ids, pred, conf, strict=True)
                       if p is not None and p >= 0}
        assert gap(pred, conf, truth, ids) == pytest.approx(_reference_gap(predictions, solution))


def test_accuracies():
    truth = [1, 2, None, None]
    pred = [1, None, None, 3]
    assert accuracy(pred, truth) == pytest.approx(2 / 4)  # q0 right, q2 right (no landmark, no prediction)
    assert landmark_accuracy(pred, truth) == pytest.approx(1 / 2)


def test_average_precision_at_k_hand_computed():
    # relevant {a, c, e}; ranking a x c y -> (1/1 + 2/3) / 3
    assert average_precision_at_k(["a", "x", "c", "y"], {"a", "c", "e"}) == pytest.approx((1 + 2 / 3) / 3)
    # k caps both the ranking and the normaliser: min(m, k) = 2
    assert average_precision_at_k(["x", "a", "c"], {"a", "c", "e"}, k=2) == pytest.approx((1 / 2) / 2)
    # a duplicate counts once
    assert average_precision_at_k(["a", "a", "c"], {"a", "c"}) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision_at_k(["a"], set()) == 0.0


def test_map_skips_queries_without_relevant_images():
    assert mean_average_precision_at_k([["a"], ["b"]], [{"a"}, set()]) == pytest.approx(1.0)
    assert mean_average_precision_at_k([["a"]], [set()]) == 0.0


def test_recall_at_k_hand_computed_skips_queries_without_relevant_ids():
    retrieved = [["x", "a", "y"], ["b", "x", "y"], ["x", "y", "z"], ["x", "y", "w"]]
    relevant = [{"a"}, {"b", "c"}, set(), {"c"}]
    # first relevant rank: q0 -> 2, q1 -> 1, q2 skipped (nothing relevant), q3 -> never; 3 queries count
    assert recall_at_k(retrieved, relevant, ks=(1, 2, 3)) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 2 / 3})
    assert recall_at_k(retrieved, relevant) == pytest.approx({1: 1 / 3, 5: 2 / 3, 10: 2 / 3, 100: 2 / 3})
    assert recall_at_k([["a"]], [set()]) == {1: 0.0, 5: 0.0, 10: 0.0, 100: 0.0}


def test_precision_recall_curve_hand_computed():
    # the queries of test_gap_hand_computed_with_no_landmark_queries
    truth = [1, 2, 3, None, None]
    pred = [1, 9, 3, 4, None]
    conf = [0.9, 0.8, 0.5, 0.95, 0.0]
    precision, recall, confidence = precision_recall_curve(pred, conf, truth)
    # order q3 (wrong), q0 (right), q1 (wrong), q2 (right); q4 has no prediction; M = 3
    np.testing.assert_allclose(precision, [0 / 1, 1 / 2, 1 / 3, 2 / 4])
    np.testing.assert_allclose(recall, [0 / 3, 1 / 3, 1 / 3, 2 / 3])
    np.testing.assert_allclose(confidence, [0.95, 0.9, 0.8, 0.5])
    # area: 0 * 0 + 1/2 * 1/3 + 1/3 * 0 + 1/2 * 1/3 = 1/3 = GAP
    assert gap(pred, conf, truth) == pytest.approx(1 / 3)
    for a in precision_recall_curve([None, -1], [0.5, 0.5], [1, 2]):
        assert a.shape == (0,)


def test_gap_is_the_area_under_the_precision_recall_curve_on_random_inputs():
    rng = np.random.default_rng(1)
    regimes = [(0.4, 0.2), (0.0, 0.0), (1.0, 0.2), (0.4, 1.0), (0.8, 0.0)]
    for trial in range(300):
        ids, pred, conf, truth = _random_recognition(rng, *regimes[trial % len(regimes)])
        precision, recall, confidence = precision_recall_curve(pred, conf, truth, ids)
        assert precision.shape == recall.shape == confidence.shape
        assert np.all(np.diff(confidence) <= 0)
        area = float(np.sum(precision * np.diff(recall, prepend=0.0)))
        assert gap(pred, conf, truth, ids) == pytest.approx(area)


def test_per_class_ap_and_accuracy_hand_computed():
    # queries:    q0   q1   q2   q3    q4   q5
    truth = [1, 1, 2, None, 2, 1]
    pred = [1, 2, 2, 1, 7, 1]
    conf = [0.9, 0.8, 0.7, 0.95, 0.5, 0.6]
    # class 1, predictions by confidence: q3 (0.95, no landmark: wrong), q0 (0.9, right), q5 (0.6, right);
    #   3 queries show 1 (q0, q1, q5): AP = (1/2 + 2/3) / 3 = 7/18
    # class 2: q1 (0.8, shows 1: wrong), q2 (0.7, right); 2 queries show 2 (q2, q4): AP = (1/2) / 2 = 1/4
    # class 7 is only predicted: left out
    assert per_class_ap(pred, conf, truth) == pytest.approx({1: 7 / 18, 2: 1 / 4})
    # class 1: q0, q5 right of q0, q1, q5; class 2: q2 right of q2, q4
    assert per_class_accuracy(pred, truth) == {1: (2, 3), 2: (1, 2)}
    assert per_class_ap([None], [0.0], [None]) == {}
    assert per_class_accuracy([3, None], [None, -1]) == {}


def test_per_class_ap_is_gap_restricted_to_the_class_on_random_inputs():
    rng = np.random.default_rng(2)
    for _ in range(300):
        ids, pred, conf, truth = _random_recognition(rng, 0.3, 0.2)
        per_class = per_class_ap(pred, conf, truth, ids)
        assert sorted(per_class) == sorted({t for t in truth if t is not None and t >= 0})
        for c, ap in per_class.items():
            only_c = [p if p == c else None for p in pred]
            truth_c = [t if t == c else None for t in truth]
            assert ap == pytest.approx(gap(only_c, conf, truth_c, ids))


def test_per_class_ap_equals_gap_when_every_query_is_of_one_class():
    # truth: class 3 or no landmark; every prediction is 3 or none, so GAP sees exactly class 3's predictions
    rng = np.random.default_rng(3)
    for _ in range(300):
        n = int(rng.integers(1, 30))
        ids = [f"{x:04x}" for x in rng.choice(5000, n, replace=False)]
        truth = [3 if rng.random() < 0.7 else None for _ in range(n)]
        pred = [3 if rng.random() < 0.8 else None for _ in range(n)]
        conf = [float(rng.integers(0, 4)) / 4 for _ in range(n)]
        per_class = per_class_ap(pred, conf, truth, ids)
        if 3 in truth:
            assert per_class == {3: pytest.approx(gap(pred, conf, truth, ids))}
        else:
            assert per_class == {}


def test_confused_pairs_hand_computed():
    # queries: q0 q1 q2  q3    q4    q5    q6  q7  q8
    truth = [1, 1, 2, None, None, 2, 1, 3, None]
    pred = [2, 2, 1, 4, None, None, -1, 3, 4]
    # wrong: q0 (1, 2), q1 (1, 2), q2 (2, 1), q3 (None, 4), q5 (2, None), q6 (1, None: -1 is no prediction),
    # q8 (None, 4); q4 (no landmark, no prediction) and q7 are right
    # count 2: (None, 4) before (1, 2) -- None first; count 1: (1, None), (2, None), (2, 1)
    expected = [(None, 4, 2), (1, 2, 2), (1, None, 1), (2, None, 1), (2, 1, 1)]
    assert confused_pairs(pred, truth) == expected
    assert confused_pairs(pred, truth, top=None) == expected
    assert confused_pairs(pred, truth, top=2) == expected[:2]
    assert confused_pairs([1, None], [1, None]) == []


def test_iou_hand_computed():
    assert iou([0, 0, 2, 2], [0, 0, 2, 2]) == pytest.approx(1.0)  # identical
    assert iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0  # disjoint
    assert iou([0, 0, 1, 1], [1, 0, 2, 1]) == 0.0  # touching edges: zero-width intersection
    # half of each box overlaps: intersection 1 x 2 = 2, union 4 + 4 - 2 = 6
    assert iou([0, 0, 2, 2], [1, 0, 3, 2]) == pytest.approx(1 / 3)
    # contained: intersection 2, union 4
    assert iou([0, 0, 2, 2], [0, 0, 1, 2]) == pytest.approx(1 / 2)
    assert iou([1, 1, 1, 3], [1, 1, 1, 3]) == 0.0  # empty (zero-width) box


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    corner = rng.uniform(0, 10, (n, 2))
    return np.concatenate([corner, corner + rng.uniform(0, 5, (n, 2))], axis=1)


def test_iou_matrix_equals_iou_pairwise_on_random_boxes():
    rng = np.random.default_rng(4)
    overlapping = 0
    for n, m in [(7, 5), (30, 20), (1, 1), (0, 3), (4, 0)]:
        a, b = _random_boxes(rng, n), _random_boxes(rng, m)
        if m:
            b[0] = [3, 3, 3, 6]  # an empty box
        got = iou_matrix(a, b)
        assert got.shape == (n, m)
        expected = np.array([[iou(x, y) for y in b] for x in a]).reshape(n, m)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
        overlapping += int(np.sum(got > 0))
    assert overlapping > 0  # the comparison is not all zeros


# two images, three ground-truth boxes: image a: A1, A2; image b: B1
_GT = {"a": [[0, 0, 10, 10], [20, 20, 30, 30]], "b": [[0, 0, 10, 10]]}


def test_detection_ap_hand_computed():
    detections = [
        ("a", 0.7, [0, 0, 10, 9]),  # duplicate on A1 (IoU 90/100): A1 already taken -> FP
        ("b", 0.95, [5, 0, 15, 10]),  # IoU with B1 = 50 / (100 + 100 - 50) = 1/3 < 0.5 -> FP
        ("a", 0.9, [0, 0, 10, 10]),  # A1, IoU 1 -> TP
        ("a", 0.8, [20, 20, 30, 31]),  # A2, IoU 100/110 -> TP
    ]
    # by score: FP (0.95), TP (0.9), TP (0.8), FP (0.7); 3 ground-truth boxes
    # recall    0, 1/3, 2/3, 2/3
    # precision 0, 1/2, 2/3, 2/4 -> monotone (max from the right): 2/3, 2/3, 2/3, 1/2
    # AP = (1/3 - 0) * 2/3 + (2/3 - 1/3) * 2/3 = 4/9  (without the monotone envelope: 1/3 * (1/2 + 2/3) = 7/18)
    assert detection_ap(detections, _GT) == pytest.approx(4 / 9)
    # at IoU >= 0.95 the A2 detection (10/11 = 0.909) turns FP: only the 0.9 TP at rank 2: 1/3 * 1/2
    assert detection_ap(detections, _GT, iou_threshold=0.95) == pytest.approx(1 / 6)


def test_detection_ap_perfect_empty_and_ties():
    perfect = [(img, 1.0, box) for img, boxes in _GT.items() for box in boxes]
    assert detection_ap(perfect, _GT) == pytest.approx(1.0)
    assert detection_ap([], _GT) == 0.0
    assert detection_ap(perfect, {"a": []}) == 0.0  # no ground-truth box
    # equal scores: image "a" before "b"; b has no ground truth, so its detection is a FP: TP, FP -> AP 1
    box = [0, 0, 1, 1]
    assert detection_ap([("b", 0.5, box), ("a", 0.5, box)], {"a": [box], "b": []}) == pytest.approx(1.0)
    assert detection_ap([("c", 0.6, box), ("a", 0.5, box)], {"a": [box]}) == pytest.approx(0.5)  # FP, TP


def test_detection_ap_duplicate_on_a_taken_box_is_a_false_positive_like_voc():
    # G1 and G2 overlap (IoU 80/120 = 2/3); the second detection's best box is G1, already taken: a FP as in
    # VOC's evaluation, although G2 is free and overlaps it by 2/3 >= 0.5. TP, FP: AP = 1/2 * 1 = 1/2
    gt = {"a": [[0, 0, 10, 10], [2, 0, 12, 10]]}
    detections = [("a", 0.9, [0, 0, 10, 10]), ("a", 0.8, [0, 0, 10, 10])]
    assert detection_ap(detections, gt) == pytest.approx(0.5)


def test_mean_iou_hand_computed():
    gt = {"a": [[0, 0, 2, 2], [10, 10, 12, 12]], "b": [[0, 0, 2, 2]], "c": [[0, 0, 1, 1]]}
    detections = [
        ("a", 0.9, [1, 0, 3, 2]),  # a1: IoU 2/6 = 1/3
        ("a", 0.1, [0, 0, 2, 2]),  # a1: IoU 1 (the score does not matter)
        ("a", 0.5, [10, 10, 12, 11]),  # a2: IoU 2/4 = 1/2
        ("b", 0.5, [0, 0, 1, 2]),  # b1: IoU 2/4 = 1/2
        ("d", 0.5, [0, 0, 1, 1]),  # no ground truth in d: ignored
    ]
    # best per box: a1 1, a2 1/2, b1 1/2, c1 0 (no detection in c): mean 2/4
    assert mean_iou(detections, gt) == pytest.approx(0.5)
    assert mean_iou(detections, {}) == 0.0
    assert mean_iou([], gt) == 0.0


def test_threshold_curve_equals_gap_and_accuracy_at_each_threshold():
    rng = np.random.default_rng(3)
    thresholds = np.linspace(0, 1, 11)
    for _ in range(30):
        n = 40
        truth = [None if rng.random() < 0.4 else int(rng.integers(0, 4)) for _ in range(n)]
        pred = [None if rng.random() < 0.2 else int(rng.integers(0, 4)) for _ in range(n)]
        conf = np.round(rng.random(n), 1).tolist()  # ties
        gaps, accs = M.threshold_curve(pred, conf, truth, thresholds)
        for t, g, a in zip(thresholds, gaps, accs, strict=True):
            kept = [p if p is not None and c >= t else None for p, c in zip(pred, conf, strict=True)]
            kept_conf = [c if p is not None else 0.0 for p, c in zip(kept, conf, strict=True)]
            assert abs(M.gap(kept, kept_conf, truth) - g) < 1e-9
            assert abs(M.accuracy(kept, truth) - a) < 1e-9


def test_roc_auc_counts_ties_half_and_needs_both_kinds():
    assert M.roc_auc([0.9, 0.8, 0.3, 0.1], [True, True, False, False]) == 1.0
    assert M.roc_auc([0.1, 0.9], [True, False]) == 0.0
    assert M.roc_auc([0.5, 0.5], [True, False]) == 0.5
    assert M.roc_auc([0.5, 0.7, 0.5], [True, True, False]) == 0.75
    assert M.roc_auc([0.5], [True]) is None
