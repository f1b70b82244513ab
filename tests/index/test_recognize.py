import numpy as np
import pytest

from index.recognize import (
    Answers,
    TuneConfig,
    ValidationSplit,
    VoteConfig,
    calibrated,
    class_counts,
    fit_calibration,
    gap_score,
    keep_first,
    nonlandmark_similarity,
    query_threshold,
    threshold_figures,
    tune,
    validation_neighbours,
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


def test_validation_split_holds_out_several_images_per_class_and_makes_unseen_landmark_queries():
    # class 0: 10 images, class 1: 5, class 2: 2 (too few), 4 known non-landmark images
    labels = np.array([0] * 10 + [1] * 5 + [2] * 2 + [-1] * 4)
    config = TuneConfig(landmark_queries=6, class_share=0.2)
    split = validation_split(labels, config)
    # ceil(6 / 2 classes) = 3 per class, at most 20% of a class: 2 of class 0, 1 of class 1
    assert sorted(labels[split.landmark].tolist()) == [0, 0, 1]
    assert split.unseen.tolist() == split.landmark.tolist()  # every held-out landmark image, again as unseen
    assert len(split.nonlandmark) == 2 and (labels[split.nonlandmark] == -1).all()
    again = validation_split(labels, config)
    assert again.landmark.tolist() == split.landmark.tolist()  # deterministic
    # many classes, a small budget: one image of that many classes
    many = np.repeat(np.arange(50), 4)
    split = validation_split(many, TuneConfig(landmark_queries=7, unseen_queries=3))
    assert len(split.landmark) == 7 and len(set(many[split.landmark].tolist())) == 7
    assert len(split.unseen) == 3 and set(split.unseen) <= set(split.landmark)


def test_unseen_landmark_queries_lose_every_image_of_their_own_class():
    """A tiny database: rows 0-3 class 7, rows 4-6 class 8, row 7 class 9. Row 0 is held out and is an
    unseen-landmark query too; its search found rows 0, 1, 4, 2, 7, 5 (itself first)."""
    db_labels = np.array([7, 7, 7, 7, 8, 8, 8, 9])
    split = ValidationSplit(np.array([0]), np.array([0]), np.empty(0, np.int64))
    D = np.array([[1.0, 0.9, 0.8, 0.7, 0.6, 0.5]], np.float32)
    I = np.array([[0, 1, 4, 2, 7, 5]])
    seen_D, seen_I, un_D, un_I, of_unseen = validation_neighbours(D, I, db_labels, np.array([0]), split, 3)
    assert seen_I.tolist() == [[1, 4, 2]]  # itself (held out) removed
    assert of_unseen.tolist() == [True]
    assert un_I.tolist() == [[4, 7, 5]] and un_D.tolist() == [[np.float32(0.8), np.float32(0.6), np.float32(0.5)]]
    D = np.array([[0.9, 0.8, 0.7, 0.6]], np.float32)
    I = np.array([[4, 7, 1, -1]])
    D2, I2 = keep_first(D, I, ~np.isin(I, [7]), 3)
    assert I2.tolist() == [[4, 1, -1]] and np.isneginf(D2[0, 2])


def test_tuning_keeps_the_top1_rule_where_it_is_right_and_votes_are_wrong():
    """Landmark queries: the nearest image is of their landmark (0.9) but 6 of the 10 neighbours are of a
    frequent other landmark (0.6). Unseen-landmark queries: 10 neighbours of one landmark at 0.7. The sum vote
    answers the landmark queries wrong and ranks the unseen ones first; the top-1 rule is right."""
    n = 60
    truth = np.where(np.arange(n) < 40, np.arange(n) % 4 + 1, -1)
    D = np.full((n, 10), 0.6, np.float32)
    labels = np.zeros((n, 10), np.int64)  # landmark 0: the frequent one
    D[:40, 0], labels[:40, 0] = 0.9, truth[:40]
    labels[:40, 1:4] = truth[:40, None]
    D[:40, 1:4] = 0.58
    D[40:] = 0.7
    labels[40:] = 3
    D = -np.sort(-D, axis=1)
    sum_pred, sum_conf = vote(D, labels, VoteConfig(k=10))
    assert (sum_pred[:40] == 0).all()  # the vote is wrong on every landmark query
    tuned, record, _ = tune(D, labels, truth, None, VoteConfig(k=10), TuneConfig())
    assert tuned.rule == "vote" and tuned.aggregate == "max" and tuned.margin == 0
    assert record["tuned"]["gap"] >= record["top1"]["gap"] - 1e-9 > gap_score(sum_pred, sum_conf, truth) + 0.5
    # the threshold sits between the landmark queries' 0.9 and the unseen ones' 0.7: every query right
    assert 0.7 < tuned.min_confidence <= 0.9 and record["tuned"]["accuracy"] == 1.0


def test_calibration_maps_more_inliers_to_a_higher_confidence():
    """Right pairs have many inliers, wrong ones few (unseen-landmark queries: all wrong); the similarity
    hardly tells them apart."""
    rng = np.random.default_rng(0)
    n = 200
    truth = np.where(np.arange(n) < 120, 5, -1)
    labels = np.tile(np.array([5, 6, 7, 8]), (n, 1))
    inliers = rng.integers(0, 12, (n, 4))
    inliers[:120, 0] = rng.integers(15, 60, 120)  # the right class of the landmark queries
    sims = np.clip(0.7 + 0.05 * rng.standard_normal((n, 4)), 0, 1).astype(np.float32)
    a, b, c = fit_calibration(sims, labels, inliers, truth)
    assert a > 0 and b >= 0
    p = calibrated(np.array([0, 5, 20, 60]), np.full(4, 0.7, np.float32), (a, b, c))
    assert np.all(np.diff(p) > 0) and p[0] < 0.2 and p[-1] > 0.8
    # the verified rule with it: the landmark queries rank above the others, and tuning prefers it
    pred, conf = vote(sims, labels, VoteConfig(rule="verified", calibration=(a, b, c)), inliers=inliers)
    assert (pred[:120] == 5).all() and conf[:120].min() > conf[120:].max()
    tuned, record, _ = tune(sims, labels, truth, None, VoteConfig(k=4), TuneConfig(), verified=(sims, labels, inliers))
    assert tuned.rule == "verified" and record["tuned"]["gap"] > record["top1"]["gap"] + 0.3
    assert record["tuned"]["accuracy"] > 0.95


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
    tuned, record, _ = tune(D, labels, truth, sims, VoteConfig(k=5), TuneConfig())
    assert tuned.nonlandmark_weight > 0
    assert record["tuned"]["gap"] > record["untuned"]["gap"] + 0.2
    assert record["tuned"]["accuracy"] > 0.9 > record["untuned"]["accuracy"]
    assert tuned.min_confidence > 0


def test_bad_vote_settings_are_refused():
    with pytest.raises(ValueError, match="aggregate"):
        VoteConfig(aggregate="mean")
    with pytest.raises(ValueError, match="class_norm"):
        VoteConfig(class_norm=2)


def test_validation_split_follows_image_ids_not_rows():
    """An index built on workers holds its rows in shard order, a local one in id order: given the image ids, the
    same images are held out (and made unseen-landmark queries) whatever the rows' order."""
    rng = np.random.default_rng(3)
    labels = np.concatenate([np.repeat(np.arange(6), 9), np.full(8, -1)])
    ids = np.array([f"img{i:03d}" for i in range(len(labels))])
    config = TuneConfig(landmark_queries=12, unseen_queries=5)
    split = validation_split(labels, config, ids)
    perm = rng.permutation(len(labels))
    moved = validation_split(labels[perm], config, ids[perm])
    for part in ("landmark", "unseen", "nonlandmark"):
        assert sorted(ids[getattr(split, part)]) == sorted(ids[perm][getattr(moved, part)]), part
    assert len(split.landmark) == 6 and len(split.unseen) == 5 and len(split.nonlandmark) == 4
    # without ids the rows decide: another order holds out other images
    plain, shuffled = validation_split(labels, config), validation_split(labels[perm], config)
    assert sorted(ids[plain.landmark]) != sorted(ids[perm][shuffled.landmark])


def _open_set(rng, n_landmark, n_other, other_mean):
    """Answers whose landmark queries are right at confidence ~N(0.85, 0.04) and whose no-landmark queries are
    answered wrong at ~N(other_mean, 0.03)."""
    truth = np.concatenate([rng.integers(0, 4, n_landmark), np.full(n_other, -1)])
    conf = np.concatenate([rng.normal(0.85, 0.04, n_landmark), rng.normal(other_mean, 0.03, n_other)])
    pred = np.where(truth >= 0, truth, rng.integers(0, 4, len(truth)))
    return Answers(pred.astype(np.int64), np.clip(conf, 0, 1).astype(np.float32), truth.astype(np.int64))


def test_the_query_threshold_follows_unseen_landmarks_that_look_like_the_database():
    """Validation's unseen landmarks are the database's own (top-1 ~0.65); the queries' unseen landmark looks
    much more like the database (~0.77), as on Porto. The validation threshold lets most of them through; the
    threshold fitted to the queries estimates their landmark share and drops them."""
    rng = np.random.default_rng(0)
    validation = _open_set(rng, 300, 300, 0.65)
    queries = _open_set(rng, 200, 300, 0.77)  # 40% of the queries show a database landmark
    config = TuneConfig(gap_weight=0.0)
    from index.recognize import choose_threshold
    t_val, _ = choose_threshold(validation.pred, validation.conf, validation.truth, config)
    t_q, record = query_threshold(validation, queries.pred, queries.conf, config)
    assert abs(record["landmark_share"] - 0.4) < 0.06
    acc_val = threshold_figures(queries, t_val, 0.5)["accuracy"]
    acc_q = threshold_figures(queries, t_q, 0.5)["accuracy"]
    best = max(threshold_figures(queries, t, 0.5)["accuracy"] for t in np.unique(queries.conf))
    assert t_val < 0.75 < t_q < 0.85 and acc_q > acc_val + 0.3 and acc_q > best - 0.03
    assert abs(record["estimated_accuracy"] - acc_q) < 0.05
    # only ranks count: the same answers kept after any increasing transform of every confidence
    squash = lambda a: Answers(a.pred, (a.conf ** 3).astype(np.float32), a.truth)  # noqa: E731
    t3, _ = query_threshold(squash(validation), queries.pred, squash(queries).conf, config)
    assert np.array_equal(squash(queries).conf >= t3, queries.conf >= t_q)
    # when the queries' unseen landmarks look like validation's, the two thresholds keep alike
    easy = _open_set(rng, 200, 300, 0.65)
    t_easy, _ = query_threshold(validation, easy.pred, easy.conf, config)
    assert threshold_figures(easy, t_easy, 0.5)["accuracy"] >= threshold_figures(easy, t_val, 0.5)["accuracy"] - 0.02


def test_the_query_threshold_weighs_gap_and_needs_enough_queries():
    rng = np.random.default_rng(1)
    validation = _open_set(rng, 300, 300, 0.65)
    queries = _open_set(rng, 200, 300, 0.77)
    # GAP alone never gains from dropping an answer: every answer is kept
    t, record = query_threshold(validation, queries.pred, queries.conf, TuneConfig(gap_weight=1.0))
    assert t == 0.0 and record["estimated_gap"] == record["estimated_gap_all_answers"]
    # queries without any answer count as dropped whatever the threshold, and too few answered ones fall back
    pred = queries.pred.copy()
    pred[40:] = -1
    t, record = query_threshold(validation, pred, queries.conf, TuneConfig(min_threshold_queries=50))
    assert t is None and "40 answered queries" in record["skipped"]
    t, record = query_threshold(Answers(validation.pred[:5], validation.conf[:5], validation.truth[:5]),
                                queries.pred, queries.conf, TuneConfig())
    assert t is None and "validation landmark queries" in record["skipped"]
    with pytest.raises(ValueError, match="threshold_from"):
        TuneConfig(threshold_from="test")


def test_the_query_threshold_skips_what_it_cannot_estimate_and_never_keeps_what_it_dropped():
    rng = np.random.default_rng(2)
    validation = _open_set(rng, 300, 300, 0.65)
    queries = _open_set(rng, 200, 300, 0.77)
    # validation landmark queries almost never answered: no estimate of the landmark share, no query threshold
    silent = Answers(np.where(validation.truth >= 0, -1, validation.pred), validation.conf, validation.truth)
    t, record = query_threshold(silent, queries.pred, queries.conf, TuneConfig())
    assert t is None and "have an answer" in record["skipped"]
    # a non-finite confidence counts as no answer
    conf = queries.conf.copy()
    conf[:5] = np.nan
    t, record = query_threshold(validation, queries.pred, conf, TuneConfig())
    assert record["answered_queries"] == len(conf) - 5 and 0 < t < 1
