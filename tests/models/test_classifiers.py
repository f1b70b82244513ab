"""models.classifiers: NearestClassMean and SoftmaxClassifier on seeded synthetic clusters."""

import numpy as np
import pytest
from sklearn.base import clone

from index.recognize import NO_LANDMARK
from models.classifiers import (
    NearestClassMean,
    SoftmaxClassifier,
    fit_temperature,
    holdout_split,
    load_classifier,
)
from pipeline.errors import CairnError

BOTH = [NearestClassMean, SoftmaxClassifier]


def clusters(classes: int, per_class: int, dim: int, noise: float, seed: int, labels=None):
    """[classes * per_class, dim] float32 L2-normalised points around random unit centres, and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    idx = np.repeat(np.arange(classes), per_class)
    x = centres[idx] + rng.standard_normal((len(idx), dim)).astype(np.float32) * np.float32(noise / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.arange(classes) if labels is None else np.asarray(labels)
    return x, labels[idx].astype(np.int64), centres


def split_queries(X, y, every: int = 5):
    q = np.arange(len(X)) % every == 0
    return X[~q], y[~q], X[q], y[q]


@pytest.fixture(scope="module")
def separable():
    X, y, _ = clusters(classes=20, per_class=30, dim=16, noise=0.5, seed=1, labels=np.arange(20) * 7 + 3)
    return split_queries(X, y)


@pytest.fixture(scope="module")
def fitted(separable):
    X, y, _, _ = separable
    return {cls: cls().fit(X, y) for cls in BOTH}


@pytest.mark.parametrize("cls", BOTH)
def test_separable_clusters_are_classified(cls, fitted, separable):
    _, _, Xq, yq = separable
    model = fitted[cls]
    assert (model.predict(Xq) == yq).mean() >= 0.98  # observed 1.0 for both
    assert model.calibration_ == "temperature" and model.temperature_ > 0
    assert model.classes_.dtype == np.int64 and model.classes_.tolist() == sorted(set(yq.tolist()))


def test_learned_attributes(fitted):
    ncm, sm = fitted[NearestClassMean], fitted[SoftmaxClassifier]
    assert ncm.means_.shape == (20, 16) and ncm.means_.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ncm.means_, axis=1), 1.0, rtol=1e-5)
    assert sm.coef_.shape == (20, 16) and sm.coef_.dtype == np.float32 and sm.intercept_.shape == (20,)
    assert sm.n_iter_ == 5 and sm.loss_curve_.shape == (5,) and np.all(np.isfinite(sm.loss_curve_))
    assert sm.n_features_in_ == 16


@pytest.fixture(scope="module")
def overlapping():
    """Clusters that overlap, so that probabilities are spread out and distinct (no ties to order)."""
    X, y, _ = clusters(classes=20, per_class=30, dim=16, noise=2.0, seed=9, labels=np.arange(20) * 7 + 3)
    Xt, yt, Xq, _ = split_queries(X, y)
    return {cls: cls().fit(Xt, yt) for cls in BOTH}, Xq


@pytest.mark.parametrize("cls", BOTH)
def test_probabilities_sum_to_one_and_predict_top_matches_argsort(cls, overlapping):
    models, Xq = overlapping
    model = models[cls]
    proba = model.predict_proba(Xq)
    assert proba.shape == (len(Xq), 20) and proba.dtype == np.float32
    assert proba.max(axis=1).mean() < 0.9  # spread out
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    labels, probs = model.predict_top(Xq, k=3, batch_size=7)  # several batches and a ragged last one
    order = np.argsort(-proba, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(labels, model.classes_[order])
    np.testing.assert_allclose(probs, np.take_along_axis(proba, order, axis=1), rtol=1e-4, atol=1e-7)
    assert labels.dtype == np.int64 and probs.dtype == np.float32
    assert np.all(np.diff(probs, axis=1) <= 0)
    _, full_probs = model.predict_top(Xq, k=20)
    np.testing.assert_allclose(full_probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(model.predict(Xq), model.classes_[proba.argmax(axis=1)])
    np.testing.assert_array_equal(model.decision_function(Xq).argmax(axis=1), proba.argmax(axis=1))


@pytest.mark.parametrize("cls", BOTH)
def test_class_with_one_example_is_learned(cls):
    X, y, _ = clusters(classes=10, per_class=20, dim=16, noise=0.5, seed=2)
    rng = np.random.default_rng(3)
    lone = rng.standard_normal((1, 16)).astype(np.float32)
    lone /= np.linalg.norm(lone)
    X, y = np.vstack([X, lone]), np.append(y, 99)
    model = cls().fit(X, y)
    assert 99 in model.classes_
    assert model.predict(lone).tolist() == [99]
    assert model.calibration_ == "temperature"


@pytest.mark.parametrize("cls", BOTH)
def test_every_class_with_one_example_falls_back_to_temperature_one(cls):
    X, y, _ = clusters(classes=12, per_class=1, dim=16, noise=0.0, seed=4)
    model = cls().fit(X, y)
    assert model.temperature_ == 1.0
    assert model.calibration_ == "none (no class with 2+ examples)"
    np.testing.assert_array_equal(model.predict(X), y)


def test_holdout_keeps_one_example_of_every_class():
    y = np.array([0, 0, 0, 0, 1, 2, 2, 3, 3, 3])
    train, held = holdout_split(y, fraction=0.5, max_rows=100, seed=0)
    assert len(held) == 5 and len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == len(y)
    assert set(y[train].tolist()) == {0, 1, 2, 3}  # every class keeps an example
    assert 1 not in y[held]  # the singleton class is never held out
    _, held = holdout_split(y, fraction=0.9, max_rows=3, seed=0)
    assert len(held) == 3
    _, held = holdout_split(np.arange(5), fraction=0.5, max_rows=100, seed=0)
    assert len(held) == 0


def test_fit_temperature_recovers_a_planted_temperature():
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 3, (5000, 10)).astype(np.float32)
    t0 = 2.0
    p = np.exp(logits / t0 - (logits / t0).max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    y = (p.cumsum(axis=1) > rng.random((5000, 1))).argmax(axis=1)
    t = fit_temperature(logits, y, batch_size=999)
    assert abs(t - t0) / t0 < 0.15  # observed about 2.0
    assert abs(fit_temperature(logits * 10, y) - 10 * t) / (10 * t) < 0.01  # scale equivariant


def test_calibrated_confidence_tracks_accuracy():
    X, y, _ = clusters(classes=40, per_class=40, dim=16, noise=1.6, seed=6)
    Xt, yt, Xq, yq = split_queries(X, y)
    model = NearestClassMean(validation_fraction=0.25).fit(Xt, yt)
    labels, probs = model.predict_top(Xq)
    acc = (labels[:, 0] == yq).mean()
    assert 0.3 < acc < 0.95  # a task with errors, so that calibration means something
    assert abs(probs.mean() - acc) < 0.1  # observed: mean confidence within a few points of accuracy


@pytest.mark.parametrize("cls", BOTH)
def test_save_load_round_trip(cls, fitted, separable, tmp_path):
    _, _, Xq, _ = separable
    model = fitted[cls]
    path = str(tmp_path / "model.npz")
    model.save(path)
    again = cls.load(path)
    assert type(again) is cls and again.get_params() == model.get_params()
    assert again.temperature_ == model.temperature_ and again.calibration_ == model.calibration_
    labels, probs = model.predict_top(Xq, k=2)
    labels2, probs2 = again.predict_top(Xq, k=2)
    np.testing.assert_array_equal(labels, labels2)
    np.testing.assert_array_equal(probs, probs2)
    assert type(load_classifier(path)) is cls


def test_load_of_the_wrong_class_raises(fitted, tmp_path):
    path = str(tmp_path / "ncm.npz")
    fitted[NearestClassMean].save(path)
    with pytest.raises(CairnError, match="NearestClassMean"):
        SoftmaxClassifier.load(path)
    with pytest.raises(CairnError):
        NearestClassMean.load(str(tmp_path / "absent.npz"))


@pytest.mark.parametrize("cls", BOTH)
def test_no_landmark_label_is_a_class(cls):
    X, y, centres = clusters(classes=5, per_class=20, dim=16, noise=0.3, seed=7, labels=[NO_LANDMARK, 4, 8, 15, 16])
    model = cls().fit(X, y)
    assert model.classes_[0] == NO_LANDMARK
    np.testing.assert_array_equal(model.predict(centres), [NO_LANDMARK, 4, 8, 15, 16])


@pytest.mark.parametrize("cls", BOTH)
def test_invalid_input_raises_value_error(cls, fitted):
    X = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    y = np.array([0, 0, 1, 1, 2, 2])
    bad = [
        (X[0], y),  # 1-D X
        (X.astype(np.int64), y),  # not floats
        (np.where(np.eye(6, 4) > 0, np.nan, X), y),  # NaN
        (X, y[:5]),  # lengths differ
        (X, y.astype(np.float64)),  # float labels
        (X, np.zeros(6, np.int64)),  # one class
        (X[:0], y[:0]),  # empty
    ]
    for Xb, yb in bad:
        with pytest.raises(ValueError):
            cls().fit(Xb, yb)
    with pytest.raises(ValueError, match="at least 2 classes"):
        cls().fit(X, np.full(6, 3))
    with pytest.raises(ValueError, match="not fitted"):
        cls().predict(X)
    model = fitted[cls]
    with pytest.raises(ValueError, match="features"):
        model.predict(X)  # 4 features, fitted on 16
    with pytest.raises(ValueError):
        model.predict_top(np.zeros((2, 16), np.float32), k=0)


def test_softmax_options(separable):
    X, y, Xq, yq = separable
    zeros = SoftmaxClassifier(init="zeros", epochs=30, batch_size=64, learning_rate=0.05).fit(X, y)
    assert (zeros.predict(Xq) == yq).mean() >= 0.95  # observed 1.0
    assert zeros.loss_curve_[-1] < zeros.loss_curve_[0]
    balanced = SoftmaxClassifier(class_balance=1.0, temperature=0.5, verbose=True).fit(X, y)
    assert balanced.temperature_ == 0.5 and balanced.calibration_ == "fixed"
    assert (balanced.predict(Xq) == yq).mean() >= 0.95
    with pytest.raises(ValueError):
        SoftmaxClassifier(init="random").fit(X, y)
    copy = clone(SoftmaxClassifier(epochs=2, class_balance=0.5))
    assert copy.get_params()["epochs"] == 2 and not hasattr(copy, "coef_")


def test_thirteen_thousand_classes_smoke():
    C, D = 13_000, 32
    X, y, centres = clusters(classes=C, per_class=2, dim=D, noise=0.3, seed=8)
    xq = centres[:3000]
    for model in (NearestClassMean(), SoftmaxClassifier(epochs=1, batch_size=2048)):
        model.fit(X, y)
        assert model.calibration_ == "temperature"
        labels, probs = model.predict_top(xq, k=5, batch_size=1000)
        assert labels.shape == (3000, 5) and probs.shape == (3000, 5)
        assert (labels[:, 0] == np.arange(3000)).mean() > 0.95  # observed 1.0
        assert np.all(probs.sum(axis=1) <= 1 + 1e-5)


def test_too_few_held_out_examples_leave_the_temperature_at_one():
    from models.classifiers import MIN_FIT_ROWS, SoftmaxClassifier

    X, y, _ = clusters(classes=6, per_class=8, dim=16, noise=0.5, seed=4)  # 48 rows: 10% is 5 held-out rows
    model = SoftmaxClassifier(epochs=2).fit(X, y)
    assert model.temperature_ == 1.0 and f"{MIN_FIT_ROWS} or more" in model.calibration_
