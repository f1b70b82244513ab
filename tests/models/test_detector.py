import numpy as np
import pytest

from features.detect import decode_boxes
from models.detector import BoxAugmentConfig, assign_anchors, augment_with_boxes


def test_anchor_assignment_on_a_toy_case():
    anchors = np.array([
        [0, 0, 32, 32],  # a0: IoU 1 with box 0 -> positive
        [32, 32, 64, 64],  # a1: 784 / 1140 = 0.69 with box 1 -> positive
        [0, 0, 40, 40],  # a2: 1024 / 1600 = 0.64 with box 0 -> positive
        [8, 8, 40, 40],  # a3: 576 / 1472 = 0.39 with box 0 (< 0.4) -> negative
        [4, 4, 36, 36],  # a4: 784 / 1264 = 0.62 with box 0 -> positive
        [8, 8, 38, 38],  # a5: 576 / 1348 = 0.43 with box 0 (between 0.4 and 0.5) -> ignored
        [44, 0, 64, 16],  # a6: 64 / 320 = 0.2 with box 2, but box 2's best anchor -> positive
    ], np.float32)
    boxes = np.array([[0, 0, 32, 32], [30, 30, 60, 60], [50, 0, 58, 8]], np.float32)
    labels, matched, targets = assign_anchors(anchors, boxes)
    assert list(labels) == [1, 1, 1, 0, 1, -1, 1]
    assert list(matched) == [0, 1, 0, -1, 0, -1, 2]
    np.testing.assert_allclose(targets[0], 0, atol=1e-6)  # the anchor is the box
    pos = labels == 1
    np.testing.assert_allclose(decode_boxes(targets[pos], anchors[pos]), boxes[matched[pos]], atol=1e-3)
    assert np.all(targets[~pos] == 0)
    none = assign_anchors(anchors, np.zeros((0, 4)))
    assert np.all(none[0] == 0) and np.all(none[1] == -1)


@pytest.mark.parametrize("flip", [False, True])
def test_box_aware_augmentation_keeps_the_box_on_the_object(flip):
    image = np.full((120, 160, 3), 128, np.uint8)
    image[30:90, 40:100] = (230, 20, 20)  # the "landmark": a red block
    box = np.array([[40, 30, 100, 90]], np.float32)
    config = BoxAugmentConfig(flip=flip, brightness=0.0, contrast=0.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        out, moved = augment_with_boxes(image, box, 96, rng, config)
        assert out.shape == (96, 96, 3)
        red = (out[..., 0] > 180) & (out[..., 1] < 70)
        x0, y0, x1, y1 = moved[0]
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
        inside = red[int(np.ceil(y0)) + 2:int(y1) - 2, int(np.ceil(x0)) + 2:int(x1) - 2]
        assert inside.mean() > 0.97  # the box still covers the object...
        outside = red.copy()
        outside[max(0, int(y0) - 2):int(np.ceil(y1)) + 2, max(0, int(x0) - 2):int(np.ceil(x1)) + 2] = False
        assert outside.sum() == 0  # ...and nothing of it lies outside the box
        assert (x1 - x0) * (y1 - y0) >= 0.7 * 60 * 60 * (96 / 160) * (96 / 120)  # at least keep_min of it, scaled


def test_box_augment_config_is_checked():
    with pytest.raises(ValueError):
        BoxAugmentConfig(keep_min=0)
