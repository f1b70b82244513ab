import numpy as np
import pytest

from features.base import l2_normalize
from index.faiss_index import IndexConfig, VectorIndex, gpu_count
from pipeline.errors import CairnError


def _data(n=500, d=32, q=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, d))
    xb = l2_normalize(centres[rng.integers(0, 10, n)] + 0.3 * rng.normal(size=(n, d)))
    xq = l2_normalize(centres[rng.integers(0, 10, q)] + 0.3 * rng.normal(size=(q, d)))
    return xb, xq


def test_flat_search_equals_brute_force():
    xb, xq = _data()
    index = VectorIndex.build(xb, [f"img{i}" for i in range(len(xb))], np.arange(len(xb)) % 7)
    D, I = index.search(xq, 5, batch_size=7)  # several batches
    sims = xq @ xb.T
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(I, expected)
    np.testing.assert_allclose(D, np.take_along_axis(sims, expected, 1), rtol=1e-5, atol=1e-5)


def test_ids_and_labels_survive_save_and_load(tmp_path):
    xb, xq = _data()
    ids = [f"id-{i:04d}" for i in range(len(xb))]
    labels = np.where(np.arange(len(xb)) % 5 == 0, -1, np.arange(len(xb)) % 3)
    index = VectorIndex.build(xb, ids, labels, features_metadata={"method": "hog"})
    index.save(str(tmp_path / "ix"))
    back = VectorIndex.load(str(tmp_path / "ix"))
    D1, I1 = index.search(xq, 10)
    D2, I2 = back.search(xq, 10)
    np.testing.assert_array_equal(I1, I2)
    assert back.image_ids == ids and back.labels.tolist() == labels.tolist()
    assert back.features_metadata == {"method": "hog"} and back.config == IndexConfig()
    assert back.ids_of(I2[:1])[0] == [ids[j] for j in I1[0]]
    np.testing.assert_array_equal(back.labels_of(I2), labels[I2])


def test_dimension_mismatch_is_a_clear_error():
    xb, _ = _data(d=32)
    index = VectorIndex.build(xb, [str(i) for i in range(len(xb))], np.zeros(len(xb)))
    with pytest.raises(CairnError, match="dimension 16 but the index holds dimension 32"):
        index.search(np.zeros((3, 16), np.float32), 5)


def test_fewer_vectors_than_k_pads_with_minus_one():
    xb, xq = _data(n=3)
    index = VectorIndex.build(xb, ["a", "b", "c"], np.array([1, 2, 3]))
    _, I = index.search(xq, 5)
    assert (I[:, 3:] == -1).all() and (index.labels_of(I)[:, 3:] == -1).all()


def test_bad_factory_and_metric_are_user_errors():
    xb, _ = _data(n=10)
    with pytest.raises(CairnError, match="FAISS cannot build"):
        VectorIndex.build(xb, [str(i) for i in range(10)], np.zeros(10), IndexConfig(factory="NoSuchIndex"))
    with pytest.raises(CairnError, match="unknown metric"):
        VectorIndex.build(xb, [str(i) for i in range(10)], np.zeros(10), IndexConfig(metric="cos"))


def test_gpu_request_falls_back_to_cpu_without_a_gpu():
    xb, xq = _data()
    cpu = VectorIndex.build(xb, [str(i) for i in range(len(xb))], np.zeros(len(xb)))
    gpu = VectorIndex.build(xb, [str(i) for i in range(len(xb))], np.zeros(len(xb)), IndexConfig(use_gpu=True))
    np.testing.assert_array_equal(cpu.search(xq, 5)[1], gpu.search(xq, 5)[1])
    if gpu_count() == 0:
        assert gpu._search_index is gpu.index
