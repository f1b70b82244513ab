import math

import numpy as np
import pytest
import scipy.sparse as sp

from features import vocabulary as vocabulary_module
from features.pca import NotFittedError, PCAWhitening
from features.vocabulary import BoVWEncoder, VLADEncoder, Vocabulary
from pipeline.errors import CairnError


def fixed_vocabulary(centroids) -> Vocabulary:
    """A Vocabulary with hand-chosen centroids (no training)."""
    C = np.asarray(centroids, np.float32)
    return Vocabulary.from_state({"centroids": C}, {"k": len(C)}, {"n_train": 0, "inertia": 0.0})


def random_sets(n_sets: int, d: int, seed: int, max_n: int = 40, empty_every: int = 0) -> list[np.ndarray]:
    """Seeded descriptor sets of 0..max_n rows (every ``empty_every``-th one empty)."""
    rng = np.random.default_rng(seed)
    sets = []
    for i in range(n_sets):
        n = 0 if empty_every and i % empty_every == 0 else int(rng.integers(1, max_n))
        sets.append(rng.standard_normal((n, d)).astype(np.float32))
    return sets


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    X = np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32)
    return Vocabulary(k=16, niter=10, seed=0).fit(X)


# ----------------------------------------------------------------------------------------------------------
# Vocabulary


def test_kmeans_recovers_planted_clusters():
    rng = np.random.default_rng(1)
    centres = rng.uniform(-100, 100, (12, 16)).astype(np.float32)
    X = (centres[rng.integers(0, 12, 3000)] + rng.standard_normal((3000, 16))).astype(np.float32)
    voc = Vocabulary(k=12, niter=20, seed=0, init="k-means++").fit(X)
    assert voc.centroids_.shape == (12, 16) and voc.centroids_.dtype == np.float32
    dist = ((centres[:, None, :] - voc.centroids_[None]) ** 2).sum(-1)
    match = dist.argmin(axis=1)
    assert sorted(match.tolist()) == list(range(12))  # one learned centroid per planted centre
    assert dist.min(axis=1).max() < 0.5  # observed ~0.1 (250 points of unit noise in 16-d per cluster)
    assert voc.inertia_ == pytest.approx(16.0, rel=0.1)  # the noise variance summed over 16 dims
    assert voc.n_features_in_ == 16 and voc.n_samples_fit_ == 3000


def test_fit_is_seeded_and_subsamples():
    X = np.random.default_rng(2).standard_normal((1000, 4)).astype(np.float32)
    a = Vocabulary(k=5, niter=5, seed=3, sample_size=300).fit(X)
    b = Vocabulary(k=5, niter=5, seed=3, sample_size=300).fit(X)
    np.testing.assert_array_equal(a.centroids_, b.centroids_)
    assert a.n_samples_fit_ == 300


def test_inertia_is_mean_squared_distance():
    X = np.random.default_rng(3).standard_normal((1500, 6)).astype(np.float32)
    voc = Vocabulary(k=10, niter=15, seed=0).fit(X)
    D, _ = voc.assign(X)
    assert voc.inertia_ == pytest.approx(float(D.mean()), rel=0.02)  # last assignment vs final centroids
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    sph = Vocabulary(k=10, niter=15, seed=0, spherical=True).fit(Xn)
    np.testing.assert_allclose(np.linalg.norm(sph.centroids_, axis=1), 1, atol=1e-5)
    assert sph.inertia_ == pytest.approx(float(sph.assign(Xn)[0].mean()), rel=0.02)


def test_assign_matches_brute_force(vocab):
    X = np.random.default_rng(4).standard_normal((500, 8)).astype(np.float32)
    D, I = vocab.assign(X, n=3)
    assert D.shape == I.shape == (500, 3) and D.dtype == np.float32 and I.dtype == np.int64
    dist = ((X[:, None, :].astype(np.float64) - vocab.centroids_[None]) ** 2).sum(-1)
    expected = np.argsort(dist, axis=1)[:, :3]
    np.testing.assert_array_equal(I, expected)
    np.testing.assert_allclose(D, np.take_along_axis(dist, expected, axis=1), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(vocab.predict(X), expected[:, 0])
    D0, I0 = vocab.assign(np.zeros((0, 8), np.float32))
    assert D0.shape == I0.shape == (0, 1)


def test_too_few_points_and_bad_params():
    with pytest.raises(ValueError, match="at least k"):
        Vocabulary(k=10).fit(np.zeros((9, 3), np.float32))
    with pytest.raises(ValueError, match="init"):
        Vocabulary(k=2, init="nope").fit(np.zeros((9, 3), np.float32))
    with pytest.raises(NotFittedError):
        Vocabulary().assign(np.zeros((1, 3), np.float32))


def test_use_gpu_falls_back_to_cpu_without_one():
    X = np.random.default_rng(5).standard_normal((200, 4)).astype(np.float32)
    voc = Vocabulary(k=4, niter=3, use_gpu=True).fit(X)
    assert voc.assign(X)[1].shape == (200, 1)


def test_vocabulary_save_load(vocab, tmp_path):
    path = str(tmp_path / "vocab.npz")
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded.get_params() == vocab.get_params()
    assert loaded.inertia_ == vocab.inertia_ and loaded.n_samples_fit_ == vocab.n_samples_fit_
    np.testing.assert_array_equal(loaded.centroids_, vocab.centroids_)
    X = np.random.default_rng(6).standard_normal((100, 8)).astype(np.float32)
    for a, b in zip(loaded.assign(X, 2), vocab.assign(X, 2), strict=True):
        np.testing.assert_array_equal(a, b)


def test_loading_the_wrong_kind_or_a_pickle_is_a_cairn_error(vocab, tmp_path):
    path = str(tmp_path / "vocab.npz")
    vocab.save(path)
    for cls in (PCAWhitening, BoVWEncoder, VLADEncoder):
        with pytest.raises(CairnError, match="vocabulary"):
            cls.load(path)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, centroids=np.array([object()], dtype=object))
    for cls in (Vocabulary, BoVWEncoder, VLADEncoder):
        with pytest.raises(CairnError):
            cls.load(str(pickled))


# ----------------------------------------------------------------------------------------------------------
# BoVW


WORDS3 = [(0, 0), (10, 0), (0, 10)]
DOC_A = np.array([(0, 0), (1, 0), (10, 1)], np.float32)  # words 0, 0, 1
DOC_B = np.array([(9, 0), (0, 9)], np.float32)  # words 1, 2
DOC_C = np.array([(0, 1)], np.float32)  # word 0
EMPTY = np.zeros((0, 2), np.float32)


def test_bovw_tfidf_by_hand():
    enc = BoVWEncoder(fixed_vocabulary(WORDS3), tfidf=True, burstiness="none").fit([DOC_A, DOC_B, DOC_C])
    np.testing.assert_array_equal(enc.df_, [2, 2, 1])
    assert enc.n_documents_ == 3
    l15, l3 = math.log(3 / 2), math.log(3)
    np.testing.assert_allclose(enc.idf_, [l15, l15, l3], rtol=1e-6)
    M = enc.transform([DOC_A, DOC_B, DOC_C, EMPTY])
    assert sp.issparse(M) and M.shape == (4, 3) and M.dtype == np.float32
    dense = M.toarray()
    # A: tf [2, 1, 0] * idf -> [2 l15, l15, 0] -> [2, 1, 0] / sqrt(5)
    np.testing.assert_allclose(dense[0], np.array([2, 1, 0]) / math.sqrt(5), rtol=1e-6)
    np.testing.assert_allclose(dense[1], np.array([0, l15, l3]) / math.hypot(l15, l3), rtol=1e-6)
    np.testing.assert_allclose(dense[2], [1, 0, 0])
    assert M[3].nnz == 0  # no descriptors: an empty row


def test_bovw_sqrt_burstiness_and_plain_tf():
    vocab3 = fixed_vocabulary(WORDS3)
    sqrt_enc = BoVWEncoder(vocab3, tfidf=True, burstiness="sqrt").fit([DOC_A, DOC_B, DOC_C])
    # A: sqrt tf [sqrt 2, 1, 0] * [l15, l15, l3] -> [sqrt 2, 1, 0] / sqrt(3)
    np.testing.assert_allclose(sqrt_enc.transform([DOC_A]).toarray()[0], np.array([2**0.5, 1, 0]) / 3**0.5,
                               rtol=1e-6)
    plain = BoVWEncoder(vocab3, tfidf=False, burstiness="none")  # no fit needed without idf
    np.testing.assert_allclose(plain.transform([DOC_A]).toarray()[0], np.array([2, 1, 0]) / 5**0.5, rtol=1e-6)


def test_bovw_words_unseen_or_everywhere_get_idf_zero():
    enc = BoVWEncoder(fixed_vocabulary(WORDS3), burstiness="none").fit([DOC_A, DOC_C])
    np.testing.assert_array_equal(enc.df_, [2, 1, 0])
    np.testing.assert_allclose(enc.idf_, [0, math.log(2), 0])
    M = enc.transform([DOC_B, DOC_C])
    np.testing.assert_allclose(M.toarray(), [[0, 1, 0], [0, 0, 0]])
    assert M.nnz == 1  # zero weights are not stored


def test_bovw_streaming_partial_fit_and_shards(vocab):
    sets = random_sets(60, 8, seed=7, empty_every=9)
    full = BoVWEncoder(vocab).fit(sets)
    streamed = BoVWEncoder(vocab).fit(s for s in sets)
    np.testing.assert_array_equal(streamed.df_, full.df_)
    np.testing.assert_array_equal(streamed.idf_, full.idf_)
    halves = BoVWEncoder(vocab).partial_fit(sets[:25]).partial_fit(iter(sets[25:]))
    np.testing.assert_array_equal(halves.df_, full.df_)
    np.testing.assert_array_equal(halves.idf_, full.idf_)
    assert halves.n_documents_ == full.n_documents_ == 60
    shards = [BoVWEncoder(vocab).document_frequencies(sets[i::3]) for i in range(3)]
    summed = BoVWEncoder.from_document_frequencies(vocab, sum(df for df, _ in shards), sum(n for _, n in shards),
                                                   burstiness="sqrt")
    np.testing.assert_array_equal(summed.idf_, full.idf_)


def test_bovw_batching_does_not_change_results(vocab, monkeypatch):
    sets = random_sets(40, 8, seed=8, empty_every=7)
    enc = BoVWEncoder(vocab).fit(sets)
    expected = enc.transform(sets).toarray()
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1)[1:7], 1, atol=1e-6)
    monkeypatch.setattr(vocabulary_module, "BATCH_ROWS", 17)  # many batches, sets bigger than one batch
    np.testing.assert_allclose(enc.transform(iter(sets)).toarray(), expected, rtol=1e-6)
    np.testing.assert_array_equal(BoVWEncoder(vocab).fit(sets).df_, enc.df_)


def test_bovw_errors(vocab):
    with pytest.raises(NotFittedError):
        BoVWEncoder(vocab).transform([np.zeros((1, 8), np.float32)])
    with pytest.raises(ValueError, match="burstiness"):
        BoVWEncoder(vocab, burstiness="log").fit([np.zeros((1, 8), np.float32)])
    with pytest.raises(ValueError, match=r"\[n, 8\]"):
        BoVWEncoder(vocab).fit([np.zeros((3, 5), np.float32)])
    assert BoVWEncoder(vocab).fit([np.zeros(0)]).transform([]).shape == (0, 16)


def test_bovw_save_load(vocab, tmp_path):
    sets = random_sets(30, 8, seed=9, empty_every=5)
    enc = BoVWEncoder(vocab, burstiness="none").fit(sets)
    path = str(tmp_path / "bovw.npz")
    enc.save(path)
    loaded = BoVWEncoder.load(path)
    assert (loaded.tfidf, loaded.burstiness, loaded.n_documents_) == (True, "none", 30)
    np.testing.assert_array_equal(loaded.vocabulary.centroids_, vocab.centroids_)
    a, b = loaded.transform(sets), enc.transform(sets)
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)
    with pytest.raises(CairnError, match="bovw"):
        VLADEncoder.load(path)


# ----------------------------------------------------------------------------------------------------------
# VLAD


DESC = np.array([(1, 0), (0, 1), (11, 0)], np.float32)  # words 0, 0, 1 of centroids (0, 0), (10, 0)


def test_vlad_by_hand():
    voc = fixed_vocabulary([(0, 0), (10, 0)])
    # residual sums [[1, 1], [1, 0]]; intra-norm [[r, r], [1, 0]] with r = 1/sqrt(2); power 0.5 -> r**0.5 = 2**-0.25
    v = VLADEncoder(voc, intra_norm=True, power=0.5).transform_one(DESC)
    expected = np.array([2**-0.25, 2**-0.25, 1, 0]) / math.sqrt(2 * 2**-0.5 + 1)
    assert v.shape == (4,) and v.dtype == np.float32
    np.testing.assert_allclose(v, expected, rtol=1e-6)
    plain = VLADEncoder(voc, intra_norm=False, power=1.0).transform_one(DESC)
    np.testing.assert_allclose(plain, np.array([1, 1, 1, 0]) / math.sqrt(3), rtol=1e-6)
    no_intra = VLADEncoder(voc, intra_norm=False, power=0.5).transform_one(DESC * 2)
    # residuals doubled for the first two ([2, 2]), (22, 0) -> residual (12, 0): [[2, 2], [12, 0]]
    raw = np.sqrt(np.array([2, 2, 12, 0]))
    np.testing.assert_allclose(no_intra, raw / np.linalg.norm(raw), rtol=1e-6)


def naive_vlad(desc: np.ndarray, C: np.ndarray, power: float = 0.5) -> np.ndarray:
    """A loop over descriptors, the definition written out (intra-normalised)."""
    V = np.zeros(C.shape, np.float64)
    for x in desc.astype(np.float64):
        j = int(np.argmin(((C - x) ** 2).sum(1)))
        V[j] += x - C[j]
    norms = np.linalg.norm(V, axis=1, keepdims=True)
    V = np.where(norms > 0, V / np.maximum(norms, 1e-300), 0).ravel()
    V = np.sign(V) * np.abs(V) ** power
    n = np.linalg.norm(V)
    return V / n if n else V


def test_vlad_matches_naive_loop_and_batching_does_not_matter(vocab, monkeypatch):
    sets = random_sets(25, 8, seed=10, empty_every=6)
    enc = VLADEncoder(vocab)
    V = enc.transform(sets)
    assert V.shape == (25, 16 * 8) and enc.dim == 128
    for got, desc in zip(V, sets, strict=True):
        np.testing.assert_allclose(got, naive_vlad(desc, vocab.centroids_.astype(np.float64)), atol=1e-5)
    assert not np.any(V[0]) and not np.any(V[6])  # empty sets: zero vectors
    monkeypatch.setattr(vocabulary_module, "BATCH_ROWS", 13)
    monkeypatch.setattr(vocabulary_module, "BATCH_FLOATS", 3 * 128)  # at most 3 sets per batch
    np.testing.assert_allclose(enc.transform(s for s in sets), V, atol=1e-6)
    assert enc.transform([]).shape == (0, 128)


def test_vlad_with_pca(vocab):
    sets = random_sets(80, 8, seed=11, empty_every=10)
    enc = VLADEncoder(vocab, pca_dim=12).fit(sets)
    assert isinstance(enc.pca_, PCAWhitening) and enc.pca_.n_samples_ == 72  # 8 empty sets left out
    V = enc.transform(sets)
    assert V.shape == (80, 12) and enc.dim == 12 and V.dtype == np.float32
    nonempty = [i for i in range(80) if i % 10]
    np.testing.assert_allclose(np.linalg.norm(V[nonempty], axis=1), 1, atol=1e-5)
    assert not np.any(V[::10])  # empty sets stay zero after PCA (not the whitened negative mean)
    raw = VLADEncoder(vocab).transform(sets)
    np.testing.assert_allclose(V[nonempty], enc.pca_.transform(raw[nonempty]), atol=1e-6)


def test_vlad_pca_sample_is_seeded_and_streaming_takes_the_first_sets(vocab):
    sets = random_sets(50, 8, seed=12)
    a = VLADEncoder(vocab, pca_dim=6, pca_sample=30, seed=1).fit(sets)
    b = VLADEncoder(vocab, pca_dim=6, pca_sample=30, seed=1).fit(sets)
    np.testing.assert_array_equal(a.pca_.components_, b.pca_.components_)
    streamed = VLADEncoder(vocab, pca_dim=6, pca_sample=30).fit(iter(sets))
    first = VLADEncoder(vocab, pca_dim=6, pca_sample=30).fit(sets[:30])
    np.testing.assert_array_equal(streamed.pca_.components_, first.pca_.components_)
    np.testing.assert_array_equal(streamed.pca_.mean_, first.pca_.mean_)


def test_vlad_errors(vocab):
    with pytest.raises(NotFittedError):
        VLADEncoder(vocab, pca_dim=4).transform([np.zeros((1, 8), np.float32)])
    with pytest.raises(NotFittedError):
        VLADEncoder(Vocabulary(k=4)).transform([np.zeros((1, 8), np.float32)])
    with pytest.raises(ValueError, match="at least 2"):
        VLADEncoder(vocab, pca_dim=4).fit([np.zeros(0), np.ones((2, 8), np.float32)])


@pytest.mark.parametrize("pca_dim", [0, 10])
def test_vlad_save_load(vocab, tmp_path, pca_dim):
    sets = random_sets(40, 8, seed=13, empty_every=8)
    enc = VLADEncoder(vocab, intra_norm=False, power=0.7, pca_dim=pca_dim, whiten=True).fit(sets)
    path = str(tmp_path / "vlad.npz")
    enc.save(path)
    loaded = VLADEncoder.load(path)
    assert (loaded.intra_norm, loaded.power, loaded.pca_dim) == (False, 0.7, pca_dim)
    assert (loaded.pca_ is None) == (pca_dim == 0)
    np.testing.assert_array_equal(loaded.transform(sets), enc.transform(sets))
    with pytest.raises(CairnError, match="vlad"):
        Vocabulary.load(path)
