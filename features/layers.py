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

from features.preprocessing import preprocess_affine


@keras.saving.register_keras_serializable(package="cairn")
class Preprocess(keras.layers.Layer):
    """RGB in 0..255 -> the input range a backbone was trained with (keras.applications' modes, defined once in
    features/preprocessing.preprocess_affine)."""

    def __init__(self, mode: str = "tf", **kwargs):
        super().__init__(**kwargs)
        self.bgr, self.scale, self.offset = preprocess_affine(mode)  # raises on an unknown mode
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.bgr:
            x = ops.flip(x, axis=-1)
        if self.mode == "none":
            return x
        return x * ops.convert_to_tensor(self.scale, self.compute_dtype) + ops.convert_to_tensor(
            self.offset, self.compute_dtype)

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
