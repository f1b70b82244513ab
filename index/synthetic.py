"""Synthetic embeddings shaped like a landmark corpus, for index tuning, benchmarks and tests.

Uniform random vectors mislead approximate search: they have no clusters for IVF to exploit and no decaying
spectrum for PQ to exploit, so every method looks equally bad. Real landmark embeddings (GeM, DELG) have both,
and these vectors are built to have them too:

- ``classes`` landmark centres and a long tail of class sizes: class ``c`` is drawn with probability
  proportional to ``(c + 1) ** -tail`` (Google Landmarks v2 is long-tailed the same way);
- every vector is its class centre plus noise of a per-class spread (some landmarks are photographed alike,
  others from everywhere), then L2-normalised, as embeddings are;
- centres and noise share a decaying spectrum (standard deviation of axis ``i`` proportional to
  ``(i + 1) ** -decay``) in a random rotation, so that the data has a low intrinsic dimension but is not
  axis-aligned (which would flatter plain PQ);
- a share of the vectors are non-landmark images (label -1): each is drawn around one of ``distractor_modes``
  broad modes with a larger spread, as clutter, indoor and people photos are.

Everything is a function of the seed; vectors are produced in chunks so that a million of them never need more
than the output array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import check_numbers


@dataclass(frozen=True)
class VectorSetConfig:
    """A synthetic embedding corpus."""

    dim: int = 512  # vector dimension
    classes: int = 13_000  # landmark classes
    tail: float = 0.6  # class c is drawn with probability ~ (c + 1) ** -tail (0 = uniform)
    decay: float = 0.5  # spectrum: axis i has standard deviation ~ (i + 1) ** -decay before the rotation
    spread: tuple[float, float] = (0.5, 0.9)  # per-class noise norm relative to the centre's, drawn uniformly
    distractor_modes: int = 200  # broad modes the non-landmark vectors are drawn around
    distractor_spread: float = 1.2  # their noise norm relative to the mode's
    seed: int = 0  # centres, rotation and spreads

    def __post_init__(self):
        check_numbers(self)
        if self.dim < 2 or self.classes < 1 or self.distractor_modes < 1:
            raise ValueError("dim must be >= 2, classes and distractor_modes >= 1")
        if self.tail < 0 or self.decay < 0:
            raise ValueError("tail and decay must be >= 0")
        if len(self.spread) != 2 or not 0 < self.spread[0] <= self.spread[1] or self.distractor_spread <= 0:
            raise ValueError("spread must be (low, high) with 0 < low <= high, and distractor_spread > 0")


class VectorSet:
    """Draws database and query vectors of one corpus (same centres, independent noise per draw)."""

    def __init__(self, config: VectorSetConfig = VectorSetConfig()):
        self.config = config
        c = config
        rng = np.random.default_rng([c.seed, 1])
        self.scale = ((np.arange(c.dim) + 1.0) ** -c.decay).astype(np.float32)
        self.scale /= np.linalg.norm(self.scale)  # a standard normal draw times scale has norm ~1
        q, _ = np.linalg.qr(rng.standard_normal((c.dim, c.dim)))
        self.rotation = q.astype(np.float32)  # [D, D] orthonormal
        self.centres = self._unit(rng.standard_normal((c.classes, c.dim), dtype=np.float32) * self.scale)
        self.modes = self._unit(rng.standard_normal((c.distractor_modes, c.dim), dtype=np.float32) * self.scale)
        self.spreads = rng.uniform(*c.spread, c.classes).astype(np.float32)
        weights = (np.arange(c.classes) + 1.0) ** -c.tail
        self.class_p = weights / weights.sum()

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def draw(self, n: int, seed: int, distractors: float = 0.0, chunk: int = 50_000, progress: bool = False,
             desc: str = "vectors") -> tuple[np.ndarray, np.ndarray]:
        """``n`` vectors: [n, D] float32 L2-normalised and [n] int64 class (-1 for the non-landmark share).

        Args:
            seed: the draw's own seed (a query set uses another seed than the database).
            distractors: share of non-landmark vectors, in [0, 1].
        """
        from tqdm import tqdm

        if not 0 <= distractors <= 1:
            raise ValueError(f"distractors must be in [0, 1], not {distractors}")
        c = self.config
        rng = np.random.default_rng([c.seed, 2, seed])
        labels = rng.choice(c.classes, size=n, p=self.class_p).astype(np.int64)
        labels[rng.random(n) < distractors] = -1
        out = np.empty((n, c.dim), np.float32)
        for lo in tqdm(range(0, n, chunk), desc=desc, unit="chunk", leave=False, disable=not progress):
            y = labels[lo:lo + chunk]
            m = len(y)
            base = np.empty((m, c.dim), np.float32)
            spread = np.empty(m, np.float32)
            lm = y >= 0
            base[lm], spread[lm] = self.centres[y[lm]], self.spreads[y[lm]]
            nl = ~lm
            base[nl] = self.modes[rng.integers(0, c.distractor_modes, int(nl.sum()))]
            spread[nl] = c.distractor_spread
            noise = rng.standard_normal((m, c.dim), dtype=np.float32) * self.scale
            x = base + noise * spread[:, None]
            out[lo:lo + m] = self._unit(x @ self.rotation)
        return out, labels
