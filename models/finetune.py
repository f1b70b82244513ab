"""Fine-tuning a CNN backbone for landmark retrieval: GeM + projection + ArcFace (or softmax), class-balanced.

    record = finetune(records, "out/model", FinetuneConfig(backbone=BackboneConfig("resnet50", "imagenet")))
    # out/model/model.keras      the embedding model (image -> L2-normalised embedding) with its metadata
    # out/model/untrained.keras  the same network before fine-tuning (the baseline the fine-tuning must beat)

Training runs in two stages, as transfer learning usually does: ``head_epochs`` with the backbone frozen (the
new projection and class weights settle without wrecking the pretrained features), then ``epochs`` with
the whole network trainable except its batch-norm layers when they are frozen (pretrained weights), at ``learning_rate x finetune_lr_scale`` with a
cosine decay. AdamW with weight decay.

For users:
  - checkpoints and resume: a run that is killed resumes from its last finished epoch when rerun with the same
    config, classes and training images (Keras BackupAndRestore per stage; stage 1's result is kept as
    checkpoints/stage1.weights.h5); checkpoints of any other run are discarded first;
  - early stopping on the validation loss (a held-out share of the classes with 2+ images), restoring the
    best weights; without enough held-out images, on the training loss;
  - TensorBoard logs in logs/ (``tensorboard --logdir OUT/logs``: train and validation on one epoch axis
    for both stages) and history-stage*.csv;
  - mixed precision (float16 compute, float32 variables, loss scaling) and tf.distribute.MirroredStrategy
    over all GPUs when GPUs are present (``mixed_precision``/``distribute`` "auto"); the CPU path otherwise;
  - a progress bar per epoch on a terminal, one line per epoch in logs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from features.backbones import BackboneConfig
from features.base import check_side
from features.embedding import HeadConfig, build_embedding_model, model_metadata, save_embedding_model
from models.data import AugmentConfig, build_cache, evaluation_dataset, training_dataset
from pipeline import config as cfg
from pipeline.errors import CairnError
from pipeline.images import DecodeConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning a backbone with an embedding head and a metric-learning loss."""

    backbone: BackboneConfig = BackboneConfig()  # the CNN and its initial weights (features/backbones.py)
    head: HeadConfig = HeadConfig()  # GeM, projection, batch norm, L2 (features/embedding.py)
    loss: str = "arcface"  # "arcface" (additive angular margin) or "softmax"
    margin: float = 0.3  # ArcFace angular margin, radians
    scale: float = 30.0  # ArcFace logit scale
    input_size: int = 224  # training crop side, pixels (extraction resizes whole images to this)
    epochs: int = 10  # epochs of full fine-tuning (stage 2)
    head_epochs: int = 2  # epochs with the backbone frozen first (stage 1; 0 = none)
    steps_per_epoch: int = 0  # batches per epoch (0 = one pass: training images / batch_size)
    batch_size: int = 32  # images per step (global, across GPUs)
    learning_rate: float = 1e-3  # AdamW learning rate of stage 1
    finetune_lr_scale: float = 0.1  # stage 2 learning rate = learning_rate x this (cosine decay)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    balance: float = 0.5  # class-balanced sampling exponent: 0 = by image, 0.5 = square root, 1 = by class
    validation_fraction: float = 0.1  # share of images of classes with 2+ images held out for early stopping
    patience: int = 3  # epochs without improvement before stopping (0 = no early stopping)
    augment: AugmentConfig = AugmentConfig()  # random resized crop, flip, colour jitter
    cache: str = "memory"  # decoded training images kept in "memory" or a "disk" memmap
    mixed_precision: str = "auto"  # "auto" (on GPUs), "on" or "off"
    distribute: str = "auto"  # "auto" (MirroredStrategy over 2+ GPUs) or "off"
    seed: int = 0  # initialisation, split, sampling and augmentation

    def __post_init__(self):
        cfg.check_numbers(self)
        if self.loss not in ("arcface", "softmax"):
            raise ValueError(f"loss must be 'arcface' or 'softmax', not {self.loss!r}")
        check_side("input_size", self.input_size, 32)
        if self.epochs < 0 or self.head_epochs < 0 or self.epochs + self.head_epochs < 1:
            raise ValueError("epochs and head_epochs must be >= 0 and not both 0")
        if self.batch_size < 2 or self.steps_per_epoch < 0 or self.patience < 0:
            raise ValueError("batch_size must be >= 2, steps_per_epoch and patience >= 0")
        if not 0 <= self.balance <= 1 or not 0 <= self.validation_fraction < 1:
            raise ValueError("balance must be in [0, 1] and validation_fraction in [0, 1)")
        if self.learning_rate <= 0 or self.finetune_lr_scale <= 0 or self.weight_decay < 0:
            raise ValueError("learning_rate and finetune_lr_scale must be > 0, weight_decay >= 0")
        if not 0 <= self.margin < math.pi / 2:  # as models/heads.py's ArcFace, checked before any training
            raise ValueError(f"margin must be in [0, pi/2) radians, not {self.margin}")
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, not {self.scale}")
        for name in ("mixed_precision", "distribute"):
            if getattr(self, name) not in ("auto", "on", "off"):
                raise ValueError(f"{name} must be auto, on or off")
        if self.cache not in ("memory", "disk"):
            raise ValueError(f"cache must be 'memory' or 'disk', not {self.cache!r}")


MIN_VALIDATION = 8  # fewer held-out images than this: early stopping watches the training loss


def split_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): ``fraction`` of the images of each class with 2+ images, at least one
    image of every class staying in training."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2 or fraction <= 0:
            continue
        take = min(len(rows) - 1, int(round(fraction * len(rows))))
        val.extend(rng.choice(rows, size=take, replace=False).tolist())
    val = np.array(sorted(val), np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


@contextlib.contextmanager
def _dtype_policy(name: str):
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def step_timer():
    """A Keras callback recording the wall time of each training step in ``.times``; the first step of every
    fit (which traces the graph) is left out."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        """Wall time of each training step; the first step of every fit (which traces the graph) is left out."""

        def __init__(self):
            super().__init__()
            self.times: list[float] = []
            self._t = 0.0
            self._first = True

        def on_train_begin(self, logs=None):
            self._first = True

        def on_train_batch_begin(self, batch, logs=None):
            self._t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if self._first:
                self._first = False
            else:
                self.times.append(time.perf_counter() - self._t)

    return StepTimer()


def _devices(config: FinetuneConfig) -> tuple[object, bool, int]:
    """(tf.distribute strategy, mixed precision on, GPUs)."""
    import tensorflow as tf

    gpus = len(tf.config.list_physical_devices("GPU"))
    if config.distribute != "off" and gpus > 1:
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    mixed = config.mixed_precision == "on" or (config.mixed_precision == "auto" and gpus > 0)
    return strategy, mixed, gpus


def build_training_model(config: FinetuneConfig, classes: int):
    """(embedding model, training model {"image", "label"} -> [B, classes] logits)."""
    import keras

    from models.heads import make_head

    embedding = build_embedding_model(config.backbone, config.head)
    image = keras.Input((config.input_size, config.input_size, 3), name="image")
    label = keras.Input((), dtype="int64", name="label")
    head = make_head(config.loss, classes, config.margin, config.scale)
    emb = embedding(image)
    if config.loss == "arcface":
        model = keras.Model({"image": image, "label": label}, head([emb, label]), name="training")
    else:
        model = keras.Model({"image": image}, head(emb), name="training")
    return embedding, model


def _set_backbone_trainable(embedding, trainable: bool, freeze_batchnorm: bool) -> None:
    import keras

    backbone = next(layer for layer in embedding.layers if layer.name.startswith("backbone_"))
    backbone.trainable = trainable
    if trainable and freeze_batchnorm:  # unfreezing is recursive: fix the batch-norm statistics again
        for layer in backbone._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False


def _checkpoints_for(out: str, requested: dict) -> None:
    """Keep OUT's checkpoints, logs and history only if they were made for ``requested`` (the config, the
    classes and the training images); otherwise remove them, so that a resume never mixes two runs."""
    import shutil

    marker = os.path.join(out, "checkpoints", "config.json")
    if cfg.check_reusable(marker, requested):
        return
    old = [os.path.join(out, "checkpoints"), os.path.join(out, "logs")]
    old += [os.path.join(out, f) for f in os.listdir(out) if f.startswith("history-stage")]
    if any(os.path.exists(p) for p in old):
        log.info("fine-tuning: discarding checkpoints and logs of another config in %s", out)
    for path in old:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    cfg.save_json(marker, {"config": requested})


def tensorboard(out: str, stage: int = 1):
    """Keras' TensorBoard callback writing to OUT/logs (``tensorboard --logdir OUT/logs``: the runs ``train``
    and, where there is a validation split, ``validation``) on one epoch axis for the whole training: epoch e of
    stage 2 is logged at (stage 1's epochs, from history-stage1.csv) + e, where Keras would start again at 0."""
    import keras

    first = sum(len(figures.get("loss", [])) for name, figures in read_stage_history(out).items()
                if int(name.removeprefix("stage")) < stage)

    class ContinuousTensorBoard(keras.callbacks.TensorBoard):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(first + epoch, logs)

    return ContinuousTensorBoard(os.path.join(out, "logs"), update_freq="epoch")


def read_stage_history(out: str) -> dict[str, dict[str, list[float]]]:
    """{"stage1": {figure: per-epoch values}, "stage2": ...} from OUT/history-stage*.csv (Keras' CSVLogger,
    appended across resumes); a stage without a file is left out."""
    import csv

    history: dict[str, dict[str, list[float]]] = {}
    for stage in (1, 2):
        path = os.path.join(out, f"history-stage{stage}.csv")
        if not os.path.exists(path):
            continue
        figures: dict[str, list[float]] = {}
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for k, v in row.items():
                    if k != "epoch" and v not in ("", "NA", None):  # CSVLogger writes NA for a missing figure
                        figures.setdefault(k, []).append(float(v))
        history[f"stage{stage}"] = figures
    return history


def _read_history(out: str) -> dict[str, list[float]]:
    """Per-epoch figures of both stages, stage 1's first (:func:`read_stage_history`, merged)."""
    history: dict[str, list[float]] = {}
    for figures in read_stage_history(out).values():
        for k, v in figures.items():
            history.setdefault(k, []).extend(v)
    return history


def export(embedding, path: str, config: FinetuneConfig, metadata: dict) -> None:
    """Save ``embedding`` as a float32 model: a mixed-precision one is rebuilt in float32 (without loading any
    initial weights: they are replaced) and given its weights; a float32 one is saved as it is."""
    import dataclasses

    plain = embedding
    if any(layer.compute_dtype != "float32" for layer in embedding.layers):
        with _dtype_policy("float32"):
            plain = build_embedding_model(dataclasses.replace(config.backbone, weights="none"), config.head)
        plain.set_weights(embedding.get_weights())
    save_embedding_model(plain, path, model_metadata(config.backbone, config.head, config.input_size, **metadata))


def labelled_cache(records: list[tuple[str, str, int | None]], out: str, input_size: int, decode: DecodeConfig,
                   mode: str, threads: int, what: str):
    """(sorted classes, labelled records, ImageCache of them with class indices) for training on ``records``:
    the records without a landmark left out, every image decoded once at 1.15 x ``input_size`` (the random crops'
    margin) into OUT/cache or memory. CairnError when fewer than 2 landmarks are there, or left after decoding."""
    labelled = [(i, p, y) for i, p, y in records if y is not None]
    classes = sorted({y for _, _, y in labelled})
    if len(classes) < 2:
        raise CairnError(f"{what} needs images of at least 2 landmarks; the manifest has {len(classes)}")
    index_of = {c: k for k, c in enumerate(classes)}
    os.makedirs(out, exist_ok=True)
    cache = build_cache([(i, p, index_of[y]) for i, p, y in labelled], int(round(input_size * 1.15)), decode, mode,
                        os.path.join(out, "cache"), threads, sys.stderr.isatty())
    if len(np.unique(cache.labels)) < 2:
        raise CairnError(f"{what}: fewer than 2 landmarks left after decoding; see the dead letters")
    return classes, labelled, cache


def finetune(records: list[tuple[str, str, int | None]], out: str, config: FinetuneConfig = FinetuneConfig(),
             decode: DecodeConfig = DecodeConfig(), threads: int = 0) -> dict:
    """Fine-tune on ``records`` (id, path, landmark_id); writes OUT/model.keras and OUT/untrained.keras.

    Records without a landmark id are not used (counted as ``unlabelled``); images that fail to decode are
    dead letters (returned in the record, with their reasons). Returns a JSON-ready record.
    """
    import keras
    import tensorflow as tf

    started = time.perf_counter()
    classes, labelled, cache = labelled_cache(records, out, config.input_size, decode, config.cache, threads,
                                              "fine-tuning")
    progress = sys.stderr.isatty()
    train_rows, val_rows = split_validation(cache.labels, config.validation_fraction, config.seed)
    if len(val_rows) < MIN_VALIDATION:
        train_rows, val_rows = np.arange(len(cache.labels)), np.array([], np.int64)
    monitor = "val_loss" if len(val_rows) else "loss"
    steps = config.steps_per_epoch or max(1, math.ceil(len(train_rows) / config.batch_size))
    log.info("fine-tuning %s (%s) on %d images of %d landmarks (%d held out for validation; %d unlabelled, "
             "%d dead letters): %d + %d epochs of %d steps, batch %d, %s loss", config.backbone.name,
             config.backbone.weights, len(train_rows), len(classes), len(val_rows), len(records) - len(labelled),
             len(cache.dead_letters), config.head_epochs, config.epochs, steps, config.batch_size, config.loss)

    checkpoints = os.path.join(out, "checkpoints")
    _checkpoints_for(out, {"config": cfg.to_dict(config), "classes": [int(c) for c in classes],
                           "train_ids": [cache.ids[i] for i in train_rows]})
    strategy, mixed, gpus = _devices(config)
    keras.utils.set_random_seed(config.seed)  # training owns the seeds: initialisation, dropout, augmentation
    with strategy.scope(), _dtype_policy("mixed_float16" if mixed else "float32"):
        embedding, model = build_training_model(config, len(classes))
    meta = {"classes": [int(c) for c in classes], "training": {"head": config.loss, "images": len(train_rows)}}
    export(embedding, os.path.join(out, "untrained.keras"), config, {**meta, "fine_tuned": False})

    train_ds = training_dataset(cache, train_rows, config.input_size, config.batch_size, config.augment,
                                config.balance, config.seed)
    val_ds = evaluation_dataset(cache, val_rows, config.input_size, config.batch_size) if len(val_rows) else None
    if config.loss == "softmax":
        train_ds = train_ds.map(lambda x, y: ({"image": x["image"]}, y))
        val_ds = val_ds.map(lambda x, y: ({"image": x["image"]}, y)) if val_ds is not None else None
    timer = step_timer()
    stage1 = os.path.join(checkpoints, "stage1.weights.h5")
    stages = [(1, config.head_epochs, False, config.learning_rate),
              (2, config.epochs, True, config.learning_rate * config.finetune_lr_scale)]
    for stage, epochs, train_backbone, lr in stages:
        if not epochs:
            continue
        if stage == 1 and os.path.exists(stage1):
            model.load_weights(stage1)
            log.info("fine-tuning: stage 1 already done (%s); resuming with stage 2", stage1)
            continue
        with strategy.scope():
            _set_backbone_trainable(embedding, train_backbone, config.backbone.frozen_batchnorm)
            schedule = (keras.optimizers.schedules.CosineDecay(lr, epochs * steps, alpha=0.05)
                        if train_backbone else lr)
            model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        callbacks = [
            keras.callbacks.BackupAndRestore(os.path.join(checkpoints, f"stage{stage}")),
            tensorboard(out, stage),
            keras.callbacks.CSVLogger(os.path.join(out, f"history-stage{stage}.csv"), append=True),
            keras.callbacks.TerminateOnNaN(),
            timer,
        ]
        if config.patience:
            callbacks.append(keras.callbacks.EarlyStopping(monitor, patience=config.patience,
                                                           restore_best_weights=True, verbose=1))
        model.fit(train_ds, epochs=epochs, steps_per_epoch=steps, validation_data=val_ds, callbacks=callbacks,
                  verbose=1 if progress else 2, shuffle=False)  # the sampler already draws in random order
        if stage == 1:  # written whole or not at all: a half-written file must not count as "stage 1 done"
            model.save_weights(stage1 + ".tmp.weights.h5")
            os.replace(stage1 + ".tmp.weights.h5", stage1)
    history = _read_history(out)  # every epoch of both stages, also those run before a resume
    if any(not math.isfinite(v) for v in history.get("loss", [])):
        raise CairnError("fine-tuning diverged (the loss became NaN); lower learning_rate or use loss=softmax")
    seconds = time.perf_counter() - started
    meta["training"].update({k: round(v[-1], 5) for k, v in history.items()})
    meta["gem_p"] = float(embedding.get_layer("gem").p.numpy())
    export(embedding, os.path.join(out, "model.keras"), config, {**meta, "fine_tuned": True})
    step = float(np.median(timer.times)) if timer.times else None
    return {
        "classes": len(classes),
        "counts": {"inputs": len(records), "used": len(cache.ids), "unlabelled": len(records) - len(labelled),
                   "dead_letters": len(cache.dead_letters)},
        "dead_letters": cache.dead_letters,
        "train_images": int(len(train_rows)),
        "validation_images": int(len(val_rows)),
        "epochs_run": len(history.get("loss", [])),
        "history": {k: [round(x, 5) for x in v] for k, v in history.items()},
        "step_seconds": round(step, 4) if step else None,
        "train_images_per_second": round(config.batch_size / step, 2) if step else None,
        "gem_p": round(meta["gem_p"], 4),
        "mixed_precision": mixed,
        "gpus": gpus,
        "replicas": int(strategy.num_replicas_in_sync),
        "train_seconds": round(seconds, 3),
        "tf_version": tf.__version__,
    }


def train_head_on_vectors(X: np.ndarray, y: np.ndarray, dim: int = 256, epochs: int = 40, batch_size: int = 64,
                          learning_rate: float = 1e-3, margin: float = 0.3, scale: float = 30.0, seed: int = 0):
    """A head fine-tuned on frozen embeddings: [N, D] float32 -> [N, dim] L2-normalised (a keras.Model).

    Projection, batch norm and L2, trained with ArcFace on the labels ``y`` (any ints). For a frozen extractor
    (TFLite) whose backbone cannot be trained, this is the part of fine-tuning that can be.
    """
    import keras

    from features.layers import L2Normalize
    from models.heads import ArcFace

    keras.utils.set_random_seed(seed)
    classes, index = np.unique(y, return_inverse=True)
    vec = keras.Input((X.shape[1],), name="vector")
    label = keras.Input((), dtype="int64", name="label")
    emb = L2Normalize(name="l2")(keras.layers.BatchNormalization(name="projection_bn")(
        keras.layers.Dense(dim, use_bias=False, name="projection")(vec)))
    head = keras.Model(vec, emb, name="vector_head")
    logits = ArcFace(len(classes), margin, scale, name="arcface")([head(vec), label])
    model = keras.Model({"vector": vec, "label": label}, logits)
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit({"vector": X.astype(np.float32), "label": index.astype(np.int64)}, index.astype(np.int64),
              batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0)
    return head
