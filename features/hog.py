"""HoG (Dalal & Triggs 2005) as a global image descriptor.

The whole image is resized (aspect ratio not kept) to ``size x size``; gradients are binned into
``nbins`` unsigned orientations per ``cell x cell`` cell; blocks of ``block_cells x block_cells`` cells,
moved by one cell, are L2-Hys normalised (OpenCV's HOGDescriptor). The concatenation is then
power-normalised (signed ``|x| ** power``, which tames bursty bins) and L2-normalised, so that inner product
is cosine similarity. Dimension: ``((size/cell) - block_cells + 1)**2 * block_cells**2 * nbins``;
with the defaults (128, 16, 2, 9) that is 7 * 7 * 4 * 9 = 1764.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from features.base import l2_normalize
from pipeline.config import check_numbers, to_dict

MIN_SIZE = 8  # smallest image side with gradients inside (a 2 x 2 image gives an all-zero descriptor)
MAX_SIZE = 4096  # largest side an image is resized to (a 4096 x 4096 HoG is already ~ 9 million numbers)
MAX_BINS = 180  # orientation bins at most: one per degree of the unsigned 0..180 range


@dataclass(frozen=True)
class HogConfig:
    """HoG descriptor parameters."""

    size: int = 128  # images are resized to size x size pixels (aspect not kept)
    cell: int = 16  # cell side in pixels
    block_cells: int = 2  # block side in cells; blocks move by one cell
    nbins: int = 9  # unsigned orientation bins (0..180 degrees)
    power: float = 0.5  # signed power normalisation exponent before L2 (1.0 = none)
    grey: bool = False  # compute on grey levels instead of the max-gradient colour channel

    def __post_init__(self):
        # OpenCV's HOGDescriptor checks none of these: nbins=0 crashes the process, cell=0 divides by zero
        check_numbers(self)
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"size must be between {MIN_SIZE} and {MAX_SIZE} pixels, not {self.size}")
        if not 1 <= self.cell <= self.size:
            raise ValueError(f"cell must be between 1 and size ({self.size}) pixels, not {self.cell}")
        if self.size % self.cell:
            raise ValueError(f"size {self.size} must be a multiple of cell {self.cell}")
        if not 1 <= self.block_cells <= self.size // self.cell:
            raise ValueError(f"block_cells must be between 1 and size / cell = {self.size // self.cell}, "
                             f"not {self.block_cells}")
        if not 1 <= self.nbins <= MAX_BINS:
            raise ValueError(f"nbins must be between 1 and {MAX_BINS}, not {self.nbins}")
        if not 0 < self.power <= 1:  # |x| ** 0 keeps only signs, |x| ** inf only zeros; > 1 sharpens bursts
            raise ValueError(f"power must be in (0, 1] (1 = no power normalisation), not {self.power}")

    def dim(self) -> int:
        blocks = self.size // self.cell - self.block_cells + 1
        return blocks * blocks * self.block_cells**2 * self.nbins


def make_hog(config: HogConfig) -> cv2.HOGDescriptor:
    block = config.cell * config.block_cells
    return cv2.HOGDescriptor(
        (config.size, config.size), (block, block), (config.cell, config.cell), (config.cell, config.cell),
        config.nbins,
    )


def hog_descriptor(image: np.ndarray, config: HogConfig = HogConfig(), hog: cv2.HOGDescriptor | None = None,
                   ) -> np.ndarray:
    """[H, W, 3] uint8 RGB -> [config.dim()] float32, L2-normalised."""
    hog = hog or make_hog(config)
    interp = cv2.INTER_AREA if min(image.shape[:2]) >= config.size else cv2.INTER_LINEAR
    small = cv2.resize(image, (config.size, config.size), interpolation=interp)
    if config.grey:
        small = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    x = hog.compute(small).reshape(-1).astype(np.float32)
    if config.power != 1.0:
        x = np.sign(x) * np.abs(x) ** config.power
    return l2_normalize(x)


class HogExtractor:
    """Global HoG descriptor extractor (see the module docstring)."""

    name = "hog"
    kind = "global"

    def __init__(self, config: HogConfig = HogConfig()):
        self.config = config
        self.dim = config.dim()
        self._hog = make_hog(config)

    def extract(self, image: np.ndarray) -> np.ndarray:
        return hog_descriptor(image, self.config, self._hog)

    def metadata(self) -> dict:
        return {
            "method": self.name,
            "dim": self.dim,
            "config": to_dict(self.config),
            "preprocessing": f"resize to {self.config.size}x{self.config.size} (aspect not kept), "
            "OpenCV HOGDescriptor with L2-Hys blocks, signed power, L2",
        }
