"""DELF: attentive deep local features (Noh et al., "Large-Scale Image Retrieval with Attentive Deep Local
Features", ICCV 2017), batched.

The model (trained by models/delf.py, exported as one ``.keras`` file with ``cairn.json`` inside):

    image [B, H, W, 3] float32 RGB 0..255 -> Preprocess -> backbone up to an intermediate block (stride 16:
    ResNet50's conv4, 1024-d, as in the paper; MobileNet v1's conv_pw_11, 512-d) -> features F [B, h, w, C]
    F -> 1x1 conv to 512 -> batch norm -> ReLU -> 1x1 conv to 1 -> softplus -> attention A [B, h, w, 1]

Extraction (:class:`DelfExtractor`): an image pyramid (``scales``; the paper uses 0.25 to 2 in sqrt(2) steps),
every feature-map cell a keypoint at the centre of its receptive field (:func:`receptive_field`, computed from the
backbone's layers), the cells of all scales pooled and the top ``max_features`` kept by attention score above
``score_threshold`` (:func:`select_top`), descriptors L2-normalised, projected by a PCA learned on database
features (40-d in the paper; features/pca.py, no whitening) and L2-normalised again. Output: the local-features
Parquet schema (pipeline/schemas.py), keypoints in decoded-image pixels, ``scales`` the receptive field's
diameter in those pixels, ``scores`` the attention, descriptors float32 [N, 40].

Batching: the Beam job hands :meth:`DelfExtractor.extract_batch` a list of prepared images (aspect kept, long side
``max_side`` x the largest scale); images of the same shape run through the model together, scale by scale, which
is every image of a corpus of same-sized photos. The official code runs one image and one scale at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features import artifacts
from features.backbones import build_backbone
from features.base import check_scales, check_side, l2_normalize
from features.cnn import file_sha256, placement
from features.keras_io import load_with_metadata, save_with_metadata
from features.local import LocalFeatures
from features.pca import PCAWhitening
from pipeline import config as cfg
from pipeline.schemas import local_features_schema

FORMAT = "cairn-delf-model"
VERSION = 1
# the stride-16 block of each backbone whose dense features DELF uses (ResNet50's conv4 in the paper)
DEFAULT_LAYERS = {"resnet50": "conv4_block6_out", "mobilenet": "conv_pw_11_relu",
                  "mobilenet_v2": "block_13_expand_relu", "efficientnet_b0": "block6a_expand_activation"}


# ---------------------------------------------------------------------------------------------------------------
# Receptive fields


@dataclass(frozen=True)
class ReceptiveField:
    """Where the cells of a feature map look, along one axis: cell x is centred on input pixel
    ``start + x * stride`` (pixel centres at integer coordinates) and sees ``size`` pixels."""

    size: float  # receptive field side in input pixels
    stride: float  # input pixels between neighbouring cells
    start: float  # input coordinate of the centre of cell 0 (negative: it reaches into the padding)

    def centres(self, n: int) -> np.ndarray:
        """[n] float32 input coordinates of the centres of cells 0..n-1."""
        return (self.start + self.stride * np.arange(n)).astype(np.float32)


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def _step(rf: tuple[ReceptiveField, ReceptiveField], kind: str, cfg: dict):
    """The receptive field after one layer (per axis), or None when the layer pools globally."""
    if kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten", "Dense"):
        return None
    if kind == "ZeroPadding2D":
        pad = cfg["padding"]
        before = (int(pad[0][0]), int(pad[1][0])) if isinstance(pad[0], (list, tuple)) else _pair(pad)
        return tuple(ReceptiveField(r.size, r.stride, r.start - b * r.stride) for r, b in zip(rf, before, strict=True))
    if kind in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MaxPooling2D", "AveragePooling2D"):
        kernel = _pair(cfg.get("kernel_size") or cfg.get("pool_size"))
        strides = _pair(cfg.get("strides") or kernel)
        dilation = _pair(cfg.get("dilation_rate", 1))
        out = []
        for r, k, s, d in zip(rf, kernel, strides, dilation, strict=True):
            k_eff = d * (k - 1) + 1
            # TF "same" padding on an input divisible by the stride puts floor(total / 2) before
            before = max(k_eff - s, 0) // 2 if cfg.get("padding") == "same" else 0
            out.append(ReceptiveField(r.size + (k_eff - 1) * r.stride, r.stride * s,
                                      r.start + ((k_eff - 1) / 2 - before) * r.stride))
        return tuple(out)
    if kind in ("UpSampling2D", "Cropping2D", "Conv2DTranspose", "Resizing", "Functional", "Sequential", "Model"):
        raise ValueError(f"receptive_field: a {kind} layer is not supported (nor a nested model); choose a block of "
                         "a plain convolutional backbone")
    return rf  # element-wise layers (batch norm, activations, rescaling, add, multiply, ...)


def _inputs_of(node) -> list[str]:
    """Names of the layers whose outputs a Keras 3 functional-config inbound node reads."""
    found = []
    if isinstance(node, dict):
        history = node.get("config", {}).get("keras_history") if node.get("class_name") == "__keras_tensor__" \
            else None
        if history:
            found.append(history[0])
        else:
            for v in node.values():
                found += _inputs_of(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            found += _inputs_of(v)
    return found


def receptive_field(model, layer: str) -> tuple[ReceptiveField, ReceptiveField]:
    """(y, x) receptive fields of ``layer``'s output cells in ``model``'s input pixels, from the layers' kernels,
    strides, dilations and paddings (a functional keras.Model; where branches merge, the widest one counts,
    and a branch that pools globally, such as squeeze-and-excitation, is ignored)."""
    config = model.get_config()
    layers = {spec["name"]: spec for spec in config["layers"]}
    if layer not in layers:
        raise ValueError(f"{model.name} has no layer {layer!r}")
    memo: dict[str, tuple | None] = {}

    def walk(name: str):
        if name in memo:
            return memo[name]
        spec = layers[name]
        parents = _inputs_of(spec.get("inbound_nodes", []))
        if not parents:  # an input layer
            rf = (ReceptiveField(1.0, 1.0, 0.0),) * 2
        else:
            candidates = [r for r in (walk(p) for p in parents) if r is not None]
            rf = max(candidates, key=lambda r: r[0].size) if candidates else None
            if rf is not None:
                rf = _step(rf, spec["class_name"], spec.get("config", {}))
        memo[name] = rf
        return rf

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(layers) + 100))
    try:
        result = walk(layer)
    finally:
        sys.setrecursionlimit(limit)
    if result is None:
        raise ValueError(f"layer {layer!r} pools globally: it has no receptive field per cell")
    return result


# ---------------------------------------------------------------------------------------------------------------
# The model


def build_delf_model(backbone, layer: str = "", attention_dim: int = 512):
    """(DELF keras.Model image -> [features [B, h, w, C], attention [B, h, w, 1]], the backbone application
    model, the layer name). ``backbone`` is a features.backbones.BackboneConfig."""
    import keras

    from features.layers import Preprocess

    layer = layer or DEFAULT_LAYERS[backbone.name]
    full = build_backbone(backbone)  # Preprocess -> application; its weights loaded as configured
    app = full.layers[-1]
    preprocess = next(lyr for lyr in full.layers if isinstance(lyr, Preprocess))
    try:
        trunk_out = app.get_layer(layer).output
    except ValueError:
        raise ValueError(f"backbone {backbone.name} has no layer {layer!r}") from None
    trunk = keras.Model(app.input, trunk_out, name=f"trunk_{backbone.name}")
    image = keras.Input((None, None, 3), name="image")
    features = trunk(Preprocess(preprocess.mode, name="preprocess")(image))
    x = keras.layers.Conv2D(attention_dim, 1, name="attention_conv1")(features)
    x = keras.layers.BatchNormalization(name="attention_bn")(x)
    x = keras.layers.ReLU(name="attention_relu")(x)
    x = keras.layers.Conv2D(1, 1, name="attention_conv2")(x)
    attention = keras.layers.Activation("softplus", name="attention", dtype="float32")(x)
    features = keras.layers.Activation("linear", name="features", dtype="float32")(features)
    return keras.Model(image, [features, attention], name="delf"), app, layer


def attention_layers(model) -> list:
    """The layers of the attention module (trained in the second stage, with the backbone frozen)."""
    return [model.get_layer(n) for n in ("attention_conv1", "attention_bn", "attention_conv2")]


_HINT = "train one with `cairn train --method delf`"


def save_delf_model(model, path: str, metadata: dict) -> None:
    """Write ``model`` to ``path`` (.keras) with ``metadata`` inside the archive as cairn.json; atomically."""
    save_with_metadata(model, path, {"format": FORMAT, "version": VERSION, **metadata}, "a DELF model")


def load_delf_model(path: str):
    """(keras.Model, metadata) of an exported DELF model, loaded in Keras' safe mode."""
    return load_with_metadata(path, FORMAT, VERSION, "a Cairn DELF model", _HINT)


# ---------------------------------------------------------------------------------------------------------------
# Selection and extraction


def select_top(scores: np.ndarray, max_features: int, threshold: float = 0.0) -> np.ndarray:
    """Indices of the ``max_features`` highest ``scores`` that are >= ``threshold``, best first (ties: lower
    index first)."""
    scores = np.asarray(scores, dtype=np.float32)
    keep = np.flatnonzero(scores >= threshold)
    order = keep[np.argsort(-scores[keep], kind="stable")]
    return order[:max_features]


def resize_long_side(image: np.ndarray, side: int) -> np.ndarray:
    """[H, W, 3] uint8 -> the image resized (aspect kept, area filter when shrinking) so its long side is ``side``
    pixels, each side a multiple of 16 (the stride of the feature map, so cells align with pixels)."""
    import cv2

    h, w = image.shape[:2]
    f = side / max(h, w)
    nh, nw = (max(16, int(round(h * f / 16)) * 16), max(16, int(round(w * f / 16)) * 16))
    if (nh, nw) == (h, w):
        return image
    return cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)


def prepare_image(image: np.ndarray, max_side: int, top_scale: float) -> np.ndarray:
    """[H, W, 3] uint8 -> the image at the pyramid's largest scale: long side ``min(max_side, H or W) x top_scale``."""
    return resize_long_side(image, int(round(min(max_side, max(image.shape[:2])) * top_scale)))


@dataclass(frozen=True)
class DelfConfig:
    """DELF extraction (`cairn extract --method delf --param model=...`)."""

    model: str = ""  # an exported DELF model (.keras from `cairn train --method delf`)
    pca: str = ""  # a PCA artefact (.npz, features/pca.py) applied to the descriptors ("" = raw descriptors)
    scales: tuple[float, ...] = (0.7071, 1.0, 1.4142)  # pyramid (the paper: 0.25 .. 2.0 in sqrt(2) steps)
    max_side: int = 512  # long side of the image at scale 1.0 (aspect kept; smaller images are not enlarged)
    max_features: int = 1000  # features kept per image, by attention
    score_threshold: float = 0.0  # minimum attention score of a kept feature
    batch_size: int = 8  # images per model call (same-shaped images run together)
    device: str = "auto"  # "auto", "cpu" or "gpu" (TensorFlow placement)

    def __post_init__(self):
        cfg.check_numbers(self)
        check_scales(self.scales)
        check_side("max_side", self.max_side, 32)
        if self.max_side < 32 or self.max_features < 1 or self.batch_size < 1:
            raise ValueError("max_side must be >= 32, max_features and batch_size >= 1")


class DelfExtractor:
    """Images -> DELF local features. ``batched``: the Beam job batches prepared images through
    :meth:`extract_batch` (RunInference) instead of calling :meth:`extract` per image."""

    name = "delf"
    kind = "local"
    batched = True

    def __init__(self, config: DelfConfig, threads: int | None = None):
        if not config.model:
            raise ValueError("delf needs a model (--param model=...): a .keras file from `cairn train --method delf`")

        self.config = config
        self._place = placement(config.device)
        with self._place():
            self.model, self.meta = load_delf_model(config.model)
        self.rf = tuple(ReceptiveField(**r) for r in self.meta["receptive_field"])
        self.pca = None
        if config.pca:
            self.pca = PCAWhitening.load(config.pca)
        self.dim = self.pca.dim_out if self.pca is not None else int(self.meta["dim"])
        self.model_sha256 = file_sha256(config.model)
        self.pca_sha256 = file_sha256(config.pca) if config.pca else None

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """[H, W, 3] uint8 -> the image at the largest scale (aspect kept; scale 1.0 has the long side
        ``min(max_side, long side)``); the smaller scales are reductions of it."""
        return prepare_image(image, self.config.max_side, max(self.config.scales))

    def prepare_function(self):
        """:meth:`prepare` as a picklable function (for the Beam job's decode step)."""
        import functools

        return functools.partial(prepare_image, max_side=self.config.max_side, top_scale=max(self.config.scales))

    def _dense(self, xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._place():
            feats, att = self.model.predict_on_batch(xb.astype(np.float32))
        return np.asarray(feats, np.float32), np.asarray(att, np.float32)[..., 0]

    def extract_batch(self, images: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[LocalFeatures]:
        """Prepared images and their decoded (width, height) -> one LocalFeatures each (keypoints in decoded-image
        pixels). Images of one shape go through the model together, ``batch_size`` at a time, scale by scale."""
        import cv2

        top = max(self.config.scales)
        parts: list[list[tuple]] = [[] for _ in images]
        groups: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(img.shape, []).append(i)
        for shape, members in groups.items():
            h, w = shape[:2]
            for scale in self.config.scales:
                f = scale / top
                sh, sw = max(16, int(round(h * f / 16)) * 16), max(16, int(round(w * f / 16)) * 16)
                for start in range(0, len(members), self.config.batch_size):
                    chunk = members[start:start + self.config.batch_size]
                    xb = np.stack([images[i] if (sh, sw) == (h, w) else
                                   cv2.resize(images[i], (sw, sh), interpolation=cv2.INTER_AREA) for i in chunk])
                    feats, att = self._dense(xb)
                    gh, gw = att.shape[1:3]
                    cy, cx = self.rf[0].centres(gh), self.rf[1].centres(gw)
                    yy, xx = np.meshgrid(cy, cx, indexing="ij")
                    for k, i in enumerate(chunk):
                        width, height = sizes[i]
                        fx, fy = width / sw, height / sh  # scaled-image pixels -> decoded-image pixels
                        pts = np.stack([(xx.ravel() + 0.5) * fx - 0.5, (yy.ravel() + 0.5) * fy - 0.5], axis=1)
                        parts[i].append((pts, np.full(len(pts), self.rf[1].size * fx, np.float32),
                                         att[k].ravel(), feats[k].reshape(-1, feats.shape[-1])))
        return [self._finish(p, sizes[i]) for i, p in enumerate(parts)]

    def _finish(self, parts: list[tuple], size: tuple[int, int]) -> LocalFeatures:
        pts = np.concatenate([p[0] for p in parts]).astype(np.float32)
        region = np.concatenate([p[1] for p in parts])
        scores = np.concatenate([p[2] for p in parts])
        desc = np.concatenate([p[3] for p in parts])
        keep = select_top(scores, self.config.max_features, self.config.score_threshold)
        desc = l2_normalize(desc[keep])
        if self.pca is not None:
            desc = self.pca.transform(desc) if len(desc) else np.zeros((0, self.dim), np.float32)
        return LocalFeatures(pts[keep], region[keep], np.zeros(len(keep), np.float32), scores[keep],
                             np.ascontiguousarray(desc, np.float32), int(size[0]), int(size[1]))

    def extract(self, image: np.ndarray) -> LocalFeatures:
        """One decoded image -> its LocalFeatures (one image at a time, as the official code runs)."""
        h, w = image.shape[:2]
        return self.extract_batch([self.prepare(image)], [(w, h)])[0]

    def schema(self):
        return local_features_schema(self.dim, "float32", self.metadata())

    def metadata(self) -> dict:
        return {"method": self.name, "dim": self.dim, "config": cfg.to_dict(self.config),
                "model": {k: v for k, v in self.meta.items() if k != "history"}, "model_sha256": self.model_sha256,
                "pca_sha256": self.pca_sha256, "postprocess": "none"}


# ---------------------------------------------------------------------------------------------------------------
# A global descriptor from DELF features (the delf+sv method's candidate search)

POOL_KIND = "attention_pool"


class AttentionPooling:
    """DELF features of an image -> one global vector: the attention-weighted sum of its (PCA-projected,
    L2-normalised) descriptors, L2-normalised; the aggregation DELF's attention was trained with. Nothing is
    learned (``fit`` records the dimension), so it follows scikit-learn's contract trivially."""

    weighted = True  # transform takes the attention scores too (pipeline/stages/encoding.py passes them)

    def __init__(self, dim: int = 0):
        self.dim = dim

    def get_params(self) -> dict:
        return {"dim": self.dim}

    @property
    def dim_out(self) -> int:
        return self.dim

    def fit(self, descriptor_sets=None, y=None) -> AttentionPooling:
        return self

    def transform(self, descriptor_sets, weights=None) -> np.ndarray:
        """[N_i, dim] descriptor sets (and [N_i] attention scores) -> [len, dim] float32, L2-normalised; an image
        without features gives a zero vector."""
        out = np.zeros((len(descriptor_sets), self.dim), np.float32)
        for i, desc in enumerate(descriptor_sets):
            desc = np.asarray(desc, np.float32).reshape(-1, self.dim)
            if len(desc):
                w = np.ones(len(desc), np.float32) if weights is None else np.asarray(weights[i], np.float32)
                out[i] = w @ desc
        return l2_normalize(out)

    def save(self, path: str) -> None:
        artifacts.save(path, POOL_KIND, {}, {"dim": self.dim}, {})

    @classmethod
    def load(cls, path: str) -> AttentionPooling:
        _, header = artifacts.load(path, POOL_KIND)
        return cls(int(header["config"]["dim"]))
