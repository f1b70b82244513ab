"""`cairn synth` (jobs/synth.py): its --help quotes the sizes the generator makes."""

from __future__ import annotations

from jobs.synth import build_parser
from pipeline.badinput import KINDS
from pipeline.synthetic import SynthConfig, plan


def test_help_quotes_the_sizes_the_generator_makes():
    """--help said 116 images while the defaults make 132: the numbers come from the generator now."""
    text = " ".join(build_parser().format_help().split())
    assert f"the defaults make {len(plan(SynthConfig())):,} images" in text
    assert f"--tail 0 makes {len(plan(SynthConfig(classes=1000, views=20, tail=0.0))):,}." in text
    assert f"each of {len(KINDS)} kinds of broken or odd input" in text
    assert "{" not in text


def test_synth_numbers_must_be_finite():
    import pytest

    with pytest.raises(SystemExit):
        build_parser().parse_args(["out", "--tail", "nan"])


def test_a_bad_seed_is_one_error_naming_the_flag(tmp_path):
    import pytest

    from jobs.synth import run
    from pipeline.errors import CairnError

    with pytest.raises(CairnError, match="--seed must be between 0 and 2\\*\\*31 - 1"):
        run([str(tmp_path / "s"), "--seed", "-1"])
