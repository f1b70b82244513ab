"""CNN global embeddings: one extractor for every kind of model file, batched, with multi-scale TTA.

    extractor = CnnExtractor(CnnConfig(model="runs/x/work/cnn/model/model.keras"))
    xb = np.stack([extractor.prepare(image) for image in images])   # [B, S, S, 3] uint8
    extractor.embed(xb)                                               # [B, dim] float32, L2-normalised

``model`` is one of:
  - a ``.keras`` file exported by `cairn train --method cnn` (features/embedding.py; loaded in safe mode);
  - a ``.tflite`` file (features/frozen.py), e.g. ../shared/weights/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite;
  - a TensorFlow SavedModel folder with a serving signature from images to vectors;
  - ``keras:<backbone>``: a keras.applications backbone with ImageNet weights (Keras downloads and caches them:
    needs the network once) and GeM pooling, no training.

Every image is resized whole to S x S (S = the model's input size unless ``input_size`` is given): no crop,
so nothing of the landmark is cut off. With ``scales`` such as (0.707, 1, 1.414) each image is embedded at
S x scale for every scale (all resized from one preparation at the largest scale) and the L2-normalised
embeddings are averaged (multi-scale test-time augmentation; needs a model that takes any input size, i.e. not
TFLite).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass

import cv2
import numpy as np

from features.backbones import BackboneConfig
from features.base import check_scales, check_side, l2_normalize
from features.embedding import HeadConfig, build_embedding_model, load_embedding_model, model_metadata
from features.frozen import SavedModelEmbedder, TFLiteEmbedder
from features.preprocessing import PREPROCESSING
from pipeline import config as cfg
from pipeline.fs import local_path


@dataclass(frozen=True)
class CnnConfig:
    """A CNN embedding extractor."""

    model: str = ""  # a .keras export, a .tflite file, a SavedModel folder, or keras:<backbone> (ImageNet, downloads)
    input_size: int = 0  # square input side in pixels (0 = the model's own)
    scales: tuple[float, ...] = (1.0,)  # test-time scales; embeddings are averaged over them
    batch_size: int = 32  # images per inference call
    preprocessing: str = "tf"  # for float TFLite/SavedModel inputs: tf, caffe, torch or none
    device: str = "auto"  # Keras/SavedModel inference on: auto (a GPU when TensorFlow sees one), cpu, or gpu

    def __post_init__(self):
        cfg.check_numbers(self)
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        check_scales(self.scales)
        if self.input_size:  # 0 = the model's own
            check_side("input_size", self.input_size, 32)
        if self.input_size < 0 or self.batch_size < 1:
            raise ValueError("input_size must be >= 0 and batch_size >= 1")
        if self.preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING}, not {self.preprocessing!r}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu, not {self.device!r}")


def file_sha256(path: str) -> str:
    """sha256 of a model file, or of every file of a SavedModel folder (names and bytes, in sorted order)."""
    h = hashlib.sha256()
    path = local_path(path)  # a model on gs:// etc.: downloaded once per process
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                h.update(os.path.relpath(full, path).encode() + b"\0")
                with open(full, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
    else:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def resize_square(image: np.ndarray, side: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [side, side, 3] uint8, the whole image (aspect not kept); area filter when shrinking."""
    h, w = image.shape[:2]
    if (h, w) == (side, side):
        return image
    interp = cv2.INTER_AREA if h * w > side * side else cv2.INTER_LINEAR
    return cv2.resize(image, (side, side), interpolation=interp)


class KerasEmbedder:
    """An exported Cairn embedding model (.keras) or a keras:<backbone> ImageNet model; any input size."""

    def __init__(self, path: str):
        import tensorflow as tf

        if path.startswith("keras:"):
            backbone, head = BackboneConfig(path.split(":", 1)[1], weights="imagenet"), HeadConfig(dim=0)
            self.model = build_embedding_model(backbone, head)
            self.info = model_metadata(backbone, head, 224)
        else:
            self.model, self.info = load_embedding_model(path)
        self.input_size = int(self.info["input_size"])
        self.dim = int(self.info["dim"])
        self._call = tf.function(lambda x: self.model(x, training=False), reduce_retracing=True)

    def embed(self, xb: np.ndarray) -> np.ndarray:
        return np.asarray(self._call(xb.astype(np.float32)), dtype=np.float32)

    def metadata(self) -> dict:
        return {"format": "keras", **{k: v for k, v in self.info.items() if k not in ("format", "version")}}


def placement(device: str):
    """A no-argument context-manager factory placing TensorFlow ops on ``device`` ("auto", "cpu", "gpu"): "auto"
    places nothing (TensorFlow uses its first GPU when it sees one); "gpu" without a visible GPU is an error
    rather than a silent fall back."""
    if device == "auto":
        return contextlib.nullcontext
    import tensorflow as tf

    if device == "gpu" and not tf.config.list_physical_devices("GPU"):
        raise ValueError("device=gpu, but TensorFlow sees no GPU (install with `make setup GPU=1`, or use "
                         "device=auto to fall back to the CPU)")
    name = "/GPU:0" if device == "gpu" else "/CPU:0"
    return lambda: tf.device(name)


def load_embedder(config: CnnConfig, threads: int | None = None):
    """The embedder for ``config.model`` (by file type)."""
    model = config.model
    if model.startswith("keras:"):
        return KerasEmbedder(model)

    model = local_path(model)  # a model on gs:// etc.: downloaded once per worker process
    if not os.path.exists(model):
        raise FileNotFoundError(f"CNN model not found: {model}")
    if model.endswith(".keras"):
        return KerasEmbedder(model)

    if model.endswith(".tflite"):
        return TFLiteEmbedder(model, config.preprocessing, threads)
    if os.path.isdir(model) and os.path.exists(os.path.join(model, "saved_model.pb")):
        return SavedModelEmbedder(model, config.input_size or 224, config.preprocessing)
    raise ValueError(f"{model}: not a .keras, .tflite or SavedModel folder")


class CnnExtractor:
    """Images -> CNN embeddings (global descriptors). ``batched``: the Beam job batches prepared images for
    ``embed`` through RunInference instead of calling ``extract`` per image."""

    name = "cnn"
    kind = "global"
    batched = True

    def __init__(self, config: CnnConfig, threads: int | None = None):
        if not config.model:
            raise ValueError("cnn needs a model (--param model=...): a .keras file from `cairn train --method cnn`, "
                             "a .tflite file, a SavedModel folder or keras:<backbone>")
        self.config = config
        # Keras/SavedModel inference on config.device (TFLite runs on the CPU whatever the device)
        self._place = contextlib.nullcontext if config.model.endswith(".tflite") else placement(config.device)
        with self._place():
            self.embedder = load_embedder(config, threads)
        self.size = config.input_size or self.embedder.input_size
        fixed = not isinstance(self.embedder, KerasEmbedder)
        if fixed and (self.size != self.embedder.input_size or self.config.scales != (1.0,)):
            raise ValueError(f"{config.model} takes only {self.embedder.input_size}x{self.embedder.input_size} "
                             "images: leave input_size at 0 and scales at (1.0,)")
        self.dim = self.embedder.dim
        self.model_sha256 = None if config.model.startswith("keras:") else file_sha256(config.model)
        # images are prepared at the largest scale, so that every scale is a reduction of the original image
        # (an upscaled S x S image would add pixels, not detail)
        self.sides = [max(32, round(self.size * s)) for s in self.config.scales]
        self.prepare_size = max(self.sides)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """[H, W, 3] uint8 RGB -> [P, P, 3] uint8, the whole image resized (area filter when shrinking), where P
        is the input size times the largest scale (``prepare_size``)."""
        return resize_square(image, self.prepare_size)

    def embed(self, xb: np.ndarray) -> np.ndarray:
        """[B, P, P, 3] uint8 prepared images -> [B, dim] float32, L2-normalised (averaged over the scales)."""
        total = None
        for side in self.sides:
            x = xb if side == xb.shape[1] else np.stack([resize_square(img, side) for img in xb])
            with self._place():
                e = l2_normalize(self.embedder.embed(x))
            total = e if total is None else total + e
        return l2_normalize(total)

    def extract(self, image: np.ndarray) -> np.ndarray:
        """One image -> [dim] float32 (the GlobalExtractor contract; the Beam job batches instead)."""
        return self.embed(self.prepare(image)[None])[0]

    def metadata(self) -> dict:
        return {"method": self.name, "dim": self.dim, "config": cfg.to_dict(self.config), "input_size": self.size,
                "model": self.embedder.metadata(), "model_sha256": self.model_sha256}
