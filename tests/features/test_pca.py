import logging

import numpy as np
import pytest

from features import artifacts
from features.pca import NotFittedError, PCAWhitening
from pipeline.errors import CairnError


def correlated(n: int, d: int, seed: int = 0) -> np.ndarray:
    """[n, d] float32 Gaussian data with a random full-rank covariance and a non-zero mean."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((d, d)) * np.linspace(3.0, 0.3, d)[:, None]
    return (rng.standard_normal((n, d)) @ mixing + rng.uniform(-5, 5, d)).astype(np.float32)


def sign_fixed(components: np.ndarray) -> np.ndarray:
    """Rows with their largest-magnitude coordinate made positive (the convention PCAWhitening uses)."""
    pivot = np.abs(components).argmax(axis=1)
    return components * np.sign(components[np.arange(len(components)), pivot])[:, None]


def test_whitened_training_data_has_identity_covariance():
    X = correlated(4000, 12)
    pca = PCAWhitening(eps=1e-9).fit(X)
    Y = pca.transform(X, normalize=False)
    assert Y.shape == (4000, 12) and Y.dtype == np.float32
    np.testing.assert_allclose(Y.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(Y.T.astype(np.float64)), np.eye(12), atol=1e-3)


def test_components_and_variances_match_numpy_eigh():
    X = correlated(500, 10, seed=1)
    pca = PCAWhitening(dim=4, whiten=False).fit(X)
    values, vectors = np.linalg.eigh(np.cov(X.T.astype(np.float64)))
    np.testing.assert_allclose(pca.explained_variance_, values[::-1][:4], rtol=1e-5)
    np.testing.assert_allclose(pca.components_, sign_fixed(vectors[:, ::-1][:, :4].T), atol=1e-5)
    np.testing.assert_allclose(pca.components_ @ pca.components_.T, np.eye(4), atol=1e-5)
    # without whitening the projected variances are the eigenvalues
    Z = pca.transform(X, normalize=False)
    np.testing.assert_allclose(Z.var(axis=0, ddof=1), pca.explained_variance_, rtol=1e-3)


def test_more_dimensions_than_samples_uses_svd_and_caps_dim(caplog):
    X = correlated(200, 40, seed=2)[:10]  # N=10 < D=40: rank N-1 = 9
    with caplog.at_level(logging.WARNING, logger="features.pca"):
        pca = PCAWhitening(dim=20, whiten=False).fit(X)
    assert pca.dim_out == 9 and pca.components_.shape == (9, 40)
    assert "reduced to 9" in caplog.text
    values, vectors = np.linalg.eigh(np.cov(X.T.astype(np.float64)))
    np.testing.assert_allclose(pca.explained_variance_, values[::-1][:9], rtol=1e-4)
    np.testing.assert_allclose(pca.components_, sign_fixed(vectors[:, ::-1][:, :9].T), atol=1e-4)


def test_dim_zero_keeps_all_supported_components():
    assert PCAWhitening().fit(correlated(100, 6)).dim_out == 6
    assert PCAWhitening().fit(correlated(5, 6)).dim_out == 4


def test_transform_rows_are_unit_length():
    X = correlated(300, 8, seed=3)
    Y = PCAWhitening(dim=5).fit_transform(X)
    assert Y.shape == (300, 5) and Y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(Y, axis=1), 1, atol=1e-5)


def test_near_zero_variance_direction_is_not_blown_up():
    X = correlated(500, 4, seed=4)
    X[:, 3] = 7.0  # constant: a zero eigenvalue
    Y = PCAWhitening(eps=1e-6).fit(X).transform(X, normalize=False)
    assert np.all(np.isfinite(Y))
    assert np.abs(Y[:, 3]).max() < 1e-2  # the regulariser keeps float noise from becoming unit variance


def test_errors():
    with pytest.raises(NotFittedError):
        PCAWhitening().transform(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="at least 2"):
        PCAWhitening().fit(np.zeros((1, 3), np.float32))
    pca = PCAWhitening().fit(correlated(20, 3))
    with pytest.raises(ValueError, match="features"):
        pca.transform(np.zeros((2, 4), np.float32))


def test_save_load_round_trip(tmp_path):
    X = correlated(300, 8, seed=5)
    pca = PCAWhitening(dim=6, eps=1e-4).fit(X)
    path = str(tmp_path / "pca.npz")
    pca.save(path)
    loaded = PCAWhitening.load(path)
    assert loaded.get_params() == pca.get_params() and loaded.n_samples_ == 300
    np.testing.assert_array_equal(loaded.transform(X), pca.transform(X))
    np.testing.assert_array_equal(loaded.transform(X, normalize=False), pca.transform(X, normalize=False))


def test_load_rejects_other_kinds_and_pickles(tmp_path):
    other = str(tmp_path / "other.npz")
    artifacts.save(other, "vocabulary", {"centroids": np.zeros((2, 2), np.float32)}, {})
    with pytest.raises(CairnError, match="vocabulary"):
        PCAWhitening.load(other)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, mean=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(CairnError):
        PCAWhitening.load(str(pickled))
