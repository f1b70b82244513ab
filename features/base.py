"""The contract every global-descriptor extractor follows.

An extractor is built from a frozen config, once per worker; ``extract`` maps one decoded image
([H, W, 3] uint8 RGB) to one descriptor ([dim] float32, L2-normalised), and ``metadata`` describes it fully
enough to be stored in the Parquet files it produces (name, dim, config, preprocessing).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class GlobalExtractor(Protocol):
    name: str  # method name, e.g. "hog"
    dim: int  # descriptor length

    def extract(self, image: np.ndarray) -> np.ndarray:
        """[H, W, 3] uint8 RGB -> [dim] float32."""
        ...

    def metadata(self) -> dict:
        """JSON-ready description: name, dim, config, preprocessing."""
        ...


MAX_SIDE = 4096  # largest square side (pixels) a model input or an extraction image may be configured to
SCALES = (0.1, 4.0)  # image scales a test-time or extraction pyramid may hold (4: a 1024-px image becomes 4096 px)


def check_scales(scales: tuple[float, ...]) -> None:
    """ValueError unless ``scales`` is a non-empty tuple of image scales within :data:`SCALES`."""
    lo, hi = SCALES
    if not scales or any(not lo <= s <= hi for s in scales):
        raise ValueError(f"scales must be between {lo} and {hi:g}, not {scales}")


def check_side(name: str, side: int, low: int) -> None:
    """ValueError unless the configured image side ``side`` is between ``low`` and :data:`MAX_SIDE` pixels."""
    if not low <= side <= MAX_SIDE:
        raise ValueError(f"{name} must be between {low} and {MAX_SIDE} pixels, not {side}")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise (or vector) L2 normalisation in float32; zero vectors stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, eps)
