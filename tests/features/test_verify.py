import cv2
import numpy as np
import pytest

from features.local import LocalFeatures
from features.verify import (
    RerankConfig,
    Verification,
    VerifyConfig,
    effective_method,
    estimate,
    match,
    pixel_threshold,
    rerank,
    rerank_query,
    verify,
)
from index.recognize import VoteConfig, vote

W, H = 640, 480
PLANTED = {
    "homography": np.array([[1.05, 0.08, 25.0], [-0.06, 0.97, -15.0], [2e-4, -1e-4, 1.0]]),
    "affine": np.array([[1.1, 0.2, 20.0], [-0.1, 0.9, 10.0], [0.0, 0.0, 1.0]]),
    "similarity": np.array([[0.9 * np.cos(0.3), -0.9 * np.sin(0.3), 60.0],
                            [0.9 * np.sin(0.3), 0.9 * np.cos(0.3), -20.0], [0.0, 0.0, 1.0]]),
}


def planted_correspondences(H_true: np.ndarray, seed: int = 0, n_in: int = 80, n_out: int = 120):
    """n_in points mapped by H_true plus 0.5 px noise, then n_out random pairs; shuffled."""
    rng = np.random.default_rng(seed)
    src = rng.uniform([0, 0], [W, H], (n_in + n_out, 2))
    dst = cv2.perspectiveTransform(src[None], H_true)[0] + rng.normal(0, 0.5, (n_in + n_out, 2))
    dst[n_in:] = rng.uniform([0, 0], [W, H], (n_out, 2))
    truth = np.arange(n_in + n_out) < n_in
    perm = rng.permutation(n_in + n_out)
    return src[perm].astype(np.float32), dst[perm].astype(np.float32), truth[perm]


def as_3x3(model: np.ndarray) -> np.ndarray:
    return model if model.shape == (3, 3) else np.vstack([model, [0.0, 0.0, 1.0]])


def corner_error(model: np.ndarray, H_true: np.ndarray) -> float:
    corners = np.array([[[0, 0], [W, 0], [W, H], [0, H]]], np.float64)
    a = cv2.perspectiveTransform(corners, as_3x3(model))
    b = cv2.perspectiveTransform(corners, H_true)
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("method", ["magsac", "ransac"])
@pytest.mark.parametrize("model", ["homography", "affine", "similarity"])
def test_estimate_recovers_planted_inliers_and_model(model, method):
    src, dst, truth = planted_correspondences(PLANTED[model])
    inliers, fitted = estimate(src, dst, VerifyConfig(model=model, method=method))
    assert inliers.dtype == bool and inliers.shape == truth.shape
    assert np.sum(inliers != truth) <= 2  # observed: 0 in every case
    assert fitted.shape == ((3, 3) if model == "homography" else (2, 3))
    assert corner_error(fitted, PLANTED[model]) < 2.0  # pixels at the image corners; observed < 0.5


def test_similarity_falls_back_to_ransac():
    assert effective_method(VerifyConfig(model="similarity", method="magsac")) == "ransac"
    assert effective_method(VerifyConfig(model="affine", method="magsac")) == "magsac"
    assert effective_method(VerifyConfig(model="homography", method="ransac")) == "ransac"


def test_estimate_is_reproducible_and_seeded():
    src, dst, _ = planted_correspondences(PLANTED["homography"], seed=3, n_in=40, n_out=160)
    config = VerifyConfig(seed=7)
    a, b = estimate(src, dst, config), estimate(src, dst, config)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("model", ["homography", "affine", "similarity"])
def test_estimate_degenerate_inputs_do_not_raise(model):
    config = VerifyConfig(model=model)
    need = {"homography": 4, "affine": 3, "similarity": 2}[model]
    rng = np.random.default_rng(0)
    few = rng.uniform(0, 100, (need - 1, 2)).astype(np.float32)
    inl, m = estimate(few, few, config)
    assert m is None and inl.shape == (need - 1,) and not inl.any()
    inl, m = estimate(np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32), config)
    assert m is None and inl.shape == (0,)
    same = np.full((20, 2), 5.0, np.float32)  # all points coincide
    inl, m = estimate(same, same + 3, config)
    assert inl.shape == (20,)
    line = np.stack([np.arange(20), 2 * np.arange(20)], 1).astype(np.float32)  # collinear
    estimate(line, line * 1.5, config)
    nan = rng.uniform(0, 100, (10, 2)).astype(np.float32)
    nan[0] = np.nan
    inl, m = estimate(nan, nan, config)
    assert not inl[0]


def test_ratio_test_keeps_distinct_and_rejects_ambiguous():
    xb = np.array([[0, 0], [10, 0], [10, 1]], np.float32)
    xq = np.array([[0.5, 0], [10, 0.5]], np.float32)  # q0: clear nearest d0; q1: halfway between d1 and d2
    np.testing.assert_array_equal(match(xq, xb, VerifyConfig(matcher="ratio")), [[0, 0]])


def test_ratio_is_on_distances_not_squared_distances():
    xb = np.array([[0, 0], [2, 0]], np.float32)
    passes = np.array([[0.85, 0]], np.float32)  # distances 0.85 / 1.15 = 0.74 < 0.8
    fails = np.array([[0.9, 0]], np.float32)  # 0.9 / 1.1 = 0.82 > 0.8 (squared: 0.67, would pass)
    assert len(match(passes, xb, VerifyConfig(ratio=0.8))) == 1
    assert len(match(fails, xb, VerifyConfig(ratio=0.8))) == 0


def test_mutual_nearest_neighbours():
    xb = np.array([[0], [1], [5]], np.float32)
    xq = np.array([[0.1], [0.2], [4.0]], np.float32)
    # q0 -> d0 <- q0 ; q1 -> d0 but d0 -> q0 ; q2 -> d2 <- q2
    np.testing.assert_array_equal(match(xq, xb, VerifyConfig(matcher="mutual")), [[0, 0], [2, 2]])
    # ratio alone: q0 (0.1 / 0.9) and q2 (1 / 3) pass, q1 (0.2 / 0.8 = 0.25) passes too
    np.testing.assert_array_equal(match(xq, xb, VerifyConfig(matcher="ratio")), [[0, 0], [1, 0], [2, 2]])
    np.testing.assert_array_equal(match(xq, xb, VerifyConfig(matcher="both")), [[0, 0], [2, 2]])


def test_match_edge_cases():
    empty = np.zeros((0, 4), np.float32)
    some = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    for a, b in ((empty, some), (some, empty), (empty, empty)):
        out = match(a, b)
        assert out.shape == (0, 2) and out.dtype == np.int64
    one = some[:1]
    # a single database descriptor has no rival: every query passes the ratio test, one is mutual
    np.testing.assert_array_equal(match(some, one, VerifyConfig(matcher="ratio"))[:, 1], np.zeros(5))
    assert len(match(some, one, VerifyConfig(matcher="mutual"))) == 1
    dup = np.array([[1, 1], [1, 1]], np.float32)  # duplicates: exact tie fails the ratio test
    assert len(match(np.array([[1, 1.1]], np.float32), dup)) == 0
    with pytest.raises(ValueError):
        match(some, some[:, :3])


def test_max_matches_keeps_the_most_distinctive():
    xb = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    xq = np.array([[3, 0], [0, 0.5], [1, 0], [10, 10]], np.float32)
    full = match(xq, xb, VerifyConfig(ratio=1.0))
    np.testing.assert_array_equal(full, [[0, 0], [1, 0], [2, 0]])  # q3 is equidistant from d1 and d2
    np.testing.assert_array_equal(match(xq, xb, VerifyConfig(ratio=1.0, max_matches=2)), [[1, 0], [2, 0]])


def texture(seed: int) -> np.ndarray:
    """[H, W] uint8 multi-scale smooth noise: rich in SIFT keypoints, unrelated across seeds."""
    rng = np.random.default_rng(seed)
    acc = np.zeros((H, W), np.float32)
    for cell, amp in ((64, 1.0), (24, 0.7), (8, 0.5), (3, 0.3)):
        small = rng.standard_normal((H // cell + 2, W // cell + 2)).astype(np.float32)
        big = cv2.resize(small, (W + 2 * cell, H + 2 * cell), interpolation=cv2.INTER_CUBIC)
        acc += amp * big[cell:cell + H, cell:cell + W]
    return ((acc - acc.min()) / (acc.max() - acc.min()) * 255).astype(np.uint8)


def sift_features(img: np.ndarray) -> LocalFeatures:
    kps, desc = cv2.SIFT_create().detectAndCompute(img, None)
    if desc is None:
        return LocalFeatures.empty(128, img.shape[1], img.shape[0])
    arr = lambda values: np.array(values, np.float32)  # noqa: E731
    return LocalFeatures(arr([k.pt for k in kps]).reshape(-1, 2), arr([k.size for k in kps]),
                         arr([k.angle for k in kps]), arr([k.response for k in kps]), desc.astype(np.float32),
                         img.shape[1], img.shape[0])


@pytest.fixture(scope="module")
def sift_trio():
    """(original, perspective-warped original, unrelated) SIFT features, and the planted warp."""
    H_true = np.array([[0.9, 0.1, 30.0], [-0.08, 0.95, 20.0], [2e-4, 1e-4, 1.0]])
    img = texture(1)
    warped = cv2.warpPerspective(img, H_true, (W, H))
    return sift_features(img), sift_features(warped), sift_features(texture(2)), H_true


def test_verify_same_scene_vs_unrelated(sift_trio):
    orig, warped, other, H_true = sift_trio
    config = VerifyConfig()
    same = verify(orig, warped, config)
    assert isinstance(same, Verification) and same.verified
    assert same.inliers > 30  # observed: ~1000 of ~1000 matches
    assert same.inlier_pairs.shape == (same.inliers, 2) and same.inlier_pairs.dtype == np.int64
    assert corner_error(same.model, H_true) < 2.0  # observed < 0.5 px
    # inlier pairs really map onto each other
    proj = cv2.perspectiveTransform(orig.keypoints[same.inlier_pairs[:, 0]][None].astype(np.float64), H_true)[0]
    assert np.median(np.linalg.norm(proj - warped.keypoints[same.inlier_pairs[:, 1]], axis=1)) < 1.0
    for q, d in ((orig, other), (warped, other)):
        diff = verify(q, d, config)
        assert diff.inliers < config.min_inliers and not diff.verified  # observed: 5
    for model in ("affine", "similarity"):
        assert verify(orig, warped, VerifyConfig(model=model)).inliers > 30


def test_verify_descriptor_override_and_reproducibility(sift_trio):
    orig, warped, _, _ = sift_trio
    root = lambda x: np.sqrt(x / np.maximum(x.sum(1, keepdims=True), 1e-12)).astype(np.float32)  # noqa: E731
    a = verify(orig, warped, desc_q=root(orig.descriptors), desc_d=root(warped.descriptors))
    b = verify(orig, warped, desc_q=root(orig.descriptors), desc_d=root(warped.descriptors))
    assert a.inliers > 30
    assert (a.matches, a.inliers) == (b.matches, b.inliers)
    np.testing.assert_array_equal(a.inlier_pairs, b.inlier_pairs)
    np.testing.assert_array_equal(a.model, b.model)
    with pytest.raises(ValueError):
        verify(orig, warped, desc_q=orig.descriptors[:5])


def test_verify_empty_and_tiny_features(sift_trio):
    orig = sift_trio[0]
    empty = LocalFeatures.empty(128, W, H)
    for q, d in ((empty, orig), (orig, empty), (empty, empty)):
        v = verify(q, d)
        assert (v.matches, v.inliers, v.model, v.verified) == (0, 0, None, False)
        assert v.inlier_pairs.shape == (0, 2)
    tiny = LocalFeatures(orig.keypoints[:3], orig.scales[:3], orig.orientations[:3], orig.scores[:3],
                         orig.descriptors[:3], W, H)
    v = verify(tiny, orig)
    assert v.matches == 3 and v.inliers == 0 and v.model is None


def test_pixel_threshold_scales_with_database_size():
    config = VerifyConfig(threshold=8.0, reference_side=640)
    assert pixel_threshold(config, 640, 480) == 8.0
    assert pixel_threshold(config, 960, 1280) == 16.0
    assert pixel_threshold(config, 0, 0) == 8.0
    assert pixel_threshold(VerifyConfig(reference_side=0), 1280, 960) == 8.0


def test_rerank_hand_computed():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5], np.float32)
    inliers = np.array([3, 50, 12, 12, 100])
    order, new = rerank(scores, inliers, RerankConfig(top_k=4, saturation=40))
    # verified: 1 (50 -> capped 40), 2 and 3 (12, tie broken by rank); unverified: 0; beyond top_k: 4
    np.testing.assert_array_equal(order, [1, 2, 3, 0, 4])
    expected = [0.999 * 1 + 1e-3 * 0.8, 0.999 * 0.3 + 1e-3 * 0.7, 0.999 * 0.3 + 1e-3 * 0.6, 1e-3 * 0.9, 1e-6 * 0.5]
    np.testing.assert_allclose(new, expected, rtol=1e-6)
    assert new.dtype == np.float32 and order.dtype == np.int64


def test_rerank_saturation_ties_go_by_score_and_scores_are_monotone():
    rng = np.random.default_rng(0)
    for _ in range(50):
        K = int(rng.integers(1, 30))
        scores = np.sort(rng.uniform(-0.2, 1.0, K))[::-1].astype(np.float32)
        inliers = rng.integers(0, 80, K)
        config = RerankConfig(top_k=int(rng.integers(1, 25)), saturation=int(rng.integers(10, 60)))
        order, new = rerank(scores, inliers, config)
        assert sorted(order.tolist()) == list(range(K))
        assert np.all(np.diff(new) <= 0) and new.min() >= 0 and new.max() <= 1
    order, _ = rerank(np.array([0.9, 0.5, 0.4]), np.array([45, 60, 40]), RerankConfig(saturation=40))
    np.testing.assert_array_equal(order, [0, 1, 2])  # all saturated: original similarity decides


def test_rerank_edge_cases():
    order, new = rerank(np.zeros(0, np.float32), np.zeros(0, int))
    assert order.shape == (0,) and new.shape == (0,)
    order, new = rerank(np.array([0.7], np.float32), np.array([0]))
    np.testing.assert_array_equal(order, [0])
    np.testing.assert_allclose(new, [7e-4], rtol=1e-6)
    with pytest.raises(ValueError):
        rerank(np.array([0.1, 0.9]), np.array([0, 0]))  # not best first
    with pytest.raises(ValueError):
        RerankConfig(saturation=5)  # below min_inliers
    with pytest.raises(ValueError):
        VerifyConfig(matcher="knn")


def test_vote_on_reranked_scores_prefers_verified_class():
    scores = np.array([0.9, 0.85, 0.8, 0.3], np.float32)
    labels = np.array([7, 7, 7, 3])
    inliers = np.array([2, 0, 4, 35])
    order, new = rerank(scores, inliers, RerankConfig(top_k=4))
    pred, conf = vote(new[None], labels[order][None], VoteConfig(k=4))
    assert pred[0] == 3 and 0 < conf[0] <= 1
    pred_raw, _ = vote(scores[None], labels[None], VoteConfig(k=4))
    assert pred_raw[0] == 7


def test_rerank_query_moves_the_true_match_first(sift_trio):
    orig, warped, other, _ = sift_trio
    calls = []

    def prepare(x):
        calls.append(len(x))
        return np.asarray(x, np.float32)

    order, new, inliers = rerank_query(warped, [other, None, orig], np.array([0.9, 0.8, 0.5], np.float32),
                                       RerankConfig(top_k=3), prepare=prepare)
    np.testing.assert_array_equal(order, [2, 0, 1])
    assert inliers[2] > 30 and inliers[0] < 10 and inliers[1] == 0
    assert new[0] > 0.9 and np.all(np.diff(new) <= 0)
    assert len(calls) == 3  # the query once, each non-missing candidate once
    _, _, inl2 = rerank_query(warped, [other, orig], np.array([0.9, 0.5]), RerankConfig(top_k=1))
    assert inl2[1] == 0  # beyond top_k: not verified
