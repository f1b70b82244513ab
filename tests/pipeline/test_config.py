"""Typed configs (pipeline/config.py): every configured number is finite, and saved JSON holds only numbers."""

from __future__ import annotations

import dataclasses
import json

import pytest

from index.faiss_index import IndexConfig
from index.recognize import TuneConfig, VoteConfig
from index.synthetic import VectorSetConfig
from pipeline import config as cfg
from pipeline.errors import CairnError
from pipeline.images import DecodeConfig
from pipeline.run.settings import MethodsConfig, parse_overrides
from pipeline.synthetic import SynthConfig
from reports.html import ReportConfig

ROOTS = (MethodsConfig(), VoteConfig(), TuneConfig(), IndexConfig(), DecodeConfig(), ReportConfig(), SynthConfig(),
         VectorSetConfig())


def _number_fields(config, prefix=""):
    """(config, field name, dotted path, value) of every float field and tuple-of-numbers field, nested ones too."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from _number_fields(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) or (isinstance(value, tuple) and "float" in str(f.type)):
            yield config, f.name, f"{prefix}{f.name}", value


def _with(value, bad: float):
    """``value`` (a number, a tuple or a tuple of tuples) with its first number replaced by ``bad``."""
    if isinstance(value, float):
        return bad
    if value and isinstance(value[0], tuple):
        return (_with(value[0], bad), *value[1:])
    return (bad, *value[1:])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_every_number_of_every_config_must_be_finite(bad):
    """The generic check (pipeline.config.check_numbers, first in every config's __post_init__): a NaN or an
    infinity in any float field of any config is refused when the config is made, whatever its ranges."""
    fields = [item for root in ROOTS for item in _number_fields(root)]
    assert len(fields) > 60  # every method's parameters, recognition, tuning, synthetic sets
    accepted = []
    for config, name, path, value in fields:
        try:
            dataclasses.replace(config, **{name: _with(value, bad)})
        except ValueError:
            continue
        accepted.append(path)
    assert accepted == []


@pytest.mark.parametrize("text", ["inf", "nan", "-inf", "1e999", "Infinity"])
def test_set_refuses_numbers_that_are_not_finite(text):
    with pytest.raises(CairnError, match="not a finite number|finite"):
        parse_overrides([f"hog.hog.power={text}"])
    with pytest.raises(CairnError, match="not finite"):
        parse_overrides([f"cnn.scales=1,{text}"])
    with pytest.raises(CairnError, match="not finite"):
        parse_overrides([f"detect.train.scales=0.2,0.35;0.55,{text}"])


@pytest.mark.parametrize("setting, message", [
    ("hog.hog.power=0", "power must be in \\(0, 1\\]"),  # |x| ** 0: only the signs are left
    ("hog.hog.power=-0.5", "power must be in \\(0, 1\\]"),
    ("hog.hog.power=2", "power must be in \\(0, 1\\]"),
    ("cnn.scales=0", "scales must be between"),
    ("cnn_pretrained.scales=100", "scales must be between"),
    ("cnn.finetune.margin=2", "margin must be in \\[0, pi/2\\)"),
    ("cnn.finetune.scale=-1", "scale must be > 0"),
    ("cnn.finetune.augment.brightness=-1", "brightness must be in \\[0, 1\\]"),
    ("cnn.finetune.head.gem_p=1000", "gem_p must be between"),
    ("delf.train.learning_rate=-1", "learning_rate and descriptor_lr_scale must be > 0"),
    ("detect.train.positive_iou=0.2", "negative_iou <= positive_iou"),
    ("detect.train.focal_alpha=2", "focal_alpha in \\[0, 1\\]"),
    ("detect.train.ratios=-1", "ratios must be positive"),
    ("detect.detect.classes=1.5", "class ids"),
    ("cnn.finetune.input_size=100000", "input_size must be between 32 and 4096 pixels"),
    ("cnn_pretrained.input_size=5000", "input_size must be between 32 and 4096 pixels"),
    ("delf.max_side=100000", "max_side must be between 32 and 4096 pixels"),
    ("delf.train.input_size=9999", "input_size must be between 32 and 4096 pixels"),
    ("detect.train.input_size=8192", "input_size must be between 64 and 4096 pixels"),
])
def test_set_refuses_numbers_outside_the_range_the_maths_needs(setting, message):
    with pytest.raises(CairnError, match=message):
        parse_overrides([setting])


def test_tuning_grids_stay_in_the_ranges_of_the_rule_they_tune():
    with pytest.raises(ValueError, match="class_norms"):
        TuneConfig(class_norms=(0.0, 2.0))
    with pytest.raises(ValueError, match="weights"):
        TuneConfig(weights=(-1.0,))


def test_json_records_refuse_numbers_that_are_not_finite(tmp_path):
    """NaN and Infinity are not JSON: a record holding one is refused, not written."""
    path = tmp_path / "metrics.json"
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="not finite"):
            cfg.save_json(str(path), {"methods": {"hog": {"gap": bad}}})
        assert not path.exists()
    cfg.save_json(str(path), {"gap": 0.5, "none": None})
    assert json.loads(path.read_text()) == {"gap": 0.5, "none": None}
    with pytest.raises(ValueError):
        cfg.fingerprint({"x": float("nan")})


def _seed_fields(config, prefix=""):
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from _seed_fields(value, f"{prefix}{f.name}.")
        elif f.name == "seed":
            yield config, f"{prefix}{f.name}"


@pytest.mark.parametrize("bad", [-1, 2**31])
def test_every_seed_is_one_numpy_faiss_and_tensorflow_all_take(bad):
    """A negative seed passed every check and failed deep in a job (NumPy's generator refuses it)."""
    fields = [item for root in ROOTS for item in _seed_fields(root)]
    assert len(fields) >= 10
    accepted = []
    for config, path in fields:
        try:
            dataclasses.replace(config, seed=bad)
        except ValueError:
            continue
        accepted.append(path)
    assert accepted == []


def test_detector_fallback_size_is_an_image_side():
    with pytest.raises(CairnError, match="fallback_size must be >= 32"):
        parse_overrides(["detect.detect.fallback_size=0"])
