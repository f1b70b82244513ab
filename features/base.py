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


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise (or vector) L2 normalisation in float32; zero vectors stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, eps)
