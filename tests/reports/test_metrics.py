import numpy as np
import pytest

from reports.metrics import (
    accuracy,
    average_precision_at_k,
    gap,
    landmark_accuracy,
    mean_average_precision_at_k,
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


def _reference_gap(predictions: dict, solution: dict) -> float:
    """A straightforward transcription of the Kaggle definition, for randomised comparison."""
    m = sum(1 for v in solution.values() if v)
    ordered = sorted(predictions.items(), key=lambda kv: (kv[0], kv[1][0]))
    ordered = sorted(ordered, key=lambda kv: kv[1][1], reverse=True)
    correct, total = 0, 0.0
    for i, (key, (cls, _)) in enumerate(ordered, start=1):
        if cls in solution[key]:
            correct += 1
            total += correct / i
    return total / m if m else 0.0


def test_gap_matches_a_reference_on_random_inputs_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        ids = [f"{x:04x}" for x in rng.choice(5000, n, replace=False)]
        truth = [None if rng.random() < 0.4 else int(rng.integers(0, 4)) for _ in range(n)]
        pred = [None if rng.random() < 0.2 else int(rng.integers(0, 4)) for _ in range(n)]
        conf = [float(rng.integers(0, 4)) / 4 for _ in range(n)]  # many ties
        solution = {i: ([t] if t is not None else []) for i, t in zip(ids, truth, strict=True)}
        predictions = {i: (p, c) for i, p, c in zip(ids, pred, conf, strict=True) if p is not None}
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
