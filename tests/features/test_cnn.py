"""The CNN extractor over every model kind, and the frozen TFLite extractor on real weights (features/cnn.py,
features/frozen.py, features/backbones.py's TFLite conversion)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from features.backbones import BackboneConfig
from features.cnn import CnnConfig, CnnExtractor
from tests.conftest import shared_path

TFLITE = ("weights", "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite")


def _images(n, seed=0):
    """Blocky images (6 x 6 random colour cells): structure at a scale, unlike i.i.d. noise."""
    import cv2

    rng = np.random.default_rng(seed)
    return [cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8),
                       (int(rng.integers(50, 90)), int(rng.integers(50, 90))), interpolation=cv2.INTER_NEAREST)
            for _ in range(n)]


def test_keras_extractor_batched_equals_one_at_a_time(tiny_embedder):
    ex = CnnExtractor(CnnConfig(model=tiny_embedder))
    assert ex.size == 64 and ex.dim == 16 and ex.batched
    images = _images(5)
    xb = np.stack([ex.prepare(im) for im in images])
    assert xb.shape == (5, 64, 64, 3) and xb.dtype == np.uint8
    batched = ex.embed(xb)
    single = np.stack([ex.extract(im) for im in images])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1, rtol=1e-5)
    meta = ex.metadata()
    assert meta["model"]["format"] == "keras" and len(meta["model_sha256"]) == 64


class SizeAwareEmbedder:
    """A fake embedder whose output depends on the input size, recording the sizes it was given."""

    input_size, dim = 64, 3

    def __init__(self):
        self.sides = []

    def embed(self, xb):
        self.sides.append(xb.shape[1])
        mean = xb.reshape(len(xb), -1).mean(axis=1, keepdims=True)
        return np.hstack([mean / 255.0, np.full_like(mean, xb.shape[1] / 64.0), np.ones_like(mean)]).astype(np.float32)


def test_multi_scale_tta_reduces_one_preparation_at_the_largest_scale(tiny_embedder):
    from features.cnn import resize_square

    tta = CnnExtractor(CnnConfig(model=tiny_embedder, scales=(0.75, 1.0, 1.5)))
    assert tta.prepare_size == 96 and tta.sides == [48, 64, 96]  # 64 x each scale
    tta.embedder = fake = SizeAwareEmbedder()
    images = _images(3, seed=1)
    xb = np.stack([tta.prepare(im) for im in images])
    assert xb.shape == (3, 96, 96, 3)  # prepared at 1.5 x 64 from the original, not upscaled from 64
    got = tta.embed(xb)
    assert fake.sides == [48, 64, 96]
    total = 0
    for side in (48, 64, 96):
        e = fake.embed(np.stack([resize_square(im, side) for im in xb]))
        total = total + e / np.linalg.norm(e, axis=1, keepdims=True)
    np.testing.assert_allclose(got, total / np.linalg.norm(total, axis=1, keepdims=True), atol=1e-6)
    plain = CnnExtractor(CnnConfig(model=tiny_embedder))
    assert plain.prepare(images[0]).shape == (64, 64, 3) and plain.sides == [64]


def test_extractor_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="needs a model"):
        CnnExtractor(CnnConfig())
    with pytest.raises(FileNotFoundError):
        CnnExtractor(CnnConfig(model=str(tmp_path / "missing.keras")))
    with pytest.raises(ValueError, match="scales"):
        CnnConfig(model="x.keras", scales=(0.0,))
    with pytest.raises(ValueError, match="device"):
        CnnConfig(model="x.keras", device="tpu")


def test_device_choice(tiny_embedder):
    import tensorflow as tf

    cpu = CnnExtractor(CnnConfig(model=tiny_embedder, device="cpu"))
    auto = CnnExtractor(CnnConfig(model=tiny_embedder))
    xb = np.stack([cpu.prepare(im) for im in _images(2)])
    np.testing.assert_allclose(cpu.embed(xb), auto.embed(xb), atol=1e-4)
    if not tf.config.list_physical_devices("GPU"):
        with pytest.raises(ValueError, match="sees no GPU"):
            CnnExtractor(CnnConfig(model=tiny_embedder, device="gpu"))


def test_unknown_model_files_are_refused(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"1")
    with pytest.raises(ValueError, match="not a .keras"):
        CnnExtractor(CnnConfig(model=str(tmp_path / "x.onnx")))


@pytest.mark.shared
def test_tflite_extractor_on_the_shared_weights():
    path = str(shared_path(*TFLITE))
    ex = CnnExtractor(CnnConfig(model=path))
    assert ex.size == 224 and ex.dim == 1024
    images = _images(3, seed=2)
    xb = np.stack([ex.prepare(im) for im in images])
    batched = ex.embed(xb)
    np.testing.assert_allclose(batched, np.stack([ex.extract(im) for im in images]), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1, rtol=1e-5)
    assert ex.metadata()["model"]["preprocessing"] == "quantized-input"
    with pytest.raises(ValueError, match="takes only 224x224"):
        CnnExtractor(CnnConfig(model=path, scales=(1.0, 1.4)))


@pytest.mark.shared
def test_mobilenet_from_tflite_weights_matches_the_tflite_model():
    """The dequantised TFLite weights in Keras' MobileNet give the TFLite model's embeddings."""
    from features.backbones import build_backbone

    path = str(shared_path(*TFLITE))
    ex = CnnExtractor(CnnConfig(model=path))
    xb = np.stack([ex.prepare(im) for im in _images(4, seed=3)])
    reference = ex.embed(xb)
    net = build_backbone(BackboneConfig("mobilenet", weights=path))
    ours = np.asarray(net(xb.astype(np.float32), training=False)).mean(axis=(1, 2))
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    cos = (reference * ours).sum(axis=1)
    assert np.all(cos > 0.99), cos  # observed 0.998-0.9996 on Porto photos (quantisation error)


def _saved_model(path, dtype, outputs):
    """A SavedModel whose serving signature maps [B, 8, 8, 3] images to per-channel means (and maybe more)."""
    import tensorflow as tf

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], dtype)])
        def serve(self, images):
            x = tf.cast(images, tf.float32)
            mean = tf.reduce_mean(x, axis=[1, 2])
            return {name: mean * (i + 1) for i, name in enumerate(outputs)}

    m = M()
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.serve})
    return str(path)


def test_saved_model_extractor(tmp_path):
    from features.frozen import SavedModelEmbedder

    xb = np.zeros((2, 8, 8, 3), np.uint8)
    xb[0, ..., 0] = 255  # red
    xb[1, ..., 2] = 255  # blue
    floats = SavedModelEmbedder(_saved_model(tmp_path / "f", "float32", ["output_0"]), preprocessing="none")
    assert floats.input_size == 8 and floats.dim == 3
    np.testing.assert_allclose(floats.embed(xb), [[1, 0, 0], [0, 0, 1]], atol=1e-6)
    pixels = SavedModelEmbedder(_saved_model(tmp_path / "u", "uint8", ["output_0"]))
    assert pixels.preprocessing == "pixels"  # a uint8 input takes the pixels, not normalised floats
    np.testing.assert_allclose(pixels.embed(xb), [[1, 0, 0], [0, 0, 1]], atol=1e-6)
    named = SavedModelEmbedder(_saved_model(tmp_path / "n", "float32", ["logits", "embedding"]))
    assert named.output_name == "embedding"
    with pytest.raises(ValueError, match="several outputs"):
        SavedModelEmbedder(_saved_model(tmp_path / "a", "float32", ["a", "b"]))
    ex = CnnExtractor(CnnConfig(model=str(tmp_path / "f"), preprocessing="none"))  # through the extractor
    assert ex.size == 8 and ex.metadata()["model"]["format"] == "saved_model"


def _load_tflite_in_a_subprocess(path) -> subprocess.CompletedProcess:
    """Load ``path`` with features.frozen.tflite_interpreter in a child process (a crash must not take pytest
    with it); the child prints the CairnError's message."""
    code = ("from features.frozen import tflite_interpreter\nfrom pipeline.errors import CairnError\n"
            f"try:\n    tflite_interpreter({str(path)!r})\nexcept CairnError as e:\n    print('CairnError:', e)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])


def test_a_file_that_is_not_a_tflite_model_is_an_error_naming_it(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"<html>404 not found</html>")
    result = _load_tflite_in_a_subprocess(path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"CairnError: {path} is not a TFLite model (no TFL3 identifier" in result.stdout


@pytest.mark.shared
@pytest.mark.parametrize("keep", [0.001, 0.5, 0.9999])
def test_a_truncated_tflite_model_is_an_error_naming_it_not_a_segfault(tmp_path, keep):
    """TFLite's interpreter reads a model given by path without verifying it: a cut copy crashed the process."""
    data = shared_path(*TFLITE).read_bytes()
    path = tmp_path / "cut.tflite"
    path.write_bytes(data[: int(len(data) * keep)])
    result = _load_tflite_in_a_subprocess(path)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert f"CairnError: {path}: not a valid TFLite model" in result.stdout and "truncated or damaged" in result.stdout
