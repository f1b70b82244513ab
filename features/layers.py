"""Cairn's Keras layers, registered for safe-mode loading of exported models (no Lambda layers, no code).

    Preprocess   RGB 0..255 -> a backbone's input range (keras.applications' modes)
    GeM          [B, h, w, C] -> [B, C] generalised-mean pooling with a learnable p
    L2Normalize  [B, D] -> [B, D] unit rows, in float32

This module imports Keras; the config modules (features/backbones.py, features/embedding.py) do not at import
time, so that the command line starts without loading TensorFlow.
"""

from __future__ import annotations

import keras
from keras import ops

PREPROCESSING = ("tf", "caffe", "torch", "none")  # the modes keras.applications uses


@keras.saving.register_keras_serializable(package="cairn")
class Preprocess(keras.layers.Layer):
    """RGB in 0..255 -> the input range a backbone was trained with (keras.applications' modes):
    ``tf``: [-1, 1]; ``caffe``: BGR minus the ImageNet mean; ``torch``: [0, 1] standardised; ``none``: as is."""

    MEAN = (123.68, 116.779, 103.939)  # ImageNet RGB mean, 0..255
    TORCH_MEAN = (0.485, 0.456, 0.406)  # keras.applications' "torch" mode, on 0..1
    STD = (0.229, 0.224, 0.225)

    def __init__(self, mode: str = "tf", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING:
            raise ValueError(f"preprocessing mode must be one of {PREPROCESSING}, not {mode!r}")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(self.MEAN[::-1], dtype=self.compute_dtype)
        if self.mode == "torch":
            mean = ops.convert_to_tensor(self.TORCH_MEAN, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / ops.convert_to_tensor(self.STD, dtype=self.compute_dtype)
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="cairn")
class GeM(keras.layers.Layer):
    """[B, h, w, C] -> [B, C] generalised-mean pooling with a learnable (or fixed) exponent p."""

    def __init__(self, p: float = 3.0, trainable_p: bool = True, eps: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.p_init = float(p)
        self.trainable_p = bool(trainable_p)
        self.eps = float(eps)

    def build(self, input_shape):
        self.p = self.add_weight(name="p", shape=(), initializer=keras.initializers.Constant(self.p_init),
                                 trainable=self.trainable_p, dtype="float32")

    def call(self, x):
        x = ops.maximum(ops.cast(x, "float32"), self.eps)  # GeM needs positive inputs; float32 under mixed precision
        p = ops.maximum(self.p, 1.0)  # p below 1 is not a mean any more
        # scaled by the channel maximum so that x ** p cannot overflow (5.0 ** 60 already does in float32):
        # GeM(x) = m * mean((x / m) ** p) ** (1 / p), with every x / m in (0, 1]
        m = ops.max(x, axis=(1, 2), keepdims=True)
        return ops.squeeze(m, axis=(1, 2)) * ops.power(ops.mean(ops.power(x / m, p), axis=(1, 2)), 1.0 / p)

    def get_config(self):
        return {**super().get_config(), "p": self.p_init, "trainable_p": self.trainable_p, "eps": self.eps}


@keras.saving.register_keras_serializable(package="cairn")
class L2Normalize(keras.layers.Layer):
    """[B, D] -> [B, D] rows scaled to unit L2 norm (zero rows stay zero), in float32."""

    def call(self, x):
        x = ops.cast(x, "float32")
        return x / ops.maximum(ops.sqrt(ops.sum(x * x, axis=-1, keepdims=True)), 1e-12)
