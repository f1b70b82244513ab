"""The embedding head (GeM pooling, projection, batch norm, L2) and the exported embedding model.

    model = build_embedding_model(BackboneConfig("resnet50"), HeadConfig(dim=512))
    model: [B, H, W, 3] float32 RGB 0..255 -> [B, dim] float32, L2-normalised

GeM (generalised mean) pooling, Radenovic et al. 2018: ``(mean(x ** p)) ** (1 / p)`` over the spatial
positions, with a learnable ``p``; p = 1 is average pooling and p -> inf approaches max pooling. ``p = 3`` is
the usual start for landmarks.

An exported model is one ``.keras`` file (Keras' own zip format, loaded with ``safe_mode=True``: no Python code
is deserialised, only the registered Cairn layers below) with Cairn's metadata added to the archive as
``cairn.json``: backbone, weights, input size, preprocessing, dimension, classes, training config.
"""

from __future__ import annotations

from dataclasses import dataclass

from features.backbones import BackboneConfig, build_backbone, channels, preprocessing
from features.keras_io import load_with_metadata, read_metadata, save_with_metadata
from pipeline import config as cfg

FORMAT = "cairn-embedding-model"
VERSION = 1
MAX_GEM_P = 16.0  # GeM exponents above this tend to max pooling and overflow float32 (x ** p of activations)


@dataclass(frozen=True)
class HeadConfig:
    """The embedding head on top of a backbone."""

    dim: int = 512  # projection dimension (0 = no projection: the GeM-pooled backbone channels)
    gem_p: float = 3.0  # initial GeM exponent
    learn_p: bool = True  # learn p while fine-tuning
    batchnorm: bool = True  # batch norm after the projection (whitens the embedding while it trains)

    def __post_init__(self):
        cfg.check_numbers(self)
        if self.dim < 0:
            raise ValueError(f"dim must be >= 0 (0 = no projection), not {self.dim}")
        if not 1 <= self.gem_p <= MAX_GEM_P:  # x ** p of activations > 1 overflows float32 for large p
            raise ValueError(f"gem_p must be between 1 (average pooling) and {MAX_GEM_P:g}, not {self.gem_p}")


def embedding_dim(backbone: BackboneConfig, head: HeadConfig) -> int:
    return head.dim or channels(backbone.name)


def build_embedding_model(backbone: BackboneConfig, head: HeadConfig):
    """Image -> L2-normalised embedding (keras.Model): preprocessing, backbone, GeM, [projection, BN], L2.
    Random initialisations follow Keras' global seed (``keras.utils.set_random_seed``, the caller's choice)."""
    import keras

    from features.layers import GeM, L2Normalize

    net = build_backbone(backbone)
    inputs = keras.Input((None, None, 3), name="image")
    x = GeM(head.gem_p, head.learn_p, name="gem")(net(inputs))
    if head.dim:
        x = keras.layers.Dense(head.dim, use_bias=not head.batchnorm, name="projection")(x)
        if head.batchnorm:
            x = keras.layers.BatchNormalization(name="projection_bn")(x)
    outputs = L2Normalize(name="l2", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="embedding")


def model_metadata(backbone: BackboneConfig, head: HeadConfig, input_size: int, **extra) -> dict:
    """What an exported embedding model says about itself (stored as cairn.json in the .keras file)."""
    return {"format": FORMAT, "version": VERSION, "backbone": cfg.to_dict(backbone), "head": cfg.to_dict(head),
            "input_size": int(input_size), "preprocessing": preprocessing(backbone.name), "input": "RGB 0..255",
            "dim": embedding_dim(backbone, head), **extra}


def save_embedding_model(model, path: str, metadata: dict) -> None:
    """Write ``model`` to ``path`` (.keras) with ``metadata`` inside the archive; atomically (temp + rename)."""
    save_with_metadata(model, path, metadata, "an embedding model")


_HINT = "export one with `cairn train --method cnn`"


def read_model_metadata(path: str) -> dict:
    """The cairn.json of an exported model; raises ValueError if the file is not one."""
    return read_metadata(path, FORMAT, VERSION, "a Cairn embedding model", _HINT)


def load_embedding_model(path: str):
    """(keras.Model, metadata) of an exported model, loaded in Keras' safe mode (no arbitrary code)."""
    return load_with_metadata(path, FORMAT, VERSION, "a Cairn embedding model", _HINT)
