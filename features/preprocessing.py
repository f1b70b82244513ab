"""The input normalisations of CNN backbones (the modes keras.applications uses), in numpy.

One definition for the Keras preprocessing layer (features/layers.py), the frozen TFLite/SavedModel extractors
(features/frozen.py) and the backbones (features/backbones.py).
"""

from __future__ import annotations

import numpy as np

PREPROCESSING = ("tf", "caffe", "torch", "none")  # the modes keras.applications uses
IMAGENET_MEAN = (123.68, 116.779, 103.939)  # RGB, 0..255
IMAGENET_STD = (58.395, 57.12, 57.375)  # RGB, 0..255 (0.229, 0.224, 0.225 on 0..1)


def preprocess_affine(mode: str) -> tuple[bool, np.ndarray, np.ndarray]:
    """(reverse channels to BGR, [3] scale, [3] offset) with which a mode maps RGB 0..255 to a backbone's input:
    ``x' = x[..., ::-1 if bgr] * scale + offset``. ``tf``: [-1, 1]; ``caffe``: BGR minus the ImageNet mean;
    ``torch``: standardised by the ImageNet mean and std; ``none``: as is. The one definition of the modes, used by
    the Keras layer (features/layers.py) and by the frozen extractors (features/frozen.py)."""
    if mode not in PREPROCESSING:
        raise ValueError(f"preprocessing mode must be one of {PREPROCESSING}, not {mode!r}")
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    if mode == "tf":
        return False, np.full(3, 1 / 127.5, np.float32), np.full(3, -1.0, np.float32)
    if mode == "caffe":
        return True, np.ones(3, np.float32), -mean[::-1].copy()
    if mode == "torch":
        return False, 1 / std, -mean / std
    return False, np.ones(3, np.float32), np.zeros(3, np.float32)


def preprocess(x: np.ndarray, mode: str) -> np.ndarray:
    """[..., 3] RGB 0..255 -> float32 in ``mode``'s input range (numpy; see :func:`preprocess_affine`)."""
    bgr, scale, offset = preprocess_affine(mode)
    x = np.asarray(x, np.float32)
    return (x[..., ::-1] if bgr else x) * scale + offset
