"""`cairn train`: the trainer of a method (pipeline/stages/train.py) with its parameters from MethodsConfig.

The registry (methods.py) names each trainer and what it reads (a features folder or the database images); the
functions here, one per trainer, take (source, out, MethodsConfig, TrainOptions) and return the train.json
record with its cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.images import DecodeConfig
from pipeline.run import methods
from pipeline.run.settings import MethodsConfig
from pipeline.stages.train import (
    train_classifier,
    train_cnn,
    train_delf,
    train_detector,
    train_encoder,
    train_pca,
)


@dataclass(frozen=True)
class TrainOptions:
    """What a trainer may need besides its source, output and parameters."""

    workers: int = 1  # Beam worker processes (descriptor sampling)
    beam_args: tuple[str, ...] = ()  # Beam flags passed through
    force: bool = False  # retrain even when OUT holds the same model
    decode: DecodeConfig = DecodeConfig()  # image decoding (trainers on images)
    boxes: str = ""  # landmark boxes (the detector)
    test_pipelines: Callable | None = None  # gives a new test pipeline for each Beam job (tests), else None

    def pipeline(self):
        """A new test pipeline for a Beam job, or None (the job makes its own)."""
        return self.test_pipelines() if self.test_pipelines else None


def sift_bovw(source: str, out: str, config: MethodsConfig, o: TrainOptions) -> dict:
    return train_encoder("sift-bovw", source, out, config.bovw, o.workers, list(o.beam_args), o.force,
                         o.pipeline())


def sift_vlad(source: str, out: str, config: MethodsConfig, o: TrainOptions) -> dict:
    return train_encoder("sift-vlad", source, out, config.vlad, o.workers, list(o.beam_args), o.force,
                         o.pipeline())


def hog(source: str, out: str, config: MethodsConfig, o: TrainOptions) -> dict:
    if config.hog.pca_dim <= 0:
        return {"method": "hog", "trained": False, "train_seconds": 0.0}
    return train_pca("hog", source, out, config.hog, cfg.to_dict(config.hog.hog), o.force)


def hog_linear(source: str, out: str, config: MethodsConfig, o: TrainOptions) -> dict:
    return train_classifier("hog-linear", source, out, config.classifier, o.force)


def sift_vlad_linear(source: str, out: str, config: MethodsConfig, o: TrainOptions) -> dict:
    return train_classifier("sift-vlad-linear", source, out, config.classifier, o.force)


def cnn(source: str, out: str, config: MethodsConfig, o: TrainOptions) -> dict:
    return train_cnn(source, out, config.cnn.finetune, o.decode, o.force)


def delf(source: str, out: str, config: MethodsConfig, o: TrainOptions) -> dict:
    return train_delf(source, out, config.delf, o.decode, o.force)


def detector(source: str, out: str, config: MethodsConfig, o: TrainOptions) -> dict:
    if not o.boxes:
        raise CairnError("--method detector needs --boxes: a CSV (id,xmin,ymin,xmax,ymax or image_path,...) or "
                         "PASCAL VOC XML annotations of the manifest's images")
    return train_detector(source, o.boxes, out, config.detect, o.decode, o.force)


def train(name: str, source: str, out: str, config: MethodsConfig = MethodsConfig(), workers: int = 1,
          beam_args: list[str] | None = None, force: bool = False, decode: DecodeConfig = DecodeConfig(),
          boxes: str = "", test_pipeline: Callable | None = None) -> dict:
    """`cairn train --method NAME`: the trainer of ``name`` (a method, or delf / detector) on ``source`` (a
    features folder, or the database manifest for the trainers on images); returns the train.json record (or
    {"trained": False} when its parameters leave nothing to learn). ``test_pipeline``: a function giving a new
    test pipeline for each Beam job."""
    options = TrainOptions(workers, tuple(beam_args or ()), force, decode, boxes, test_pipeline)
    if name in methods.TRAINERS and name not in methods.METHODS:
        key = name
    else:
        methods.check([name])
        key = methods.METHODS[name].trainer
    fs.check_output_folder(out)
    if not key:
        why = methods.METHODS[name].learns_nothing or \
            f"learns nothing with `cairn train`: it uses another method's models ({name})"
        raise CairnError(f"{name} {why}; trainable: {', '.join(methods.trainable())}")
    return methods.resolve(methods.TRAINERS[key].train)(source, out, config, options)
