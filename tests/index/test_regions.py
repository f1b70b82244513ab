"""Regional search (index/regions.py): an index of region vectors answered per image, queries merged per image."""

from __future__ import annotations

import numpy as np
import pytest

from index.faiss_index import IndexConfig, VectorIndex
from index.regions import RegionalIndex, best_per_group, factorize, group_queries, merge_rows


def test_factorize_and_group_queries():
    codes, first = factorize(["b", "a", "b", "c", "a"])
    np.testing.assert_array_equal(codes, [0, 1, 0, 2, 1])
    np.testing.assert_array_equal(first, [0, 1, 3])
    assert group_queries(["q", "q", "r"]) == (["q", "r"], pytest.approx(np.array([0, 0, 1])))


def test_best_per_group_hand_computed():
    D = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]], np.float32)
    I = np.array([[3, 1, 2, 0, -1]])
    group_of = np.array([0, 0, 1, 1])  # rows 0, 1 are image 0; rows 2, 3 image 1
    D2, G = best_per_group(D, I, group_of, k=3)
    np.testing.assert_array_equal(G, [[1, 0, -1]])  # row 3 (image 1) first, then row 1 (image 0)
    np.testing.assert_allclose(D2[0, :2], [0.9, 0.8])
    assert D2[0, 2] == -np.inf


def test_merge_rows_keeps_each_images_best_over_the_query_regions():
    D = np.array([[0.5, 0.4, 0.1], [0.9, 0.3, 0.2], [0.7, 0.6, 0.0]], np.float32)
    I = np.array([[10, 11, 12], [11, 13, -1], [12, 10, 11]])
    owner = np.array([0, 0, 1])
    D2, I2 = merge_rows(owner, D, I, k=3)
    np.testing.assert_array_equal(I2[0], [11, 10, 13])  # 11 at 0.9 (row 1), 10 at 0.5, 13 at 0.3
    np.testing.assert_allclose(D2[0], [0.9, 0.5, 0.3])
    np.testing.assert_array_equal(I2[1], [12, 10, 11])
    np.testing.assert_allclose(D2[1], [0.7, 0.6, 0.0])


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_regional_index_equals_brute_force_max_over_regions(metric):
    rng = np.random.default_rng(0)
    regions = rng.integers(1, 4, 30)  # 30 images with 1 to 3 regions each
    ids = [f"img{i}" for i, n in enumerate(regions) for _ in range(n)]
    labels = np.array([i % 5 for i, n in enumerate(regions) for _ in range(n)], np.int64)
    xb = rng.standard_normal((len(ids), 16)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    inner = VectorIndex.build(xb, ids, labels, IndexConfig(factory="Flat", metric=metric),
                              features_metadata={"regions": {"config": {}}})
    index = RegionalIndex(inner)
    assert index.ntotal == 30 and index.regions == len(ids) and index.regions_per_image == regions.max()
    xq = rng.standard_normal((4, 16)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    D, I = index.search(xq, 10)
    sims = xq @ xb.T
    codes, _ = factorize(ids)
    best = np.full((4, 30), -np.inf)
    for r, c in enumerate(codes):
        best[:, c] = np.maximum(best[:, c], sims[:, r])
    expected = np.argsort(-best, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(I, expected)
    got = D if metric == "ip" else 1 - D / 2  # unit vectors: squared L2 = 2 - 2 cos
    np.testing.assert_allclose(got, np.take_along_axis(best, expected, axis=1), atol=1e-5)
    assert [index.image_ids[j] for j in I[0]] == [f"img{j}" for j in expected[0]]
    np.testing.assert_array_equal(index.labels_of(I), expected % 5)
