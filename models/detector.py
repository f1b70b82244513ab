"""Training the landmark detector (features/detect.py): anchor assignment and box-aware augmentation.

Anchor assignment follows SSD / RetinaNet: an anchor whose best IoU with a ground-truth box is >= ``positive_iou``
is a positive for that box, one whose best IoU is < ``negative_iou`` a negative, those between are ignored in
the loss; and every ground-truth box claims its best anchor (even below ``positive_iou``), so that no box is
left without a positive. Positives get the encoded box (features/detect.encode_boxes) as regression target.

Augmentation moves the boxes with the pixels: a random crop that keeps a share of every box, a rescale to
the training size, an optional horizontal flip (off by default: a mirrored facade is another building's layout)
and colour jitter, which leaves the boxes alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.detect import encode_boxes


def assign_anchors(anchors: np.ndarray, boxes: np.ndarray, positive_iou: float = 0.5,
                   negative_iou: float = 0.4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels [A] int8: 1 positive, 0 negative, -1 ignored; matched [A] int64: the box of each anchor, -1 for
    none; targets [A, 4] float32: encoded boxes of the positives, 0 elsewhere) for [A, 4] anchors and [N, 4]
    ground-truth boxes of one image."""
    from reports.metrics import iou_matrix

    if not 0 <= negative_iou <= positive_iou <= 1:
        raise ValueError("need 0 <= negative_iou <= positive_iou <= 1")
    a = len(anchors)
    labels = np.zeros(a, np.int8)
    matched = np.full(a, -1, np.int64)
    targets = np.zeros((a, 4), np.float32)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if len(boxes) == 0:
        return labels, matched, targets
    overlap = iou_matrix(anchors, boxes)  # [A, N]
    best_box = overlap.argmax(axis=1)
    best_iou = overlap[np.arange(a), best_box]
    labels[(best_iou >= negative_iou) & (best_iou < positive_iou)] = -1
    positive = best_iou >= positive_iou
    for n in range(len(boxes)):  # every box claims its best anchor
        k = int(np.argmax(overlap[:, n]))
        if overlap[k, n] > 0:
            positive[k] = True
            best_box[k] = n
    labels[positive] = 1
    matched[positive] = best_box[positive]
    if positive.any():
        targets[positive] = encode_boxes(boxes[best_box[positive]], anchors[positive])
    return labels, matched, targets


@dataclass(frozen=True)
class BoxAugmentConfig:
    """Box-aware augmentation of detector training images."""

    crop_scale_min: float = 0.5  # smallest crop side, as a share of the image side
    keep_min: float = 0.7  # every box keeps at least this share of its area inside the crop
    flip: bool = False  # horizontal flips (off: mirrored landmarks are other buildings' layouts)
    brightness: float = 0.2  # max brightness change (share of 255)
    contrast: float = 0.2  # contrast factor in [1 - c, 1 + c]
    attempts: int = 20  # crops tried before falling back to the whole image

    def __post_init__(self):
        if not 0 < self.crop_scale_min <= 1 or not 0 < self.keep_min <= 1:
            raise ValueError("crop_scale_min and keep_min must be in (0, 1]")


def _box_area(b: np.ndarray) -> np.ndarray:
    return np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)


def augment_with_boxes(image: np.ndarray, boxes: np.ndarray, size: int, rng: np.random.Generator,
                       config: BoxAugmentConfig = BoxAugmentConfig()) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, 3] uint8 and [N, 4] boxes -> ([size, size, 3] uint8, [N, 4] boxes in the new pixels): a random crop
    in which every box keeps at least ``keep_min`` of its area (else the whole image), boxes cut to the crop,
    a resize to ``size`` x ``size``, an optional flip, brightness and contrast jitter."""
    import cv2

    h, w = image.shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    x0, y0, x1, y1 = 0.0, 0.0, float(w), float(h)
    for _ in range(config.attempts):
        cw = w * rng.uniform(config.crop_scale_min, 1.0)
        ch = h * rng.uniform(config.crop_scale_min, 1.0)
        cx0, cy0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        cut = boxes.copy()
        cut[:, [0, 2]] = np.clip(cut[:, [0, 2]], cx0, cx0 + cw)
        cut[:, [1, 3]] = np.clip(cut[:, [1, 3]], cy0, cy0 + ch)
        if np.all(_box_area(cut) >= config.keep_min * _box_area(boxes)):
            x0, y0, x1, y1 = cx0, cy0, cx0 + cw, cy0 + ch
            break
    ix0, iy0 = int(np.floor(x0)), int(np.floor(y0))
    ix1, iy1 = max(ix0 + 1, int(np.ceil(x1))), max(iy0 + 1, int(np.ceil(y1)))
    crop = image[iy0:iy1, ix0:ix1]
    sx, sy = size / crop.shape[1], size / crop.shape[0]
    out = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if sx < 1 else cv2.INTER_LINEAR)
    moved = boxes.copy()
    moved[:, [0, 2]] = (np.clip(moved[:, [0, 2]], ix0, ix1) - ix0) * sx
    moved[:, [1, 3]] = (np.clip(moved[:, [1, 3]], iy0, iy1) - iy0) * sy
    if config.flip and rng.random() < 0.5:
        out = out[:, ::-1].copy()
        moved[:, [0, 2]] = size - moved[:, [2, 0]]
    if config.brightness or config.contrast:
        x = out.astype(np.float32)
        factor = rng.uniform(1 - config.contrast, 1 + config.contrast)
        shift = rng.uniform(-config.brightness, config.brightness) * 255
        x = (x - x.mean()) * factor + x.mean() + shift
        out = np.clip(x, 0, 255).astype(np.uint8)
    return out, np.clip(moved, 0, size).astype(np.float32)  # float round-off must not leave the image
