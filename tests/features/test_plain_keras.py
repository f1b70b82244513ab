"""Every model Cairn exports opens with plain Keras after one import (README, "Outputs"): a user's own Python,
a notebook or TensorFlow Serving's converter needs nothing else of Cairn's."""

import subprocess
import sys

import pytest

RECIPE = "import features.layers, keras; keras.saving.load_model({path!r}, safe_mode=True)"


def _opens_plainly(path: str) -> subprocess.CompletedProcess:
    # a fresh interpreter: in this one, Cairn's modules (and their registrations) are already imported
    code = RECIPE.format(path=path) + "; print('loaded')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _detector(tmp_path) -> str:
    """A detector as models/detector.py exports it: compiled with its loss (a closure), then saved."""
    import keras

    from features.backbones import BackboneConfig
    from features.detect import save_detector
    from models.detector import DetectorConfig, build_detector, detection_loss

    config = DetectorConfig(backbone=BackboneConfig("mobilenet_v2"), input_size=64)
    model = build_detector(config)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=detection_loss())
    path = str(tmp_path / "detector.keras")
    save_detector(model, path, {"backbone": {"name": "mobilenet_v2"}, "input_size": 64})
    return path


def _delf(tmp_path) -> str:
    from features.backbones import BackboneConfig
    from features.delf import build_delf_model, save_delf_model

    model, _, layer = build_delf_model(BackboneConfig("mobilenet_v2"), attention_dim=8)
    path = str(tmp_path / "delf.keras")
    save_delf_model(model, path, {"dim": 576, "layer": layer, "receptive_field": [], "input_size": 64})
    return path


@pytest.mark.parametrize("make", ["embedding", "delf", "detector"])
def test_every_exported_model_opens_with_plain_keras_after_one_import(make, tiny_embedder, tmp_path):
    path = {"embedding": lambda: tiny_embedder, "delf": lambda: _delf(tmp_path),
            "detector": lambda: _detector(tmp_path)}[make]()
    result = _opens_plainly(path)
    assert result.returncode == 0 and "loaded" in result.stdout, result.stderr[-1500:]
