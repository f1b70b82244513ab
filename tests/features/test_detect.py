import numpy as np
import pytest

from features.detect import clip_boxes, decode_boxes, encode_boxes, generate_anchors, nms


def test_nms_hand_computed():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.9], np.float32)
    # IoU(0, 1) = 81 / (100 + 100 - 81) = 0.68; box 3 is box 0 again with the same score (a later index)
    assert list(nms(boxes, scores, 0.5)) == [0, 2]
    assert list(nms(boxes, scores, 0.7)) == [0, 1, 2]  # 0.68 <= 0.7 stays
    assert list(nms(boxes, scores, 0.5, max_out=1)) == [0]
    assert list(nms(boxes, scores, 0.5, score_threshold=0.75)) == [0]
    assert list(nms(np.zeros((0, 4)), np.zeros(0))) == []


def test_anchors_tile_every_cell_with_every_scale_and_ratio():
    anchors = generate_anchors((64, 96), strides=(16, 32), scales=((0.25,), (0.5, 1.0)), ratios=(1.0, 2.0))
    # level 16: 4 x 6 cells x 2 shapes; level 32: 2 x 3 cells x 4 shapes
    assert anchors.shape == (4 * 6 * 2 + 2 * 3 * 4, 4)
    first = anchors[0]  # cell (0, 0) at (8, 8), scale 0.25 of the short side 64 = 16, ratio 1
    np.testing.assert_allclose(first, [0, 0, 16, 16])
    w, h = anchors[1, 2] - anchors[1, 0], anchors[1, 3] - anchors[1, 1]  # ratio 2: w / h = 2, area 16^2
    assert w / h == pytest.approx(2.0) and w * h == pytest.approx(256.0)


def test_encode_decode_round_trip_and_zero_for_the_anchor_itself():
    rng = np.random.default_rng(0)
    anchors = generate_anchors((128, 128))
    xy = rng.uniform(0, 100, (len(anchors), 2))
    boxes = np.c_[xy, xy + rng.uniform(5, 60, (len(anchors), 2))].astype(np.float32)
    np.testing.assert_allclose(decode_boxes(encode_boxes(boxes, anchors), anchors), boxes, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(encode_boxes(anchors, anchors), 0, atol=1e-6)


def test_clip_boxes():
    np.testing.assert_array_equal(clip_boxes(np.array([[-5, 2, 50, 70]]), 40, 60), [[0, 2, 40, 60]])
