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

from features.backbones import BackboneConfig, build_backbone
from features.base import check_side
from features.boxes import iou_matrix
from features.detect import anchors_per_cell, encode_boxes, generate_anchors, save_detector
from pipeline import config as cfg


def assign_anchors(anchors: np.ndarray, boxes: np.ndarray, positive_iou: float = 0.5,
                   negative_iou: float = 0.4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels [A] int8: 1 positive, 0 negative, -1 ignored; matched [A] int64: the box of each anchor, -1 for
    none; targets [A, 4] float32: encoded boxes of the positives, 0 elsewhere) for [A, 4] anchors and [N, 4]
    ground-truth boxes of one image."""
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
        cfg.check_numbers(self)
        if not 0 < self.crop_scale_min <= 1 or not 0 < self.keep_min <= 1:
            raise ValueError("crop_scale_min and keep_min must be in (0, 1]")
        if not 0 <= self.brightness <= 1 or not 0 <= self.contrast <= 1:
            raise ValueError("brightness and contrast must be in [0, 1]")


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


# ---------------------------------------------------------------------------------------------------------------
# The model and its training

# the backbone blocks at strides 16 and 32 whose feature maps carry the anchors
LEVELS = {"mobilenet": ("conv_pw_11_relu", "conv_pw_13_relu"), "mobilenet_v2": ("block_13_expand_relu", "out_relu"),
          "resnet50": ("conv4_block6_out", "conv5_block3_out"),
          "efficientnet_b0": ("block6a_expand_activation", "top_activation")}


@dataclass(frozen=True)
class DetectorConfig:
    """The single-stage landmark detector (features/detect.py) and its training."""

    backbone: BackboneConfig = BackboneConfig("mobilenet")  # the CNN and its initial weights
    input_size: int = 320  # images are resized whole to this square (anchors are laid out for it)
    scales: tuple[tuple[float, ...], ...] = ((0.2, 0.35), (0.55, 0.8))  # anchor sides per level, share of the side
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # anchor aspect ratios (width / height)
    head_channels: int = 128  # channels of each level's shared 3x3 conv
    positive_iou: float = 0.5  # anchor assignment thresholds (assign_anchors)
    negative_iou: float = 0.4
    focal_gamma: float = 2.0  # focal loss focusing (0 = plain cross-entropy)
    focal_alpha: float = 0.25  # focal loss weight of positives
    epochs: int = 20  # training epochs
    steps_per_epoch: int = 0  # batches per epoch (0 = one pass over the images)
    batch_size: int = 16  # images per step
    learning_rate: float = 1e-3  # Adam
    backbone_trainable: bool = False  # fine-tune the backbone too (else only the heads learn)
    augment: BoxAugmentConfig = BoxAugmentConfig()  # box-aware augmentation
    seed: int = 0  # initialisation, order, augmentation

    def __post_init__(self):
        cfg.check_numbers(self)
        check_side("input_size", self.input_size, 64)
        if self.input_size < 64 or self.input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32, at least 64, not {self.input_size}")
        if len(self.scales) != 2:
            raise ValueError("scales: one tuple per level (strides 16 and 32)")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if any(not group or any(not 0 < s <= 1 for s in group) for group in self.scales):
            raise ValueError(f"scales are anchor sides as shares of the image side, in (0, 1]; got {self.scales}")
        if not self.ratios or any(r <= 0 for r in self.ratios):
            raise ValueError(f"ratios must be positive aspect ratios, not {self.ratios}")
        if not 0 <= self.negative_iou <= self.positive_iou <= 1 or self.positive_iou == 0:
            raise ValueError("need 0 <= negative_iou <= positive_iou <= 1 and positive_iou > 0")
        if self.focal_gamma < 0 or not 0 <= self.focal_alpha <= 1:
            raise ValueError("focal_gamma must be >= 0 and focal_alpha in [0, 1]")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, not {self.learning_rate}")

    def anchors(self) -> np.ndarray:
        return generate_anchors((self.input_size, self.input_size), (16, 32), self.scales, self.ratios)


def _backbone(config: DetectorConfig):
    return config.backbone or BackboneConfig("mobilenet")


def build_detector(config: DetectorConfig):
    """keras.Model image [B, S, S, 3] float32 RGB 0..255 -> [B, A, 5]: per anchor an objectness logit and the
    4 encoded box offsets, anchors in features.detect.generate_anchors order."""
    import keras

    from features.layers import Preprocess

    backbone = _backbone(config)
    full = build_backbone(backbone)
    app = full.layers[-1]
    mode = next(layer for layer in full.layers if isinstance(layer, Preprocess)).mode
    names = LEVELS[backbone.name]
    trunk = keras.Model(app.input, [app.get_layer(n).output for n in names], name=f"trunk_{backbone.name}")
    trunk.trainable = config.backbone_trainable
    image = keras.Input((config.input_size, config.input_size, 3), name="image")
    maps = trunk(Preprocess(mode, name="preprocess")(image))
    outputs = []
    for level, (fmap, k) in enumerate(zip(maps, anchors_per_cell(config.scales, config.ratios), strict=True)):
        x = keras.layers.Conv2D(config.head_channels, 3, padding="same", activation="relu", name=f"head{level}")(fmap)
        # objectness bias at -log((1 - p) / p), p = 0.01: the rare positives do not swamp the first steps
        cls = keras.layers.Conv2D(k, 3, padding="same", name=f"cls{level}",
                                  bias_initializer=keras.initializers.Constant(-4.595))(x)
        box = keras.layers.Conv2D(4 * k, 3, padding="same", name=f"box{level}", kernel_initializer="zeros")(x)
        outputs.append(keras.layers.Concatenate(axis=-1, name=f"out{level}")(
            [keras.layers.Reshape((-1, 1), name=f"cls{level}_flat")(cls),
             keras.layers.Reshape((-1, 4), name=f"box{level}_flat")(box)]))
    out = keras.layers.Concatenate(axis=1, name="detections", dtype="float32")(outputs)
    return keras.Model(image, out, name="detector")


def detection_loss(gamma: float = 2.0, alpha: float = 0.25):
    """Loss on y_true [B, A, 5] (label 1 / 0 / -1 ignored, 4 targets) and y_pred [B, A, 5] (logit, 4 offsets):
    sigmoid focal loss over the positive and negative anchors plus smooth L1 (Huber, delta 1) on the positives'
    offsets, both divided by the number of positives (at least 1) of the image."""
    from keras import ops

    def loss(y_true, y_pred):
        label, target = y_true[..., 0], y_true[..., 1:]
        logit, offsets = y_pred[..., 0], y_pred[..., 1:]
        pos = ops.cast(ops.equal(label, 1.0), "float32")
        valid = ops.cast(ops.greater_equal(label, 0.0), "float32")
        p = ops.sigmoid(logit)
        ce = ops.maximum(logit, 0) - logit * pos + ops.log1p(ops.exp(-ops.abs(logit)))
        p_t = pos * p + (1 - pos) * (1 - p)
        a_t = pos * alpha + (1 - pos) * (1 - alpha)
        focal = a_t * ops.power(1 - p_t, gamma) * ce * valid
        diff = ops.abs(offsets - target)
        huber = ops.sum(ops.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5), axis=-1) * pos
        n = ops.maximum(ops.sum(pos, axis=-1), 1.0)
        return (ops.sum(focal, axis=-1) + ops.sum(huber, axis=-1)) / n

    return loss


def targets_for(boxes: np.ndarray, anchors: np.ndarray, config: DetectorConfig) -> np.ndarray:
    """[A, 5] float32 y_true of one image: label (1, 0, -1) and the encoded box of the positives."""
    labels, _, targets = assign_anchors(anchors, boxes, config.positive_iou, config.negative_iou)
    return np.concatenate([labels[:, None].astype(np.float32), targets], axis=1)


def _batches(images: list[np.ndarray], boxes: list[np.ndarray], config: DetectorConfig, steps: int):
    """A keras PyDataset of augmented (images [B, S, S, 3] float32, y_true [B, A, 5]) batches, seeded per epoch."""
    import keras

    anchors = config.anchors()

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epoch = 0

        def __len__(self):
            return steps

        def on_epoch_end(self):
            self.epoch += 1

        def __getitem__(self, i):
            rng = np.random.default_rng([config.seed, self.epoch, i])
            rows = rng.integers(0, len(images), config.batch_size)
            xs, ys = [], []
            for r in rows:
                img, b = augment_with_boxes(images[r], boxes[r], config.input_size, rng, config.augment)
                xs.append(img)
                ys.append(targets_for(b, anchors, config))
            return np.stack(xs).astype(np.float32), np.stack(ys)

    return Batches()


def train_detector(images: list[np.ndarray], boxes: list[np.ndarray], out: str,
                   config: DetectorConfig = DetectorConfig()) -> dict:
    """Train on decoded images ([H, W, 3] uint8) and their boxes ([N, 4] in their pixels; none for a negative
    image); writes OUT/model.keras (with cairn.json: backbone, input size, anchors), OUT/history.csv, OUT/logs/
    (TensorBoard) and OUT/checkpoints/ (per epoch, for resuming; removed when training ends). Returns a
    JSON-ready record."""
    import math
    import os
    import shutil
    import time

    import keras

    if not images:
        raise ValueError("no training images with boxes")
    started = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    keras.utils.set_random_seed(config.seed)
    model = build_detector(config)
    steps = config.steps_per_epoch or max(1, math.ceil(len(images) / config.batch_size))
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                  loss=detection_loss(config.focal_gamma, config.focal_alpha))
    # BackupAndRestore: a killed run resumes from its last finished epoch (weights, optimizer, epoch count); a new
    # run starts its TensorBoard logs afresh
    if not os.path.isdir(os.path.join(out, "checkpoints")):
        shutil.rmtree(os.path.join(out, "logs"), ignore_errors=True)
    callbacks = [keras.callbacks.BackupAndRestore(os.path.join(out, "checkpoints")),
                 keras.callbacks.CSVLogger(os.path.join(out, "history.csv"), append=True),
                 keras.callbacks.TensorBoard(os.path.join(out, "logs"), update_freq="epoch"),
                 keras.callbacks.TerminateOnNaN()]
    fit = model.fit(_batches(images, boxes, config, steps), epochs=config.epochs, callbacks=callbacks, verbose=2)
    losses = [float(v) for v in fit.history.get("loss", [])]
    if not losses or any(not math.isfinite(v) for v in losses):
        raise ValueError("detector training diverged (the loss became NaN); lower learning_rate")
    backbone = _backbone(config)
    meta = {"backbone": cfg.to_dict(backbone), "input_size": config.input_size, "strides": [16, 32],
            "scales": [list(s) for s in config.scales], "ratios": list(config.ratios),
            "training": {"images": len(images), "epochs": config.epochs, "loss": round(losses[-1], 5)}}
    save_detector(model, os.path.join(out, "model.keras"), meta)
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    return {"images": len(images), "steps_per_epoch": steps, "loss": [round(v, 5) for v in losses],
            "train_seconds": round(time.perf_counter() - started, 3)}
