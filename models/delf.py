"""Training DELF (features/delf.py) in the paper's two stages, then the PCA of its descriptors.

1. **Descriptors**: the backbone up to its intermediate block is fine-tuned for landmark classification: its
   feature map, average-pooled, feeds a softmax classifier (cross-entropy).
2. **Attention**: with the backbone frozen, the attention module learns to weight the feature map: the
   attention-weighted mean of the L2-normalised features feeds a second classifier (cross-entropy), so the
   attention grows where features tell landmarks apart (Noh et al. 2017, section 4.2).
3. **PCA**: DELF features are extracted (the pyramid and selection of extraction) from up to ``pca_images``
   database images and a PCA to ``pca_dim`` (40 in the paper, without whitening) is learned on them.

Writes OUT/model.keras (the DELF model, cairn.json inside: backbone, layer, receptive field, classes, training
figures), OUT/pca.npz (features/pca.py), OUT/history-stage{1,2}.csv and OUT/checkpoints/ (resumable with
Keras' BackupAndRestore).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from features.backbones import BackboneConfig
from features.base import check_side
from features.delf import (
    DelfConfig,
    DelfExtractor,
    attention_layers,
    build_delf_model,
    receptive_field,
    save_delf_model,
)
from features.pca import PCAWhitening
from models.data import AugmentConfig, training_dataset
from models.finetune import labelled_cache, read_stage_history, step_timer, tensorboard
from pipeline import config as cfg
from pipeline.errors import CairnError
from pipeline.images import DecodeConfig, ImageError, load_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DelfTrainConfig:
    """DELF training: descriptor fine-tuning, attention training, and the PCA of the descriptors."""

    backbone: BackboneConfig = BackboneConfig("mobilenet")  # the CNN and its initial weights
    layer: str = ""  # the block whose dense features are the descriptors ("" = the backbone's stride-16 block)
    attention_dim: int = 512  # channels of the attention module's hidden 1x1 conv
    input_size: int = 224  # training crop side, pixels
    epochs: int = 5  # stage 1: descriptor fine-tuning epochs (0 = keep the backbone's weights)
    attention_epochs: int = 20  # stage 2: attention epochs, backbone frozen (forward passes only: cheap)
    steps_per_epoch: int = 0  # batches per epoch (0 = one pass over the training images)
    batch_size: int = 32  # images per step
    learning_rate: float = 1e-3  # Adam learning rate of the attention stage
    descriptor_lr_scale: float = 0.3  # descriptor stage learning rate = learning_rate x this
    balance: float = 0.5  # class-balanced sampling exponent (models/data.py)
    augment: AugmentConfig = AugmentConfig()  # random resized crop and colour jitter
    cache: str = "memory"  # decoded training images kept in "memory" or a "disk" memmap
    pca_dim: int = 40  # PCA dimension of the descriptors (0 = no PCA)
    pca_images: int = 1000  # database images whose DELF features the PCA learns from
    seed: int = 0  # initialisation, sampling, augmentation, the PCA sample

    def __post_init__(self):
        cfg.check_numbers(self)
        check_side("input_size", self.input_size, 32)
        if self.input_size < 32 or self.batch_size < 2:
            raise ValueError("input_size must be >= 32 and batch_size >= 2")
        if self.epochs < 0 or self.attention_epochs < 1:
            raise ValueError("epochs must be >= 0 and attention_epochs >= 1")
        if self.pca_dim < 0 or self.pca_images < 1:
            raise ValueError("pca_dim must be >= 0 and pca_images >= 1")
        if self.cache not in ("memory", "disk"):
            raise ValueError(f"cache must be 'memory' or 'disk', not {self.cache!r}")
        if self.learning_rate <= 0 or self.descriptor_lr_scale <= 0:
            raise ValueError("learning_rate and descriptor_lr_scale must be > 0")
        if not 0 <= self.balance <= 1:
            raise ValueError(f"balance must be in [0, 1], not {self.balance}")


def _attention_pool():
    import keras

    class AttentionPool(keras.layers.Layer):
        """[features [B, h, w, C], attention [B, h, w, 1]] -> [B, C]: the sum of attention x L2-normalised
        features over the cells (the paper's y = W (sum_n alpha(f_n) f_n); a mean, as in the later TF code,
        shrinks the pooled vector by h x w and learns far slower from few steps)."""

        def call(self, inputs):
            from keras import ops

            f, a = inputs
            f = f / ops.maximum(ops.sqrt(ops.sum(f * f, axis=-1, keepdims=True)), 1e-6)
            return ops.sum(f * a, axis=(1, 2))

    return AttentionPool(name="attention_pool")


def build_training_models(config: DelfTrainConfig, classes: int):
    """(DELF model, descriptor-stage model, attention-stage model, receptive field); the stage models map
    {"image"} to [B, classes] logits and share the DELF model's layers."""
    import keras

    delf, app, layer = build_delf_model(config.backbone, config.layer, config.attention_dim)
    rf = receptive_field(app, layer)
    image = keras.Input((config.input_size, config.input_size, 3), name="image")
    features, attention = delf(image)
    pooled = keras.layers.GlobalAveragePooling2D(name="descriptor_pool")(features)
    stage1 = keras.Model({"image": image}, keras.layers.Dense(classes, name="descriptor_classifier")(pooled),
                         name="delf_descriptor")
    attended = _attention_pool()([features, attention])
    stage2 = keras.Model({"image": image}, keras.layers.Dense(classes, name="attention_classifier")(attended),
                         name="delf_attention")
    return delf, stage1, stage2, rf, layer


def _set_trainable(delf, stage: int, frozen_batchnorm: bool) -> None:
    import keras

    trunk = next(layer for layer in delf.layers if layer.name.startswith("trunk_"))
    trunk.trainable = stage == 1
    if stage == 1 and frozen_batchnorm:
        for layer in trunk._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    for layer in attention_layers(delf):
        layer.trainable = stage == 2


def train_delf(records: list[tuple[str, str, int | None]], out: str, config: DelfTrainConfig = DelfTrainConfig(),
               extract=None, decode: DecodeConfig = DecodeConfig(), threads: int = 0) -> dict:
    """Train on ``records`` (id, path, landmark_id); writes OUT/model.keras and OUT/pca.npz (see the module).

    ``extract`` is the features.delf.DelfConfig whose pyramid and selection the PCA sample uses (its model and
    pca fields are ignored). Returns a JSON-ready record."""
    import dataclasses

    import keras

    started = time.perf_counter()
    classes, labelled, cache = labelled_cache(records, out, config.input_size, decode, config.cache, threads,
                                              "DELF training")
    progress = sys.stderr.isatty()
    rows = np.arange(len(cache.labels))
    steps = config.steps_per_epoch or max(1, math.ceil(len(rows) / config.batch_size))
    log.info("DELF: training %s/%s (%s) on %d images of %d landmarks: %d descriptor + %d attention epochs of %d "
             "steps, batch %d", config.backbone.name, config.layer or "default block", config.backbone.weights,
             len(rows), len(classes), config.epochs, config.attention_epochs, steps, config.batch_size)
    keras.utils.set_random_seed(config.seed)
    delf, stage1, stage2, rf, layer = build_training_models(config, len(classes))
    data = training_dataset(cache, rows, config.input_size, config.batch_size, config.augment, config.balance,
                            config.seed).map(lambda x, y: ({"image": x["image"]}, y))
    checkpoints = os.path.join(out, "checkpoints")
    marker = os.path.join(checkpoints, "config.json")
    requested = {"config": cfg.to_dict(config), "classes": [int(c) for c in classes], "ids": cache.ids}
    if not cfg.check_reusable(marker, requested):
        import shutil

        for path in (checkpoints, os.path.join(out, "logs"), *(os.path.join(out, f"history-stage{s}.csv")
                                                             for s in (1, 2))):
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        os.makedirs(checkpoints, exist_ok=True)
        cfg.save_json(marker, {"config": requested})
    timer = step_timer()
    stage1_weights = os.path.join(checkpoints, "stage1.weights.h5")
    for stage, model, epochs, lr in ((1, stage1, config.epochs, config.learning_rate * config.descriptor_lr_scale),
                                     (2, stage2, config.attention_epochs, config.learning_rate)):
        if not epochs:
            continue
        if stage == 1 and os.path.exists(stage1_weights):  # a resumed run: stage 1 finished before
            delf.load_weights(stage1_weights)
            log.info("DELF: stage 1 already done (%s); resuming with stage 2", stage1_weights)
            continue
        _set_trainable(delf, stage, config.backbone.frozen_batchnorm)
        model.compile(optimizer=keras.optimizers.Adam(lr),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        callbacks = [keras.callbacks.BackupAndRestore(os.path.join(checkpoints, f"stage{stage}")),
                     keras.callbacks.CSVLogger(os.path.join(out, f"history-stage{stage}.csv"), append=True),
                     tensorboard(out, stage), keras.callbacks.TerminateOnNaN(), timer]
        model.fit(data, epochs=epochs, steps_per_epoch=steps, callbacks=callbacks, verbose=1 if progress else 2)
        if stage == 1:  # whole or not at all: a half-written file must not count as "stage 1 done"
            delf.save_weights(stage1_weights + ".tmp.weights.h5")
            os.replace(stage1_weights + ".tmp.weights.h5", stage1_weights)
    history = {stage: {k: [round(x, 5) for x in v] for k, v in figures.items()}  # every epoch, resumes included
               for stage, figures in read_stage_history(out).items()}
    for stage, h in history.items():
        if any(not math.isfinite(v) for v in h.get("loss", [])):
            raise CairnError(f"DELF training diverged in {stage} (the loss became NaN); lower learning_rate")
    meta = {"backbone": cfg.to_dict(config.backbone), "layer": layer, "attention_dim": config.attention_dim,
            "dim": int(delf.outputs[0].shape[-1]), "input": "RGB 0..255", "input_size": config.input_size,
            "receptive_field": [dataclasses.asdict(r) for r in rf], "classes": [int(c) for c in classes],
            "training": {"images": len(rows), **{f"{s}_{k}": v[-1] for s, h in history.items()
                                                  for k, v in h.items() if v}}}
    model_path = os.path.join(out, "model.keras")
    save_delf_model(delf, model_path, meta)
    train_seconds = time.perf_counter() - started
    pca = None
    if config.pca_dim:
        pca = fit_pca(model_path, records, os.path.join(out, "pca.npz"), config,
                      dataclasses.replace(extract or DelfConfig(), model=model_path, pca=""), decode)
    step = float(np.median(timer.times)) if timer.times else None
    return {"classes": len(classes), "counts": {"inputs": len(records), "used": len(cache.ids),
                                                "unlabelled": len(records) - len(labelled),
                                                "dead_letters": len(cache.dead_letters)},
            "dead_letters": cache.dead_letters, "history": history, "layer": layer,
            "receptive_field": meta["receptive_field"], "dim": meta["dim"],
            "step_seconds": round(step, 4) if step else None, "model_seconds": round(train_seconds, 3), "pca": pca,
            # everything learned: both stages and the PCA (with its extraction)
            "train_seconds": round(time.perf_counter() - started, 3)}


def fit_pca(model_path: str, records: list[tuple[str, str, int | None]], out: str, config: DelfTrainConfig,
            extract, decode: DecodeConfig) -> dict:
    """Learn the descriptors' PCA from the DELF features of up to ``config.pca_images`` database images (a seeded
    sample); writes the artefact to ``out``. Returns what it learned from."""
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    chosen = rng.permutation(len(records))[: config.pca_images]
    extractor = DelfExtractor(extract)
    sets = []
    for k in chosen:
        try:
            image = load_image(records[k][1], decode)
        except ImageError:
            continue
        sets.append(extractor.extract(image).descriptors)
    X = np.concatenate(sets) if sets else np.zeros((0, extractor.dim), np.float32)
    dim = min(config.pca_dim, extractor.dim)
    if len(X) <= dim:
        raise CairnError(f"DELF PCA: {len(X)} descriptors from {len(sets)} images are too few for {dim} "
                         "dimensions; extract more features (max_features) or lower pca_dim")
    pca = PCAWhitening(dim=dim, whiten=False).fit(X)
    pca.save(out)
    log.info("DELF: PCA %d -> %d learned on %d descriptors of %d images in %.1f s", extractor.dim, dim, len(X),
             len(sets), time.perf_counter() - started)
    return {"images": len(sets), "descriptors": int(len(X)), "dim": dim,
            "seconds": round(time.perf_counter() - started, 3)}
