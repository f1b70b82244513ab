"""ArcFace logits against hand-computed values (models/heads.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.heads import ArcFace, make_head


def _arcface(dim: int, classes: int, w: np.ndarray, **kw) -> ArcFace:
    layer = ArcFace(classes, **kw)
    layer.build([(None, dim), (None,)])
    layer.w.assign(w)
    return layer


def test_arcface_hand_computed_case():
    # x along e0; class 0 along e0 (theta 0), class 1 along e1 (theta 90 degrees), class 2 at 60 degrees
    w = np.array([[1.0, 0.0, 0.5], [0.0, 2.0, math.sqrt(3) / 2]], np.float32)  # columns: classes (unnormalised)
    layer = _arcface(2, 3, w, margin=0.5, scale=10.0)
    x = np.array([[3.0, 0.0]], np.float32)
    # label 2: its logit becomes s cos(60 deg + 0.5 rad); the others stay s cos(theta)
    got = np.asarray(layer([x, np.array([2])]))[0]
    expected = [10.0 * 1.0, 10.0 * 0.0, 10.0 * math.cos(math.pi / 3 + 0.5)]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # without labels (inference): plain scaled cosines
    np.testing.assert_allclose(np.asarray(layer(x))[0], [10.0, 0.0, 5.0], atol=1e-4)


def test_arcface_past_pi_minus_margin_uses_the_linear_fallback():
    # theta = 170 degrees with m = 0.5: theta + m > pi, so the target logit is s (cos theta - m sin m)
    theta = math.radians(170)
    w = np.array([[math.cos(theta)], [math.sin(theta)]], np.float32)
    layer = _arcface(2, 1, w, margin=0.5, scale=1.0)
    got = float(np.asarray(layer([np.array([[1.0, 0.0]], np.float32), np.array([0])]))[0, 0])
    assert got == pytest.approx(math.cos(theta) - 0.5 * math.sin(0.5), abs=1e-5)


def test_arcface_with_zero_margin_is_a_scaled_cosine_softmax():
    rng = np.random.default_rng(0)
    layer = _arcface(4, 5, rng.normal(size=(4, 5)).astype(np.float32), margin=0.0, scale=8.0)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(layer([x, np.array([0, 1, 4])])), np.asarray(layer(x)), atol=1e-5)


def test_heads_reject_bad_parameters():
    with pytest.raises(ValueError, match="margin"):
        ArcFace(10, margin=2.0)
    with pytest.raises(ValueError, match="classes"):
        ArcFace(0)
    with pytest.raises(ValueError, match="arcface"):
        make_head("triplet", 10, 0.3, 30)
