"""GeM pooling, the backbone factory, the embedding head and the exported model (features/layers.py,
features/backbones.py, features/embedding.py)."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from features.backbones import BACKBONES, BackboneConfig, build_backbone, channels
from features.embedding import (
    HeadConfig,
    build_embedding_model,
    load_embedding_model,
    model_metadata,
    read_model_metadata,
    save_embedding_model,
)
from features.layers import GeM, L2Normalize, Preprocess


def test_gem_at_p1_is_average_pooling():
    x = np.random.default_rng(0).uniform(0.01, 5, size=(3, 4, 5, 6)).astype(np.float32)
    got = np.asarray(GeM(p=1.0, trainable_p=False)(x))
    np.testing.assert_allclose(got, x.mean(axis=(1, 2)), rtol=1e-5)


def test_gem_approaches_max_pooling_at_large_p():
    x = np.random.default_rng(1).uniform(0.01, 5, size=(2, 3, 3, 4)).astype(np.float32)
    mx = x.max(axis=(1, 2))
    errors = [np.abs(np.asarray(GeM(p=p, trainable_p=False)(x)) - mx).max() for p in (1.0, 3.0, 10.0, 60.0)]
    assert errors == sorted(errors, reverse=True)  # closer to max as p grows
    assert errors[-1] < 0.05 * mx.max()
    # GeM lies between the mean and the max for any p >= 1
    g = np.asarray(GeM(p=3.0)(x))
    assert np.all(g >= x.mean(axis=(1, 2)) - 1e-5) and np.all(g <= mx + 1e-5)


def test_gem_hand_computed():
    x = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(1, 2, 2, 1)
    expected = ((1 + 8 + 27 + 64) / 4) ** (1 / 3)  # p = 3
    assert float(np.asarray(GeM(p=3.0)(x))[0, 0]) == pytest.approx(expected, rel=1e-5)


def test_l2_normalize_rows_and_zero_rows():
    y = np.asarray(L2Normalize()(np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)))
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)


@pytest.mark.parametrize("mode,expected", [
    ("tf", [-1.0, 0.0, 1.0]),
    ("caffe", [255 - 103.939, 127.5 - 116.779, 0 - 123.68]),  # BGR order minus the BGR mean
    ("none", [0.0, 127.5, 255.0]),
])
def test_preprocess_modes(mode, expected):
    x = np.array([0.0, 127.5, 255.0], np.float32).reshape(1, 1, 1, 3)
    np.testing.assert_allclose(np.asarray(Preprocess(mode)(x)).ravel(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_factory_output_dimensions_without_weights(name):
    net = build_backbone(BackboneConfig(name, weights="none"))
    out = np.asarray(net(np.zeros((1, 64, 64, 3), np.float32)))
    assert out.ndim == 4 and out.shape[-1] == channels(name)
    model = build_embedding_model(BackboneConfig(name), HeadConfig(dim=0))
    assert model(np.zeros((2, 64, 64, 3), np.float32)).shape == (2, channels(name))


def test_backbone_config_rejects_unknown_names_and_weights():
    with pytest.raises(ValueError, match="unknown backbone"):
        BackboneConfig("vgg99")
    with pytest.raises(ValueError, match="weights"):
        BackboneConfig("resnet50", weights="imagenet21k")
    with pytest.raises(ValueError, match="TFLite"):
        BackboneConfig("resnet50", weights="x.tflite")
    with pytest.raises(FileNotFoundError):
        build_backbone(BackboneConfig("mobilenet", weights="/nonexistent/w.weights.h5"))


def test_local_weights_file_is_loaded(tmp_path):
    a = build_backbone(BackboneConfig("mobilenet_v2", weights="none"))
    path = str(tmp_path / "mnv2.weights.h5")
    inner = next(layer for layer in a.layers if layer.name.startswith("mobilenet"))
    inner.save_weights(path)
    b = build_backbone(BackboneConfig("mobilenet_v2", weights=path))
    x = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(a(x)), np.asarray(b(x)), rtol=1e-5, atol=1e-5)


def test_embedding_model_is_l2_normalised_with_any_input_size():
    model = build_embedding_model(BackboneConfig("mobilenet_v2"), HeadConfig(dim=32))
    for side in (64, 96):
        e = np.asarray(model(np.random.default_rng(side).uniform(0, 255, (3, side, side, 3)).astype(np.float32)))
        assert e.shape == (3, 32)
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)


def test_exported_model_round_trip_gives_identical_embeddings(tmp_path):
    backbone, head = BackboneConfig("mobilenet_v2"), HeadConfig(dim=16)
    model = build_embedding_model(backbone, head)
    path = str(tmp_path / "model.keras")
    save_embedding_model(model, path, model_metadata(backbone, head, 64, classes=[7, 9]))
    loaded, meta = load_embedding_model(path)
    x = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model(x, training=False)), np.asarray(loaded(x, training=False)))
    assert meta["backbone"]["name"] == "mobilenet_v2" and meta["dim"] == 16 and meta["input_size"] == 64
    assert meta["preprocessing"] == "tf" and meta["classes"] == [7, 9]
    assert read_model_metadata(path) == meta


def test_a_keras_file_without_cairn_metadata_is_refused(tmp_path):
    model = build_embedding_model(BackboneConfig("mobilenet_v2"), HeadConfig(dim=8))
    path = str(tmp_path / "plain.keras")
    model.save(path)
    with pytest.raises(ValueError, match="not a Cairn embedding model"):
        load_embedding_model(path)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("cairn.json", '{"format": "cairn-embedding-model", "version": 99}')
    with pytest.raises(ValueError, match="unsupported model format"):
        load_embedding_model(path)


def test_imagenet_weights_that_cannot_be_downloaded_give_a_clear_error(monkeypatch):
    import keras

    from pipeline.errors import CairnError

    def offline(*args, **kwargs):
        if kwargs.get("weights") == "imagenet":
            raise Exception("URL fetch failure on https://storage.googleapis.com/...: Name or service not known")
        raise AssertionError("only the imagenet path should be called")

    monkeypatch.setattr(keras.applications, "MobileNetV2", offline)
    with pytest.raises(CairnError, match="Offline, give a local weights file"):
        build_backbone(BackboneConfig("mobilenet_v2", weights="imagenet"))
