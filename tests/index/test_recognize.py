import numpy as np
import pytest

from index.recognize import (
    TuneConfig,
    VoteConfig,
    class_counts,
    drop_held_out,
    gap_score,
    nonlandmark_similarity,
    tune,
    validation_split,
    vote,
)
from reports import metrics as M


def test_votes_sum_similarities_per_class():
    D = np.array([[0.9, 0.8, 0.7, 0.6]], np.float32)
    labels = np.array([[5, 7, 7, 5]])
    pred, conf = vote(D, labels, VoteConfig(k=4))
    # class 5: 0.9 + 0.6 = 1.5, class 7: 0.8 + 0.7 = 1.5 -> tie goes to the class seen first (5)
    assert pred.tolist() == [5] and abs(conf[0] - 1.5 / 4) < 1e-6
    pred, conf = vote(D, labels, VoteConfig(k=3))
    assert pred.tolist() == [7] and abs(conf[0] - 1.5 / 3) < 1e-6


def test_max_aggregation_takes_the_best_neighbour_of_each_class():
    D = np.array([[0.9, 0.8, 0.7, 0.6]], np.float32)
    labels = np.array([[5, 7, 7, 7]])
    pred, conf = vote(D, labels, VoteConfig(k=4))  # sum: 7 wins with 2.1 / 4
    assert pred.tolist() == [7] and abs(conf[0] - 2.1 / 4) < 1e-6
    pred, conf = vote(D, labels, VoteConfig(k=4, aggregate="max"))  # max: 5 wins with 0.9
    assert pred.tolist() == [5] and abs(conf[0] - 0.9) < 1e-6


def test_class_normalisation_lifts_the_long_tail():
    # class 1 has 100 database images, class 2 has 2; the query's neighbours: 1, 1, 1, 2, 2
    D = np.array([[0.6, 0.6, 0.6, 0.8, 0.8]], np.float32)
    labels = np.array([[1, 1, 1, 2, 2]])
    counts = class_counts(np.array([1] * 100 + [2] * 2))
    pred, conf = vote(D, labels, VoteConfig(k=5), counts=counts)
    assert pred.tolist() == [1] and abs(conf[0] - 1.8 / 5) < 1e-6  # 1.8 vs 1.6
    # class_norm 1: sum / min(n_c, k): class 1: 1.8 / 5 = 0.36; class 2: 1.6 / 2 = 0.8
    pred, conf = vote(D, labels, VoteConfig(k=5, class_norm=1.0), counts=counts)
    assert pred.tolist() == [2] and abs(conf[0] - 0.8) < 1e-6
    # class_norm 0.5: divide by 5 ** 0.5 * min(n_c, 5) ** 0.5: class 1: 1.8 / 5 = 0.36; class 2: 1.6 / sqrt(10)
    pred, conf = vote(D, labels, VoteConfig(k=5, class_norm=0.5), counts=counts)
    assert pred.tolist() == [2] and abs(conf[0] - 1.6 / np.sqrt(10)) < 1e-6


def test_unlabelled_neighbours_vote_for_no_landmark_and_threshold_applies():
    D = np.array([[0.9, 0.8, 0.1], [0.5, 0.4, 0.3], [0.2, 0.1, 0.05]], np.float32)
    labels = np.array([[-1, -1, 3], [3, 3, 3], [4, 4, 4]])
    pred, conf = vote(D, labels, VoteConfig(k=3, min_confidence=0.2))
    assert pred.tolist() == [-1, 3, -1]
    assert conf[0] == 0 and abs(conf[1] - 0.4) < 1e-6 and conf[2] == 0
    # without non-landmark votes the first query goes to class 3
    pred, _ = vote(D, labels, VoteConfig(k=3, nonlandmark_votes=False))
    assert pred.tolist() == [3, 3, 4]


def test_missing_neighbours_and_negative_scores_do_not_vote():
    D = np.array([[0.5, -0.2, -np.inf]], np.float32)
    labels = np.array([[2, 9, -1]])
    pred, conf = vote(D, labels, VoteConfig(k=3))
    assert pred.tolist() == [2] and abs(conf[0] - 0.5 / 3) < 1e-6


def test_nonlandmark_penalty_lowers_confidence():
    D = np.array([[0.9, 0.9], [0.9, 0.9]], np.float32)
    labels = np.array([[1, 1], [2, 2]])
    sims = np.array([0.1, 0.8], np.float32)  # the second query looks like known clutter
    pred, conf = vote(D, labels, VoteConfig(k=2, nonlandmark_weight=0.5), sims)
    # (0.9 - 0.5 x sim + 0.5) / 1.5
    np.testing.assert_allclose(conf, [(0.9 - 0.05 + 0.5) / 1.5, (0.9 - 0.4 + 0.5) / 1.5], atol=1e-6)
    assert pred.tolist() == [1, 2]
    pred, conf = vote(D, labels, VoteConfig(k=2, nonlandmark_weight=0.5, min_confidence=0.7), sims)
    assert pred.tolist() == [1, -1] and conf[1] == 0
    np.testing.assert_allclose(nonlandmark_similarity(np.array([[0.8, 0.4, -np.inf]], np.float32), 3), [0.4])


def test_vote_is_vectorised_and_equals_a_per_query_loop():
    rng = np.random.default_rng(0)
    D = -np.sort(-rng.random((300, 20)).astype(np.float32), axis=1)
    labels = rng.integers(-1, 6, (300, 20))
    counts = class_counts(rng.integers(0, 6, 200))
    config = VoteConfig(k=15, class_norm=0.5)
    pred, conf = vote(D, labels, config, counts=counts)
    ids, cnt = counts
    for q in range(len(D)):
        scores: dict[int, float] = {}
        for s, lab in zip(D[q, :15], labels[q, :15], strict=True):
            scores[int(lab)] = scores.get(int(lab), 0.0) + float(s)
        norm = {c: 15 ** 0.5 * min(int(cnt[ids == c][0]) if c in ids else 15, 15) ** 0.5 for c in scores}
        best = max((c for c in scores if c >= 0), key=lambda c: scores[c] / norm[c])  # first of the ties
        nl = scores.get(-1, -1.0) / norm.get(-1, 1.0)
        if nl > scores[best] / norm[best]:
            assert pred[q] == -1
        else:
            assert pred[q] == best and abs(conf[q] - scores[best] / norm[best]) < 1e-5


def test_gap_score_equals_the_reference_metric():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = 30
        truth = np.where(rng.random(n) < 0.4, -1, rng.integers(0, 4, n))
        pred = np.where(rng.random(n) < 0.2, -1, rng.integers(0, 4, n))
        conf = np.round(rng.random(n), 1).astype(np.float32)  # ties
        ids = [f"q{i:03d}" for i in range(n)]
        ref = M.gap([None if p < 0 else int(p) for p in pred], conf.tolist(),
                    [None if t < 0 else int(t) for t in truth], ids)
        assert abs(gap_score(pred, conf, truth) - ref) < 1e-9


def test_validation_split_holds_out_one_image_per_eligible_class():
    labels = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3, -1, -1, -1, -1])
    lm, nl = validation_split(labels, TuneConfig(min_class_images=3))
    assert sorted(labels[lm].tolist()) == [1, 3]  # class 2 has too few images
    assert len(nl) == 2 and (labels[nl] == -1).all()
    D = np.array([[0.9, 0.8, 0.7, 0.6]], np.float32)
    I = np.array([[4, 7, 1, -1]])
    D2, I2 = drop_held_out(D, I, np.array([7]), 3)
    assert I2.tolist() == [[4, 1, -1]] and np.isneginf(D2[0, 2])


def test_tuning_uses_the_penalty_when_it_helps():
    """Landmark queries: neighbours of their class at ~0.7, far from clutter. No-landmark queries: neighbours
    of random classes at ~0.7 too, but close to known clutter; only the penalty tells them apart."""
    rng = np.random.default_rng(0)
    n = 200
    truth = np.where(np.arange(n) % 2 == 0, rng.integers(0, 10, n), -1)
    labels = np.where(truth[:, None] >= 0, truth[:, None], rng.integers(0, 10, (n, 1))).repeat(5, 1)
    D = np.clip(0.7 + 0.05 * rng.standard_normal((n, 5)), 0, 1).astype(np.float32)
    D = -np.sort(-D, axis=1)
    sims = np.where(truth >= 0, 0.2, 0.8).astype(np.float32) + 0.05 * rng.standard_normal(n).astype(np.float32)
    tuned, record = tune(D, labels, truth, sims, VoteConfig(k=5), TuneConfig())
    assert tuned.nonlandmark_weight > 0
    assert record["tuned"]["gap"] > record["untuned"]["gap"] + 0.2
    assert record["tuned"]["accuracy"] > 0.9 > record["untuned"]["accuracy"]
    assert tuned.min_confidence > 0


def test_bad_vote_settings_are_refused():
    with pytest.raises(ValueError, match="aggregate"):
        VoteConfig(aggregate="mean")
    with pytest.raises(ValueError, match="class_norm"):
        VoteConfig(class_norm=2)
