"""Recognition from neighbours: each query's landmark and confidence from its k nearest database images.

Votes: each of the top-k neighbours votes for its landmark with its similarity; a class scores the sum of
its votes divided by k, so a confidence is in [0, 1] for cosine similarities. Neighbours without a landmark
(database images labelled "no landmark") vote for "no landmark" (-1): when that wins, or when the best class
scores below ``min_confidence``, the query gets no prediction. The FAISS issue adds per-class normalisation,
non-landmark penalties and geometric re-ranking on top of this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NO_LANDMARK = -1


@dataclass(frozen=True)
class VoteConfig:
    """How neighbours become a prediction."""

    k: int = 10  # neighbours that vote
    min_confidence: float = 0.0  # below this the query gets no prediction


def vote(D: np.ndarray, labels: np.ndarray, config: VoteConfig = VoteConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour votes.

    Args:
        D: [Q, K] float32 similarities, best first (K >= config.k; only the first k vote).
        labels: [Q, K] int64 landmark ids of the neighbours (-1 = no landmark or no neighbour).
    Returns:
        pred [Q] int64 landmark id (-1 = no prediction), conf [Q] float32 (0 where no prediction).
    """
    k = min(config.k, D.shape[1])
    D, labels = D[:, :k], labels[:, :k]
    pred = np.full(len(D), NO_LANDMARK, np.int64)
    conf = np.zeros(len(D), np.float32)
    for q in range(len(D)):
        scores: dict[int, float] = {}
        for s, lab in zip(D[q], labels[q], strict=True):
            if not np.isfinite(s):
                continue
            scores[int(lab)] = scores.get(int(lab), 0.0) + max(float(s), 0.0)
        if not scores:
            continue
        # highest score wins; ties go to the class whose best neighbour came first (stable max over order)
        best = max(scores, key=scores.get)
        c = scores[best] / k
        if best != NO_LANDMARK and c >= config.min_confidence and c > 0:
            pred[q], conf[q] = best, c
    return pred, conf
