import numpy as np
import pytest
import scipy.sparse as sp

from features.base import l2_normalize
from index.sparse_index import SparseIndex, load_any
from pipeline.errors import CairnError


def _data(n=300, dim=2000, seed=0):
    x = sp.random(n, dim, density=0.01, format="csr", dtype=np.float32, random_state=seed)
    return sp.csr_matrix(l2_normalize(x.toarray()))


def test_search_equals_brute_force_inner_products():
    xb, xq = _data(), _data(40, seed=1)
    index = SparseIndex.build(xb, [f"i{j}" for j in range(300)], np.arange(300) % 7)
    D, I = index.search(xq, 10, batch_size=16)
    dense = (xq @ xb.T).toarray()
    for q in range(40):
        hits = np.flatnonzero(dense[q])
        expected = hits[np.lexsort((hits, -dense[q][hits]))][:10]
        n = len(expected)
        np.testing.assert_allclose(D[q, :n], dense[q][expected], rtol=1e-5)
        assert set(I[q, :n]) == set(expected) or np.allclose(np.sort(dense[q][I[q, :n]]),
                                                             np.sort(dense[q][expected]))
        assert np.all(I[q, n:] == -1) and np.all(np.isneginf(D[q, n:]))  # images sharing no word are not listed


def test_save_load_round_trip_and_errors(tmp_path):
    xb = _data()
    index = SparseIndex.build(xb, [f"i{j}" for j in range(300)], np.arange(300) % 7 - 1, {"method": "sift-bovw"})
    index.save(str(tmp_path / "ix"))
    back = load_any(str(tmp_path / "ix"))
    assert isinstance(back, SparseIndex) and back.image_ids == index.image_ids
    np.testing.assert_array_equal(back.labels, index.labels)
    assert back.features_metadata == {"method": "sift-bovw"}
    D1, I1 = index.search(xb[:5], 5)
    D2, I2 = back.search(xb[:5], 5)
    np.testing.assert_array_equal(I1, I2)
    np.testing.assert_array_equal(D1, D2)
    with pytest.raises(CairnError, match="dimension"):
        index.search(_data(3, dim=100), 5)


def test_empty_query_rows_get_no_neighbours():
    xb = _data()
    index = SparseIndex.build(xb, [str(j) for j in range(300)], np.zeros(300))
    D, I = index.search(sp.csr_matrix((2, 2000), dtype=np.float32), 4)
    assert np.all(I == -1)


def test_a_damaged_inverted_file_is_refused_on_load(tmp_path):
    index = SparseIndex.build(_data(), [f"i{j}" for j in range(300)], np.arange(300) % 7)
    index.save(str(tmp_path / "ix"))
    load_any(str(tmp_path / "ix"))
    path = tmp_path / "ix" / "postings.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CairnError, match=r"postings.npz does not match the sha256.*`cairn index`"):
        load_any(str(tmp_path / "ix"))
