"""Grad-CAM (Selvaraju et al., ICCV 2017) for Cairn's embedding models: which image regions drove a decision.

A kNN recogniser has no class logit, so the score explained is the one the decision rests on: the cosine
similarity between the query's embedding and the mean embedding of the predicted landmark's database images
(the class centroid, L2-normalised). Grad-CAM weights each channel of the backbone's last feature map by the
spatial mean of that score's gradient, sums the weighted channels, keeps the positive part and scales it to
[0, 1]: bright regions are those that made the query look like the predicted landmark.

    cams = grad_cam(model, images, targets)   # [B, S, S, 3] float32 RGB 0..255, [B, D] -> [B, h, w] in [0, 1]

``model`` is an exported embedding model (features/embedding.py: image -> backbone_* -> GeM -> [projection, BN]
-> L2); the layers after the backbone are applied one after the other, which is checked against the model's own
output.
"""

from __future__ import annotations

import numpy as np


def split_model(model):
    """(backbone layer, [head layers in order]) of an embedding model; ValueError if it is not one."""
    names = [layer.name for layer in model.layers]
    starts = [i for i, n in enumerate(names) if n.startswith("backbone_")]
    if not starts:
        raise ValueError(f"not a Cairn embedding model (no backbone_* layer among {names})")
    i = starts[0]
    return model.layers[i], model.layers[i + 1:]


def grad_cam(model, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """[B, S, S, 3] float32 RGB 0..255 and [B, D] target directions -> [B, h, w] float32 maps in [0, 1]
    (h, w: the backbone's output grid). A map that is zero everywhere (no positive evidence) stays zero."""
    import tensorflow as tf

    backbone, head = split_model(model)
    x = tf.convert_to_tensor(images, tf.float32)
    t = tf.convert_to_tensor(targets / np.maximum(np.linalg.norm(targets, axis=1, keepdims=True), 1e-12),
                             tf.float32)
    fmap = backbone(x, training=False)
    with tf.GradientTape() as tape:
        tape.watch(fmap)
        y = fmap
        for layer in head:
            y = layer(y, training=False)
        score = tf.reduce_sum(tf.cast(y, tf.float32) * t, axis=1)
    expected = model(x, training=False)
    if not np.allclose(np.asarray(y), np.asarray(expected), atol=1e-4):
        raise ValueError("the model's head is not a plain chain of layers after its backbone; Grad-CAM cannot "
                         "split it")
    grads = tape.gradient(score, fmap)  # [B, h, w, C]
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * fmap, axis=-1)).numpy().astype(np.float32)
    top = cam.reshape(len(cam), -1).max(axis=1)
    return np.where(top[:, None, None] > 0, cam / np.maximum(top, 1e-12)[:, None, None], 0.0).astype(np.float32)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """[H, W, 3] uint8 RGB with the [h, w] map upsampled (bilinear) and drawn over it in the 'jet' colours."""
    import cv2
    from matplotlib import colormaps

    h, w = image.shape[:2]
    heat = cv2.resize(cam.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    colours = (colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255).astype(np.float32)
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * colours, 0, 255).astype(np.uint8)
