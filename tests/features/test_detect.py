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


def _greedy_nms(boxes, scores, iou_threshold, max_out, score_threshold):
    """The textbook loop nms() used to be, as the reference for OpenCV's."""
    from features.boxes import iou_matrix

    order = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] >= score_threshold]
    keep = []
    while order and len(keep) < max_out:
        i = order.pop(0)
        keep.append(i)
        if order:
            overlap = iou_matrix(boxes[[i]], boxes[order])[0]
            order = [j for j, o in zip(order, overlap, strict=True) if o <= iou_threshold]
    return keep


def test_nms_equals_the_greedy_loop_on_random_boxes_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(400):
        n = int(rng.integers(1, 60))
        corner = rng.uniform(0, 100, (n, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(1, 60, (n, 2))], 1).astype(np.float32)
        scores = (rng.choice([-0.5, 0.1, 0.5, 0.9], n) if trial % 2 else rng.normal(0, 1, n)).astype(np.float32)
        iou, max_out = float(rng.choice([0.3, 0.5, 0.7])), int(rng.choice([1, 3, 100]))
        floor = float(rng.choice([-np.inf, 0.0, 0.2]))
        assert list(nms(boxes, scores, iou, max_out, floor)) == _greedy_nms(boxes, scores, iou, max_out, floor), trial


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


def test_an_object_detection_api_saved_model_loads_and_runs(tmp_path):
    import tensorflow as tf

    from features.detect import SavedModelDetector, load_any_detector

    class FakeDetector(tf.Module):
        """The OD API serving signature, answering fixed boxes: two landmarks (class 1) and a person (class 7)."""

        @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8, name="input_tensor")])
        def __call__(self, input_tensor):
            boxes = tf.constant([[[0.1, 0.2, 0.6, 0.7], [0.12, 0.22, 0.6, 0.7], [0.5, 0.5, 1.0, 1.0]]])
            return {"detection_boxes": boxes, "detection_scores": tf.constant([[0.9, 0.8, 0.95]]),
                    "detection_classes": tf.constant([[1.0, 1.0, 7.0]]), "num_detections": tf.constant([3.0])}

    module = FakeDetector()
    path = str(tmp_path / "od")
    tf.saved_model.save(module, path, signatures={"serving_default": module.__call__})
    det = load_any_detector(path, classes=(1,), score_threshold=0.5)
    assert isinstance(det, SavedModelDetector)
    boxes, scores = det.detect(np.zeros((100, 200, 3), np.uint8))
    # (ymin, xmin, ymax, xmax) normalised -> pixels (xmin, ymin, xmax, ymax); the second landmark box overlaps the
    # first (IoU 0.92) and is suppressed; the person (class 7) is filtered out
    np.testing.assert_allclose(boxes, [[40, 10, 140, 60]], atol=1e-4)
    np.testing.assert_allclose(scores, [0.9])
    everything = SavedModelDetector(path, score_threshold=0.0, iou_threshold=0.99)
    assert len(everything.detect(np.zeros((100, 200, 3), np.uint8))[0]) == 3


def test_a_saved_model_without_the_detection_outputs_is_refused(tmp_path):
    import tensorflow as tf

    from features.detect import SavedModelDetector

    class NotADetector(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8, name="images")])
        def __call__(self, images):
            return {"logits": tf.zeros([1, 10])}

    module = NotADetector()
    tf.saved_model.save(module, str(tmp_path / "m"), signatures={"serving_default": module.__call__})
    with pytest.raises(ValueError, match="not an Object Detection API detector"):
        SavedModelDetector(str(tmp_path / "m"))


@pytest.mark.slow
def test_the_detector_trains_exports_and_finds_boxes_on_the_tiny_set(tiny_synth, tmp_path):
    import csv

    from features.backbones import BackboneConfig
    from features.detect import Detector
    from models.detector import DetectorConfig, train_detector
    from pipeline.manifest import read_manifest

    paths = dict(zip(*(lambda m: (m.ids, m.paths))(read_manifest(str(tiny_synth / "train.csv"))), strict=True))
    rows = [r for r in csv.DictReader(open(tiny_synth / "boxes.csv")) if r["id"] in paths]
    from pipeline.images import load_image

    images = [load_image(paths[r["id"]]) for r in rows]
    boxes = [np.array([[float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax")]], np.float32) for r in rows]
    config = DetectorConfig(backbone=BackboneConfig("mobilenet_v2"), input_size=64, epochs=2, batch_size=4)
    record = train_detector(images, boxes, str(tmp_path / "det"), config)
    assert len(record["loss"]) == 2 and all(np.isfinite(record["loss"]))
    from tests.conftest import tensorboard_scalars

    assert sorted(tensorboard_scalars(tmp_path / "det" / "logs")["train"]["epoch_loss"]) == [0, 1]
    det = Detector(str(tmp_path / "det" / "model.keras"), score_threshold=0.0, max_boxes=3)
    found, scores = det.detect(images[0])
    h, w = images[0].shape[:2]
    assert 1 <= len(found) <= 3 and np.all((scores >= 0) & (scores <= 1)) and np.all(np.diff(scores) <= 0)
    assert np.all(found[:, [0, 2]] <= w) and np.all(found[:, [1, 3]] <= h) and np.all(found >= 0)


def test_detection_loss_prefers_the_right_answer():
    import tensorflow as tf

    from models.detector import detection_loss

    loss = detection_loss()
    y_true = np.array([[[1, 0.5, -0.5, 0.1, 0.0], [0, 0, 0, 0, 0], [-1, 0, 0, 0, 0]]], np.float32)
    right = np.array([[[6.0, 0.5, -0.5, 0.1, 0.0], [-6.0, 9, 9, 9, 9], [6.0, 9, 9, 9, 9]]], np.float32)
    wrong = np.array([[[-6.0, 0.0, 0.0, 0.0, 0.0], [6.0, 0, 0, 0, 0], [6.0, 0, 0, 0, 0]]], np.float32)
    good, bad = float(loss(tf.constant(y_true), tf.constant(right))[0]), float(loss(tf.constant(y_true),
                                                                                    tf.constant(wrong))[0])
    assert good < 0.01 < bad  # negatives' offsets and the ignored anchor do not count


def test_boxes_from_activation_hand_computed():
    from features.detect import boxes_from_activation

    a = np.zeros((4, 6), np.float32)
    a[1:3, 2:5] = 1.0  # a hot block: rows 1-2, columns 2-4
    a[0, 0] = 0.4  # a weak spot
    boxes, scores = boxes_from_activation(a, (60, 40), thresholds=(0.3, 0.5))
    # cells are 10 x 10 pixels; at 0.3 (in scan order): the spot (0.4 of the 6.4 total) and the block (6); at 0.5:
    # the block only
    np.testing.assert_allclose(boxes, [[0, 0, 10, 10], [20, 10, 50, 30], [20, 10, 50, 30]])
    np.testing.assert_allclose(scores, [0.4 / 6.4, 6 / 6.4, 6 / 6.4], rtol=1e-6)
    empty = boxes_from_activation(np.ones((3, 3)), (30, 30))
    assert empty[0].shape == (0, 4)


def test_select_regions_threshold_size_and_count():
    from features.detect import DetectConfig, select_regions

    boxes = np.array([[0, 0, 50, 50], [0, 0, 5, 80], [10, 10, 90, 60], [20, 20, 70, 70]], np.float32)
    scores = np.array([0.9, 0.95, 0.5, 0.2], np.float32)
    config = DetectConfig(model="x.keras", score_threshold=0.3, min_side=0.1, max_boxes=2)
    kept, s = select_regions(boxes, scores, 100, 100, config)
    # box 1 is too thin (5 px < 10% of 100), box 3 scores below 0.3; best first
    np.testing.assert_array_equal(kept, boxes[[0, 2]])
    np.testing.assert_allclose(s, [0.9, 0.5])
    kept, _ = select_regions(boxes, scores, 100, 100, DetectConfig(model="x.keras", max_boxes=1))
    np.testing.assert_array_equal(kept, boxes[[0]])


def test_crop_box_margin_and_clipping():
    from features.detect import crop_box

    image = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    np.testing.assert_array_equal(crop_box(image, [2, 3, 12, 8]), image[3:8, 2:12])
    np.testing.assert_array_equal(crop_box(image, [2, 3, 12, 8], margin=0.5), image[0:10, 0:17])  # 5 px, 2.5 px
    assert crop_box(image, [19.5, 9.5, 30, 30]).shape == (1, 1, 3)  # at the corner: still a pixel


def test_regions_full_image_first_and_never_none():
    from features.detect import DetectConfig, regions_of

    image = np.zeros((40, 60, 3), np.uint8)
    boxes, scores = np.array([[10, 10, 40, 30]], np.float32), np.array([0.8], np.float32)
    regions = regions_of(image, boxes, scores, DetectConfig(model="x.keras", margin=0.0))
    assert [r[0] for r in regions] == [0, 1] and regions[0][2] == 1.0
    np.testing.assert_array_equal(regions[0][1], [0, 0, 60, 40])
    assert regions[1][3].shape == (20, 30, 3) and regions[1][2] == pytest.approx(0.8)
    no_full = DetectConfig(model="x.keras", full_image=False)
    assert [r[0] for r in regions_of(image, boxes, scores, no_full)] == [1]
    # no box above the threshold and no full image asked for: the image still gets one region, the whole of it
    only = regions_of(image, boxes, np.array([0.1], np.float32), no_full)
    assert [r[0] for r in only] == [0] and only[0][3].shape == image.shape
    with pytest.raises(ValueError, match="max_boxes"):
        DetectConfig(full_image=False, max_boxes=0)


def test_the_fallback_detector_runs_batched_without_downloads():
    from features.detect import ActivationDetector, DetectConfig, make_detector

    det = make_detector(DetectConfig(model="activation:none", fallback_size=64, max_boxes=2))
    assert isinstance(det, ActivationDetector)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), rng.integers(0, 255, (80, 40, 3), dtype=np.uint8)]
    found = det.detect_images(images)
    assert len(found) == 2
    for (boxes, scores), im in zip(found, images, strict=True):
        assert len(boxes) == len(scores) <= 8
        assert np.all(boxes[:, [0, 2]] <= im.shape[1] + 1e-3) and np.all(boxes[:, [1, 3]] <= im.shape[0] + 1e-3)
