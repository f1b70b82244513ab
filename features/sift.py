"""SIFT (Lowe 2004) local features, with RootSIFT (Arandjelovic & Zisserman 2012) for matching.

What :class:`SiftExtractor` computes for one decoded image ([H, W, 3] uint8 RGB):

* The image is converted to grey levels and, when its long side exceeds ``max_side`` (0 = never), shrunk
  with ``INTER_AREA`` so that the long side is ``max_side``; it is never enlarged. OpenCV's SIFT detects and
  describes keypoints on that image.
* At most ``max_features`` keypoints are kept: the strongest by detector response (``KeyPoint.response``),
  sorted in descending order with a stable sort. OpenCV's own ``nfeatures`` cap is also set, to skip
  describing the weak ones, but it keeps ties at the boundary, so the cut is made again here explicitly.
* Keypoints refer to the image given to ``extract`` (the decoded image), not the shrunk one:
  ``x = (x' + 0.5) * W / w - 0.5`` (pixel centres at integer coordinates, OpenCV's convention) and likewise
  for y; scales (``KeyPoint.size``, the diameter of the described region) are multiplied by the mean of the
  two factors. ``width``/``height`` are those of the decoded image.

Stored per image (a :class:`features.local.LocalFeatures`, one row of the local-features Parquet schema):

    keypoints     [N, 2] float32   (x, y) in pixels of the decoded image
    scales        [N] float32      KeyPoint.size mapped to the decoded image (pixels)
    orientations  [N] float32      KeyPoint.angle, degrees in [0, 360)
    scores        [N] float32      KeyPoint.response (descending)
    descriptors   [N, 128]         uint8 or float32, see below

``dtype="uint8"`` (the default) stores OpenCV's raw SIFT bins. OpenCV rounds and saturates them to integers in
0..255 even in its float32 output, so this is lossless and four times smaller; the file's metadata then says
``"postprocess": "rootsift"`` (when ``root``) and readers call :func:`prepare_descriptors` to get the float32
RootSIFT descriptors used for matching and encoding. ``dtype="float32"`` stores the final descriptors
(RootSIFT already applied when ``root``; ``"postprocess": "none"``).

RootSIFT: L1-normalise each descriptor, then take the elementwise square root. Each row then has unit L2 norm
and the inner product of two RootSIFT rows is the Hellinger kernel of the L1-normalised SIFT rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa

from features.local import LocalFeatures
from pipeline.config import check_numbers, to_dict
from pipeline.schemas import local_features_schema

DIM = 128  # SIFT descriptor length: 4 x 4 spatial cells x 8 orientation bins
DTYPES = ("uint8", "float32")


def rootsift(desc: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """[N, 128] float32 or uint8 SIFT -> [N, 128] float32 RootSIFT (any [..., D] works, row = last axis).

    Rows are L1-normalised, then square-rooted elementwise, so each non-zero row has unit L2 norm; zero rows
    stay zero (no NaN). SIFT is non-negative; a negative value would keep its sign (signed square root).
    """
    x = np.asarray(desc, dtype=np.float32)
    l1 = np.sum(np.abs(x), axis=-1, keepdims=True)
    x = x / np.maximum(l1, np.float32(eps))
    return (np.sign(x) * np.sqrt(np.abs(x))).astype(np.float32, copy=False)


def prepare_descriptors(descriptors: np.ndarray, metadata: dict) -> np.ndarray:
    """Stored descriptors -> [N, D] float32 descriptors to match or encode.

    ``metadata`` is the features file's ``cairn`` entry (pipeline.schemas.cairn_metadata) or an extractor's
    ``metadata()``: ``"postprocess": "rootsift"`` applies :func:`rootsift`; anything else (``"none"``, absent)
    returns the stored values as float32.
    """
    if metadata.get("postprocess") == "rootsift":
        return rootsift(descriptors)
    return np.asarray(descriptors, dtype=np.float32)


MAX_FEATURES = 100_000  # keypoints kept per image at most
MIN_SIDE = 32  # smallest long side SIFT detection is run at (max_side)
MAX_OCTAVE_LAYERS = 10  # scale layers per octave at most (Lowe: 3)


@dataclass(frozen=True)
class SiftConfig:
    """SIFT extraction parameters (see the module docstring)."""

    max_features: int = 1000  # keypoints kept per image, the strongest by detector response
    max_side: int = 640  # shrink so the long side is at most this before detection (0 = keep); never enlarges
    root: bool = True  # RootSIFT descriptors (L1-normalise, then square root)
    dtype: str = "uint8"  # "uint8": raw SIFT bins (lossless), RootSIFT on use; "float32": final descriptors
    contrast_threshold: float = 0.04  # OpenCV contrastThreshold (divided by n_octave_layers inside OpenCV)
    edge_threshold: float = 10.0  # OpenCV edgeThreshold: larger keeps more edge-like keypoints
    sigma: float = 1.6  # Gaussian sigma of the first octave
    n_octave_layers: int = 3  # scale layers per octave (3 in Lowe's paper)

    def __post_init__(self):
        check_numbers(self)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not 1 <= self.max_features <= MAX_FEATURES:  # OpenCV takes a C int; more is no image's keypoints
            raise ValueError(f"max_features must be between 1 and {MAX_FEATURES:,}, got {self.max_features}")
        if self.max_side < 0 or 0 < self.max_side < MIN_SIDE:  # a tiny image has no keypoints at all
            raise ValueError(f"max_side must be 0 (keep the decoded size) or at least {MIN_SIDE}, got {self.max_side}")
        if self.contrast_threshold < 0:
            raise ValueError(f"contrast_threshold must be >= 0, got {self.contrast_threshold}")
        if self.edge_threshold <= 0:
            raise ValueError(f"edge_threshold must be > 0, got {self.edge_threshold}")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if not 1 <= self.n_octave_layers <= MAX_OCTAVE_LAYERS:  # more layers find no keypoints, silently
            raise ValueError(f"n_octave_layers must be between 1 and {MAX_OCTAVE_LAYERS}, got {self.n_octave_layers}")


class SiftExtractor:
    """SIFT local-feature extractor (see the module docstring). Build once per worker; ``extract`` is pure."""

    name = "sift"
    kind = "local"
    dim = DIM

    def __init__(self, config: SiftConfig = SiftConfig()):
        self.config = config
        self._sift = cv2.SIFT_create(
            nfeatures=config.max_features,
            nOctaveLayers=config.n_octave_layers,
            contrastThreshold=config.contrast_threshold,
            edgeThreshold=config.edge_threshold,
            sigma=config.sigma,
        )

    def extract(self, image: np.ndarray) -> LocalFeatures:
        """[H, W, 3] uint8 RGB (or [H, W] grey) -> LocalFeatures with N <= max_features keypoints."""
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise ValueError(f"expected an [H, W, 3] uint8 RGB image, got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
        long_side = max(height, width)
        if self.config.max_side and long_side > self.config.max_side:
            factor = self.config.max_side / long_side
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        h, w = grey.shape
        fx, fy = width / w, height / h

        kps, desc = self._sift.detectAndCompute(grey, None)
        np_dtype = np.dtype(self.config.dtype)
        if not kps or desc is None:
            return LocalFeatures.empty(DIM, width, height, np_dtype)

        response = np.fromiter((k.response for k in kps), np.float32, len(kps))
        order = np.argsort(-response, kind="stable")[: self.config.max_features]
        pts = cv2.KeyPoint_convert(kps).astype(np.float32, copy=False).reshape(-1, 2)[order]
        keypoints = np.empty_like(pts)
        keypoints[:, 0] = (pts[:, 0] + 0.5) * fx - 0.5
        keypoints[:, 1] = (pts[:, 1] + 0.5) * fy - 0.5
        scales = np.fromiter((k.size for k in kps), np.float32, len(kps))[order] * np.float32((fx + fy) / 2)
        angles = np.fromiter((k.angle for k in kps), np.float32, len(kps))[order]
        desc = desc[order]
        if self.config.dtype == "uint8":
            descriptors = np.clip(np.rint(desc), 0, 255).astype(np.uint8)  # already integers 0..255
        else:
            descriptors = rootsift(desc) if self.config.root else desc.astype(np.float32, copy=False)
        return LocalFeatures(keypoints, scales.astype(np.float32), angles, response[order],
                             np.ascontiguousarray(descriptors), width, height)

    def postprocess(self) -> str:
        """What readers apply to stored descriptors: "rootsift" (uint8 raw bins, root) or "none"."""
        return "rootsift" if self.config.root and self.config.dtype == "uint8" else "none"

    def prepare(self, descriptors: np.ndarray) -> np.ndarray:
        """Stored descriptors of this extractor -> [N, 128] float32 descriptors to match or encode."""
        return prepare_descriptors(descriptors, {"postprocess": self.postprocess()})

    def metadata(self) -> dict:
        c = self.config
        resize = f"long side shrunk to at most {c.max_side} px (INTER_AREA)" if c.max_side else "no resize"
        return {
            "method": self.name,
            "kind": self.kind,
            "dim": self.dim,
            "dtype": c.dtype,
            "config": to_dict(c),
            "preprocessing": f"RGB to grey, {resize}, OpenCV SIFT, top {c.max_features} keypoints by "
            "response; keypoints and scales in pixels of the decoded image",
            "descriptor": ("raw SIFT bins" if c.dtype == "uint8" else "RootSIFT" if c.root else "SIFT"),
            "postprocess": self.postprocess(),
        }

    def schema(self) -> pa.Schema:
        """The local-features Parquet schema of this extractor's output, with its metadata."""
        return local_features_schema(DIM, self.config.dtype, self.metadata())
