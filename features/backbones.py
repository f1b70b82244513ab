"""CNN backbones: one factory for Keras applications, each with its own preprocessing.

    build_backbone(BackboneConfig("resnet50", weights="imagenet"))   -> a fully convolutional keras.Model
    [B, H, W, 3] float32 RGB in 0..255 (preprocessing included) -> [B, h, w, C] feature map

``weights`` is ``"none"`` (random initialisation), ``"imagenet"`` (Keras' own download and cache, for users who
are online), or a local file: a Keras ``.weights.h5`` of the same architecture, or for ``mobilenet`` the
quantised TFLite MobileNet v1 the project ships with (`../shared/weights/...tflite`), whose weights are
dequantised into the Keras layers (:func:`mobilenet_v1_from_tflite`). That gives an ImageNet-pretrained
backbone with no network at all.

The preprocessing is a layer of the model (:class:`Preprocess`), so a saved model takes plain RGB pixels and
cannot be fed the wrong normalisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from features.frozen import tflite_interpreter
from pipeline.errors import CairnError
from pipeline.fs import local_path

# name -> (keras.applications constructor name, preprocessing mode, feature channels, builder kwargs)
BACKBONES = {
    "resnet50": ("ResNet50", "caffe", 2048, {}),
    "mobilenet": ("MobileNet", "tf", 1024, {}),  # MobileNet v1 (alpha 1.0)
    "mobilenet_v2": ("MobileNetV2", "tf", 1280, {}),
    "efficientnet_b0": ("EfficientNetB0", "none", 1280, {}),  # rescales and normalises inside the model
}


@dataclass(frozen=True)
class BackboneConfig:
    """A CNN backbone (keras.applications) and where its weights come from."""

    name: str = "mobilenet_v2"  # resnet50, mobilenet, mobilenet_v2 or efficientnet_b0
    weights: str = "none"  # "none", "imagenet" (downloads), a .weights.h5 file, or a .tflite file (mobilenet)
    freeze_batchnorm: str = "auto"  # fix batch-norm statistics while fine-tuning: auto (with pretrained weights), on, off

    def __post_init__(self):
        if self.name not in BACKBONES:
            raise ValueError(f"unknown backbone {self.name!r}; known: {', '.join(BACKBONES)}")
        if self.weights not in ("none", "imagenet") and not self.weights.endswith((".h5", ".tflite")):
            raise ValueError(f"weights must be 'none', 'imagenet', a .weights.h5 file or a .tflite file, "
                             f"not {self.weights!r}")
        if self.weights.endswith(".tflite") and self.name != "mobilenet":
            raise ValueError("TFLite weights can only initialise the 'mobilenet' (v1) backbone")
        if self.freeze_batchnorm not in ("auto", "on", "off"):
            raise ValueError(f"freeze_batchnorm must be auto, on or off, not {self.freeze_batchnorm!r}")

    @property
    def frozen_batchnorm(self) -> bool:
        """Whether batch norm keeps its statistics: pretrained statistics are worth keeping with the small
        batches of fine-tuning; a network trained from scratch must learn its own (its initial statistics,
        mean 0 and variance 1, let the activations of a deep network shrink towards zero)."""
        if self.freeze_batchnorm == "auto":
            return self.weights != "none"
        return self.freeze_batchnorm == "on"


def channels(name: str) -> int:
    """Feature channels of a backbone's last block (the GeM-pooled dimension)."""
    return BACKBONES[name][2]


def preprocessing(name: str) -> str:
    return BACKBONES[name][1]


def build_backbone(config: BackboneConfig):
    """[B, H, W, 3] float32 RGB 0..255 -> [B, h, w, C] feature map, with any input size (fully convolutional)."""
    import keras

    from features.layers import Preprocess

    constructor, mode, _, kwargs = BACKBONES[config.name]
    app = getattr(keras.applications, constructor)
    weights = config.weights
    if weights not in ("none", "imagenet"):
        weights = local_path(weights)  # weights on gs:// etc.: downloaded once per process
    if weights not in ("none", "imagenet") and not os.path.exists(weights):
        raise FileNotFoundError(f"backbone weights file not found: {weights}")
    if weights == "imagenet":
        try:
            net = app(include_top=False, weights="imagenet", input_shape=(None, None, 3), **kwargs)
        except Exception as e:  # noqa: BLE001 - Keras raises a bare Exception when the download fails
            raise CairnError(
                f"could not get the ImageNet weights of {config.name} (Keras downloads them once into "
                f"~/.keras/models): {e}. Offline, give a local weights file instead (weights=FILE.weights.h5, or "
                "for mobilenet the TFLite MobileNet v1)") from None
    else:
        net = app(include_top=False, weights=None, input_shape=(None, None, 3), **kwargs)
    if weights.endswith(".h5"):
        net.load_weights(weights)
    elif weights.endswith(".tflite"):
        load_mobilenet_v1_tflite(net, weights)
    if config.frozen_batchnorm:
        for layer in net.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False  # Keras then runs it in inference mode, also while training
    inputs = keras.Input((None, None, 3), name="image")
    features = net(Preprocess(mode, name="preprocess")(inputs))
    return keras.Model(inputs, features, name=f"backbone_{config.name}")


# ---------------------------------------------------------------------------------------------------------------
# ImageNet weights without a download: MobileNet v1 from a quantised TFLite file


def tflite_mobilenet_v1_weights(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Dequantised (kernel, bias) per block of a TF-slim MobileNet v1 TFLite file, keyed by Keras layer name.

    The TFLite graph has batch norm folded into each convolution's weights and bias; kernels are uint8 with a
    scale and zero point, biases int32 with a scale. Kernels come back in Keras' layout: Conv2D
    [kh, kw, in, out], DepthwiseConv2D [kh, kw, C, 1].
    """
    interpreter = tflite_interpreter(path)
    tensors = {t["name"]: t for t in interpreter.get_tensor_details()}

    def value(detail):
        q = detail["quantization_parameters"]
        raw = interpreter.get_tensor(detail["index"]).astype(np.float32)
        scale, zero = q["scales"], q["zero_points"]
        if len(scale) == 0:
            return raw
        axis = q["quantized_dimension"]
        shape = [1] * raw.ndim
        shape[axis] = -1
        return (raw - zero.reshape(shape).astype(np.float32)) * scale.reshape(shape).astype(np.float32)

    blocks = {"conv1": "Conv2d_0"}
    for i in range(1, 14):
        blocks[f"conv_dw_{i}"] = f"Conv2d_{i}_depthwise"
        blocks[f"conv_pw_{i}"] = f"Conv2d_{i}_pointwise"
    out = {}
    for keras_name, slim in blocks.items():
        prefix = f"MobilenetV1/MobilenetV1/{slim}/"
        kernel = [t for n, t in tensors.items() if n.startswith(prefix) and "weights_quant" in n
                  and n.split(";")[0].startswith(prefix)]
        bias = tensors.get(prefix + "BatchNorm_Fold/bias")
        if len(kernel) != 1 or bias is None:
            raise ValueError(f"{path} is not a TF-slim MobileNet v1 (no weights for {slim})")
        # Conv2D TFLite [out, kh, kw, in] -> [kh, kw, in, out]; depthwise [1, kh, kw, C] -> [kh, kw, C, 1]
        out[keras_name] = (value(kernel[0]).transpose(1, 2, 3, 0), value(bias))
    return out


def load_mobilenet_v1_tflite(net, path: str) -> None:
    """Set keras.applications.MobileNet's weights from a TF-slim MobileNet v1 TFLite file.

    Keras' MobileNet has conv (no bias) + batch norm + ReLU6 per layer; the file has batch norm folded into the
    conv, so the batch norm becomes the identity plus the folded bias: gamma 1, beta = bias, mean 0, variance
    1 - eps. Its statistics must then stay fixed (BackboneConfig.freeze_batchnorm).
    """
    weights = tflite_mobilenet_v1_weights(path)
    for name, (kernel, bias) in weights.items():
        conv = net.get_layer(name)
        bn = net.get_layer(f"{name}_bn" if name != "conv1" else "conv1_bn")
        expected = conv.get_weights()[0].shape
        if kernel.shape != expected:
            raise ValueError(f"{path}: {name} has kernel {kernel.shape}, the Keras layer {expected}")
        conv.set_weights([kernel])
        eps = bn.epsilon
        bn.set_weights([np.ones_like(bias), bias, np.zeros_like(bias), np.full_like(bias, 1.0 - eps)])
