import numpy as np

from index.recognize import VoteConfig, vote


def test_votes_sum_similarities_per_class():
    D = np.array([[0.9, 0.8, 0.7, 0.6]], np.float32)
    labels = np.array([[5, 7, 7, 5]])
    pred, conf = vote(D, labels, VoteConfig(k=4))
    # class 5: 0.9 + 0.6 = 1.5, class 7: 0.8 + 0.7 = 1.5 -> tie goes to the class seen first (5)
    assert pred.tolist() == [5] and abs(conf[0] - 1.5 / 4) < 1e-6
    pred, conf = vote(D, labels, VoteConfig(k=3))
    assert pred.tolist() == [7] and abs(conf[0] - 1.5 / 3) < 1e-6


def test_unlabelled_neighbours_vote_for_no_landmark_and_threshold_applies():
    D = np.array([[0.9, 0.8, 0.1], [0.5, 0.4, 0.3], [0.2, 0.1, 0.05]], np.float32)
    labels = np.array([[-1, -1, 3], [3, 3, 3], [4, 4, 4]])
    pred, conf = vote(D, labels, VoteConfig(k=3, min_confidence=0.2))
    assert pred.tolist() == [-1, 3, -1]
    assert conf[0] == 0 and abs(conf[1] - 0.4) < 1e-6 and conf[2] == 0


def test_missing_neighbours_and_negative_scores_do_not_vote():
    D = np.array([[0.5, -0.2, -3.4e38]], np.float32)
    labels = np.array([[2, 9, -1]])
    pred, conf = vote(D, labels, VoteConfig(k=3))
    assert pred.tolist() == [2] and abs(conf[0] - 0.5 / 3) < 1e-6
