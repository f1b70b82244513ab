"""Landmark detection, the geometry shared by training (models/detector.py) and inference: anchors, box encoding,
non-maximum suppression (OpenCV's).

Boxes are [N, 4] float32 (xmin, ymin, xmax, ymax) in continuous pixel coordinates (area = (xmax - xmin) x
(ymax - ymin)), as in features/boxes.py.

The detector is single-stage (SSD / RetinaNet style): anchors of several scales and aspect ratios tile the cells
of the backbone's stride-16 and stride-32 feature maps, and per anchor a head predicts an objectness logit and
the box as offsets from the anchor (:func:`encode_boxes`). Single-stage because a landmark is one large object
per photo, for which a region proposal stage and RoI pooling (Faster R-CNN) add a second network and a
per-image variable-size step without a gain in recall, and one pass batches well in Beam's RunInference.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from features.backbones import BackboneConfig, build_backbone
from features.cnn import file_sha256
from features.keras_io import load_with_metadata, save_with_metadata
from features.model_ops import load_saved_model
from pipeline import config as cfg
from pipeline.fs import local_path

VARIANCES = (0.1, 0.1, 0.2, 0.2)  # SSD's scaling of the (cx, cy, w, h) offsets: unit-variance targets


def generate_anchors(image_size: tuple[int, int], strides: tuple[int, ...] = (16, 32),
                     scales: tuple[tuple[float, ...], ...] = ((0.15, 0.3), (0.5, 0.8)),
                     ratios: tuple[float, ...] = (0.5, 1.0, 2.0)) -> np.ndarray:
    """[A, 4] float32 anchors for an image of ``image_size`` (height, width) pixels.

    Level ``l`` has one cell every ``strides[l]`` pixels (``ceil(side / stride)`` cells per side), centred at
    ``(j + 0.5) * stride``; at every cell, for each scale ``s`` of ``scales[l]`` (a share of the image's short
    side) and each aspect ratio ``r`` (width / height), an anchor of area ``(s * short side)**2`` and width /
    height ``r``. Order: level, row, column, scale, ratio (the heads' output order).
    """
    if len(strides) != len(scales):
        raise ValueError("one tuple of scales per stride")
    h, w = image_size
    short = min(h, w)
    out = []
    for stride, level_scales in zip(strides, scales, strict=True):
        gh, gw = -(-h // stride), -(-w // stride)
        cy = (np.arange(gh, dtype=np.float32) + 0.5) * stride
        cx = (np.arange(gw, dtype=np.float32) + 0.5) * stride
        sizes = []
        for s in level_scales:
            for r in ratios:
                side = s * short
                sizes.append((side * np.sqrt(r), side / np.sqrt(r)))  # (width, height)
        sizes = np.array(sizes, np.float32)  # [K, 2]
        yy, xx = np.meshgrid(cy, cx, indexing="ij")
        centres = np.stack([xx, yy], axis=-1).reshape(-1, 1, 2)  # [cells, 1, 2]
        half = sizes[None] / 2
        out.append(np.concatenate([centres - half, centres + half], axis=-1).reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def anchors_per_cell(scales: tuple[tuple[float, ...], ...], ratios: tuple[float, ...]) -> list[int]:
    return [len(s) * len(ratios) for s in scales]


def _centre_size(boxes: np.ndarray) -> tuple[np.ndarray, ...]:
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + w / 2, boxes[..., 1] + h / 2, w, h


def encode_boxes(boxes: np.ndarray, anchors: np.ndarray, variances=VARIANCES) -> np.ndarray:
    """[A, 4] targets of ``boxes`` (one per anchor, [A, 4]) relative to ``anchors``: ((cx - acx) / aw,
    (cy - acy) / ah, log(w / aw), log(h / ah)), each divided by its variance."""
    bx, by, bw, bh = _centre_size(np.asarray(boxes, np.float32))
    ax, ay, aw, ah = _centre_size(np.asarray(anchors, np.float32))
    eps = 1e-6
    t = np.stack([(bx - ax) / aw, (by - ay) / ah, np.log(np.maximum(bw, eps) / aw), np.log(np.maximum(bh, eps) / ah)],
                 axis=-1)
    return (t / np.asarray(variances, np.float32)).astype(np.float32)


def decode_boxes(deltas: np.ndarray, anchors: np.ndarray, variances=VARIANCES) -> np.ndarray:
    """The inverse of :func:`encode_boxes`: [..., 4] offsets and anchors -> [..., 4] boxes (xmin, ymin, xmax, ymax).
    The log-size offsets are clipped at log(1000 / 16) so that a wild prediction cannot overflow."""
    d = np.asarray(deltas, np.float32) * np.asarray(variances, np.float32)
    ax, ay, aw, ah = _centre_size(np.asarray(anchors, np.float32))
    clip = np.log(1000.0 / 16)
    cx, cy = ax + d[..., 0] * aw, ay + d[..., 1] * ah
    w, h = aw * np.exp(np.minimum(d[..., 2], clip)), ah * np.exp(np.minimum(d[..., 3], clip))
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1).astype(np.float32)


def clip_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Boxes cut to the image [0, width] x [0, height]."""
    out = np.asarray(boxes, np.float32).copy()
    out[..., [0, 2]] = np.clip(out[..., [0, 2]], 0, width)
    out[..., [1, 3]] = np.clip(out[..., [1, 3]], 0, height)
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.5, max_out: int = 100,
        score_threshold: float = -np.inf) -> np.ndarray:
    """Greedy non-maximum suppression (OpenCV's ``cv2.dnn.NMSBoxes``): indices of the kept boxes, best score
    first. A box is dropped when its IoU with an already kept, higher-scoring box exceeds ``iou_threshold``, or
    its score is below ``score_threshold`` (ties in score: the lower index first)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    candidates = np.flatnonzero(scores >= score_threshold)
    if len(candidates) == 0 or max_out < 1:
        return np.zeros(0, np.int64)
    # OpenCV wants scores >= 0 and only their order matters: their ranks among the candidates (ties stay ties)
    _, rank = np.unique(scores[candidates], return_inverse=True)
    b = boxes[candidates].astype(np.float64)
    xywh = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
    kept = cv2.dnn.NMSBoxes(xywh.tolist(), ((rank + 1) / (rank.max() + 1)).tolist(), 0.0, float(iou_threshold))
    return candidates[np.asarray(kept, np.int64).reshape(-1)][:max_out]


# ---------------------------------------------------------------------------------------------------------------
# The exported detector and inference

FORMAT = "cairn-detector"
VERSION = 1


def save_detector(model, path: str, metadata: dict) -> None:
    """Write the detector to ``path`` (.keras) with cairn.json (backbone, input size, anchor layout) inside."""
    save_with_metadata(model, path, {"format": FORMAT, "version": VERSION, **metadata}, "a detector")


def load_detector(path: str):
    """(keras.Model, metadata) of an exported detector, loaded in Keras' safe mode."""
    return load_with_metadata(path, FORMAT, VERSION, "a Cairn detector", "train one with models/detector.py")


class Detector:
    """Images -> landmark boxes with scores, from an exported detector: each image resized whole to the model's
    square input, objectness and box offsets per anchor, decoded, mapped back to the image's pixels, clipped,
    reduced by NMS."""

    def __init__(self, path: str, score_threshold: float = 0.3, iou_threshold: float = 0.5, max_boxes: int = 5):
        self.model, self.meta = load_detector(path)
        self.size = int(self.meta["input_size"])
        self.anchors = generate_anchors((self.size, self.size), tuple(self.meta["strides"]),
                                        tuple(tuple(s) for s in self.meta["scales"]), tuple(self.meta["ratios"]))
        self.score_threshold, self.iou_threshold, self.max_boxes = score_threshold, iou_threshold, max_boxes

    def prepare(self, image: np.ndarray) -> np.ndarray:
        import cv2

        h, w = image.shape[:2]
        interp = cv2.INTER_AREA if max(h, w) > self.size else cv2.INTER_LINEAR
        return cv2.resize(image, (self.size, self.size), interpolation=interp)

    def detect_batch(self, prepared: np.ndarray, sizes: list[tuple[int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """[B, S, S, 3] prepared images and their (width, height) -> per image (boxes [k, 4], scores [k])."""
        out = np.asarray(self.model.predict_on_batch(np.asarray(prepared, np.float32)), np.float32)
        results = []
        for pred, (w, h) in zip(out, sizes, strict=True):
            scores = 1 / (1 + np.exp(-pred[:, 0]))
            boxes = decode_boxes(pred[:, 1:], self.anchors)
            boxes[:, [0, 2]] *= w / self.size
            boxes[:, [1, 3]] *= h / self.size
            boxes = clip_boxes(boxes, w, h)
            keep = nms(boxes, scores, self.iou_threshold, self.max_boxes, self.score_threshold)
            results.append((boxes[keep], scores[keep]))
        return results

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        return self.detect_batch(self.prepare(image)[None], [(w, h)])[0]

    def detect_images(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Decoded images of any sizes -> per image (boxes, scores), in one model call."""
        if not images:
            return []
        return self.detect_batch(np.stack([self.prepare(im) for im in images]),
                                 [(im.shape[1], im.shape[0]) for im in images])


class SavedModelDetector:
    """A TensorFlow SavedModel detector with the TensorFlow Object Detection API's serving signature, as the
    published landmark detectors ship: ``serving_default`` takes ``input_tensor`` [1, H, W, 3] uint8 and returns
    ``detection_boxes`` [1, N, 4] (ymin, xmin, ymax, xmax, normalised to [0, 1]), ``detection_scores`` [1, N],
    ``detection_classes`` [1, N] and ``num_detections`` [1]. Boxes come back in the image's pixels (xmin, ymin,
    xmax, ymax), above ``score_threshold``, of ``classes`` only when given, reduced by NMS."""

    def __init__(self, path: str, score_threshold: float = 0.3, iou_threshold: float = 0.5, max_boxes: int = 5,
                 classes: tuple[int, ...] = ()):
        loaded = load_saved_model(path)  # refused unless its graph holds pure tensor ops only
        if "serving_default" not in loaded.signatures:
            raise ValueError(f"{path}: the SavedModel has no serving_default signature; an Object Detection API "
                             "export has one (exporter_main_v2.py)")
        self._loaded = loaded  # keeps the variables alive
        self.fn = loaded.signatures["serving_default"]
        inputs = self.fn.structured_input_signature[1]
        if len(inputs) != 1:
            raise ValueError(f"{path}: expected one image input, the signature takes {sorted(inputs)}")
        self.input_name = next(iter(inputs))
        outputs = set(self.fn.structured_outputs)
        missing = {"detection_boxes", "detection_scores"} - outputs
        if missing:
            raise ValueError(f"{path}: the signature lacks {sorted(missing)} (outputs: {sorted(outputs)}); not an "
                             "Object Detection API detector")
        self.score_threshold, self.iou_threshold, self.max_boxes = score_threshold, iou_threshold, max_boxes
        self.classes = tuple(classes)

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[H, W, 3] uint8 -> (boxes [k, 4] in pixels, scores [k])."""
        import tensorflow as tf

        h, w = image.shape[:2]
        out = self.fn(**{self.input_name: tf.convert_to_tensor(np.asarray(image, np.uint8)[None])})
        boxes = np.asarray(out["detection_boxes"], np.float32)[0].reshape(-1, 4)
        scores = np.asarray(out["detection_scores"], np.float32)[0].reshape(-1)
        n = int(np.asarray(out["num_detections"]).reshape(-1)[0]) if "num_detections" in out else len(scores)
        boxes, scores = boxes[:n], scores[:n]
        if self.classes and "detection_classes" in out:
            cls = np.asarray(out["detection_classes"])[0].reshape(-1)[:n].astype(np.int64)
            keep = np.isin(cls, self.classes)
            boxes, scores = boxes[keep], scores[keep]
        pixels = np.stack([boxes[:, 1] * w, boxes[:, 0] * h, boxes[:, 3] * w, boxes[:, 2] * h], axis=1)
        pixels = clip_boxes(pixels, w, h)
        keep = nms(pixels, scores, self.iou_threshold, self.max_boxes, self.score_threshold)
        return pixels[keep], scores[keep]

    def detect_images(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One call per image: Object Detection API exports take one image of its own size."""
        return [self.detect(im) for im in images]


def load_any_detector(path: str, **kwargs):
    """A Cairn detector (.keras) or an Object Detection API SavedModel folder (local, or on a Beam filesystem:
    downloaded once per process)."""
    import os

    path = local_path(path)
    if path.endswith(".keras"):
        return Detector(path, **{k: v for k, v in kwargs.items() if k != "classes"})
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb")):
        return SavedModelDetector(path, **kwargs)
    raise ValueError(f"{path}: not a Cairn detector (.keras from training) nor a SavedModel folder")


# ---------------------------------------------------------------------------------------------------------------
# The training-free fallback: proposals from a CNN's activation map


def boxes_from_activation(activation: np.ndarray, image_size: tuple[int, int],
                          thresholds: tuple[float, ...] = (0.3, 0.5, 0.7)) -> tuple[np.ndarray, np.ndarray]:
    """[h, w] activation map (any scale) of an image of ``image_size`` (width, height) -> (boxes [k, 4] in pixels,
    scores [k]): at each threshold (a share of the map's range), every connected region of cells at or above it
    becomes the box of its cells; its score is the share of the map's total activation (above the minimum) that
    the box holds, so the box holding most of the evidence ranks first."""
    import cv2

    a = np.asarray(activation, np.float32)
    a = a - a.min()
    if a.max() <= 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    a = a / a.max()
    h, w = a.shape
    width, height = image_size
    sx, sy = width / w, height / h
    total = float(a.sum())
    boxes, scores = [], []
    for t in thresholds:
        n, _, stats, _ = cv2.connectedComponentsWithStats((a >= t).astype(np.uint8), connectivity=8)
        for k in range(1, n):
            x, y, bw, bh = (int(v) for v in stats[k, :4])
            boxes.append([x * sx, y * sy, (x + bw) * sx, (y + bh) * sy])
            scores.append(float(a[y:y + bh, x:x + bw].sum()) / total)
    return np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32)


class ActivationDetector:
    """The training-free fallback: the L2 norm over channels of a pretrained backbone's last feature map, turned
    into boxes by :func:`boxes_from_activation` and reduced by NMS. Landmarks are large, textured and
    centred, so where an ImageNet network fires most is a fair first guess of the landmark's extent."""

    def __init__(self, backbone, size: int = 320, thresholds: tuple[float, ...] = (0.3, 0.5, 0.7),
                 iou_threshold: float = 0.5, max_boxes: int = 5):
        self.model = build_backbone(backbone)
        self.size, self.thresholds = size, thresholds
        self.iou_threshold, self.max_boxes = iou_threshold, max_boxes

    def activation(self, image: np.ndarray) -> np.ndarray:
        import cv2

        x = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA)[None].astype(np.float32)
        f = np.asarray(self.model.predict_on_batch(x), np.float32)[0]
        return np.sqrt((f * f).sum(axis=-1))

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        boxes, scores = boxes_from_activation(self.activation(image), (w, h), self.thresholds)
        keep = nms(boxes, scores, self.iou_threshold, self.max_boxes)
        return boxes[keep], scores[keep]

    def detect_images(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Decoded images of any sizes -> per image (boxes, scores), the backbone run once for all."""
        import cv2

        if not images:
            return []
        x = np.stack([cv2.resize(im, (self.size, self.size), interpolation=cv2.INTER_AREA) for im in images])
        maps = np.asarray(self.model.predict_on_batch(x.astype(np.float32)), np.float32)
        out = []
        for im, f in zip(images, maps, strict=True):
            boxes, scores = boxes_from_activation(np.sqrt((f * f).sum(axis=-1)), (im.shape[1], im.shape[0]),
                                                  self.thresholds)
            keep = nms(boxes, scores, self.iou_threshold, self.max_boxes)
            out.append((boxes[keep], scores[keep]))
        return out


# ---------------------------------------------------------------------------------------------------------------
# Detection in the pipeline: which detector, which boxes become regions, and the crops

ACTIVATION = "activation:"  # DetectConfig.model prefix of the training-free fallback


@dataclass(frozen=True)
class DetectConfig:
    """Landmark detection before embedding (`--detector` on extraction): the full image and the detector's top
    boxes become the image's regions, each embedded on its own."""

    model: str = ""  # a Cairn detector (.keras from `cairn train --method detector`), an Object Detection API
    # SavedModel folder, or the training-free fallback "activation:WEIGHTS" (WEIGHTS: a MobileNet v1 .tflite,
    # a .weights.h5 of fallback_backbone, or "imagenet", which downloads)
    score_threshold: float = 0.3  # boxes scoring below this are not regions (the fallback's scores are shares
    # of the activation, so it keeps its boxes above fallback_threshold instead)
    fallback_threshold: float = 0.2
    iou_threshold: float = 0.5  # NMS
    max_boxes: int = 2  # regions cropped per image besides the full image
    min_side: float = 0.15  # boxes whose short side is below this share of the image's short side are dropped
    margin: float = 0.05  # a crop grows by this share of its box's width and height on every side
    full_image: bool = True  # the full image is region 0 (Detect-to-Retrieve keeps it: a missed box costs less)
    classes: tuple[float, ...] = ()  # SavedModel detectors: keep these class ids only (empty: all)
    fallback_backbone: str = "mobilenet"  # the fallback's network (features/backbones.py)
    fallback_size: int = 320  # the fallback's input side
    batch_size: int = 16  # images per detector call

    def __post_init__(self):
        cfg.check_numbers(self)
        if self.max_boxes < 0 or self.batch_size < 1:
            raise ValueError("max_boxes must be >= 0 and batch_size >= 1")
        if self.fallback_size < 32:
            raise ValueError(f"fallback_size must be >= 32 pixels, not {self.fallback_size}")
        if not self.full_image and self.max_boxes == 0:
            raise ValueError("with full_image off, max_boxes must be >= 1 (an image needs a region)")
        for name in ("score_threshold", "fallback_threshold", "iou_threshold", "min_side"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], not {getattr(self, name)}")
        if not 0 <= self.margin <= 1:
            raise ValueError(f"margin must be in [0, 1], not {self.margin}")
        if any(c < 0 or c != int(c) for c in self.classes):
            raise ValueError(f"classes must be class ids (whole numbers >= 0), not {self.classes}")

    @property
    def fallback(self) -> bool:
        return self.model.startswith(ACTIVATION)

    def regions_per_image(self) -> int:
        return self.max_boxes + int(self.full_image)


def make_detector(config: DetectConfig):
    """The detector of ``config.model``, with ``detect_images(images) -> [(boxes, scores)]``."""
    if not config.model:
        raise ValueError("no detector given: a .keras from `cairn train --method detector`, a SavedModel folder, "
                         "or activation:WEIGHTS for the training-free fallback")
    if config.fallback:
        weights = config.model[len(ACTIVATION):] or "imagenet"
        return ActivationDetector(BackboneConfig(config.fallback_backbone, weights=weights), config.fallback_size,
                                  iou_threshold=config.iou_threshold, max_boxes=4 * max(1, config.max_boxes))
    return load_any_detector(config.model, score_threshold=config.score_threshold,
                             iou_threshold=config.iou_threshold, max_boxes=4 * max(1, config.max_boxes),
                             classes=tuple(int(c) for c in config.classes))


def detector_metadata(config: DetectConfig) -> dict:
    """What a detection run depends on: its config and the model file's (or folder's) fingerprint."""
    import os

    path = config.model[len(ACTIVATION):] if config.fallback else config.model
    sha = file_sha256(path)[:16] if path and os.path.exists(path) else None  # a SavedModel: every file
    return {"config": cfg.to_dict(config), "model_sha256": sha}


def select_regions(boxes: np.ndarray, scores: np.ndarray, width: int, height: int,
                   config: DetectConfig) -> tuple[np.ndarray, np.ndarray]:
    """The detections that become regions: score at or above the threshold, short side at least ``min_side`` of
    the image's, at most ``max_boxes``, best first."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    threshold = config.fallback_threshold if config.fallback else config.score_threshold
    side = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    keep = (scores >= threshold) & (side >= config.min_side * min(width, height))
    order = np.flatnonzero(keep)[np.argsort(-scores[keep], kind="stable")][:config.max_boxes]
    return boxes[order], scores[order]


def crop_box(image: np.ndarray, box, margin: float = 0.0) -> np.ndarray:
    """The pixels of ``box`` (grown by ``margin`` of its size on every side, cut to the image), at least 1x1."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    ix0, iy0 = max(0, int(np.floor(x0 - mx))), max(0, int(np.floor(y0 - my)))
    ix1, iy1 = min(w, int(np.ceil(x1 + mx))), min(h, int(np.ceil(y1 + my)))
    ix0, iy0 = min(ix0, w - 1), min(iy0, h - 1)
    return image[iy0:max(iy1, iy0 + 1), ix0:max(ix1, ix0 + 1)]


def regions_of(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, config: DetectConfig):
    """[(region number, box [4], score, crop)] of an image: region 0 the full image (score 1) when
    ``full_image`` or when no detection is selected (every image keeps a region), then the selected
    detections, best first."""
    h, w = image.shape[:2]
    boxes, scores = select_regions(boxes, scores, w, h, config)
    out = []
    if config.full_image or not len(boxes):
        out.append((0, np.array([0, 0, w, h], np.float32), 1.0, image))
    for k, (b, s) in enumerate(zip(boxes, scores, strict=True), start=1):
        out.append((k, b, float(s), crop_box(image, b, config.margin)))
    return out
