"""Regional search: an index over the detected regions of images, searched and answered per image.

`cairn extract --detector` writes one vector per region (the full image and its landmark boxes) under the
parent image's id, and `cairn index` indexes every region with that id. :class:`RegionalIndex` presents such an
index as an index over images: a search returns each database image once, at the similarity of its best
region (the max over its regions, as in regional search with R-MAC / Detect-to-Retrieve's regional baseline),
with ``image_ids`` and ``labels`` per image. On the query side, :func:`merge_rows` gathers the neighbour lists
of a query's regions into one list, again keeping each database image's best similarity.

The image of a result is reported through a representative row (the first region row of that image in the
index), so ``labels_of``, ``id_array`` and the neighbour tables work unchanged.
"""

from __future__ import annotations

import numpy as np

from index.faiss_index import VectorIndex, labels_of_ids


def factorize(ids) -> tuple[np.ndarray, np.ndarray]:
    """(codes [N]: the number of each row's id, in order of first appearance; first [G]: each id's first row)."""
    seen: dict[str, int] = {}
    codes = np.empty(len(ids), np.int64)
    first = []
    for r, i in enumerate(ids):
        c = seen.get(i)
        if c is None:
            c = seen[i] = len(first)
            first.append(r)
        codes[r] = c
    return codes, np.array(first, np.int64)


def best_per_group(D: np.ndarray, I: np.ndarray, group_of: np.ndarray, k: int, larger_is_better: bool = True,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per row of D, I (sorted best first, -1 = none): the first ``k`` distinct groups (``group_of[I]``), each
    at its best score, as (D [Q, k], G [Q, k]) padded with -inf (or +inf) / -1."""
    Q = len(D)
    pad = -np.inf if larger_is_better else np.inf
    D2 = np.full((Q, k), pad, np.float32)
    G2 = np.full((Q, k), -1, np.int64)
    for q in range(Q):
        valid = I[q] >= 0
        groups = group_of[I[q][valid]]
        _, first = np.unique(groups, return_index=True)
        first = np.sort(first)[:k]
        D2[q, :len(first)] = D[q][valid][first]
        G2[q, :len(first)] = groups[first]
    return D2, G2


def merge_rows(owner: np.ndarray, D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour lists of several rows per query -> one per query: ``owner`` [R] is each row's query (0..G-1,
    every query owning at least one row); D [R, n] similarities (larger is better), I [R, n] database images.
    Each database image keeps its best similarity over the query's rows; the top ``k``, best first."""
    owner = np.asarray(owner, np.int64)
    G = int(owner.max()) + 1 if len(owner) else 0
    D2 = np.full((G, k), -np.inf, np.float32)
    I2 = np.full((G, k), -1, np.int64)
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(G + 1))
    for g in range(G):
        rows = order[bounds[g]:bounds[g + 1]]
        if len(rows) == 1:
            n = min(k, I.shape[1])
            D2[g, :n], I2[g, :n] = D[rows[0], :n], I[rows[0], :n]
            continue
        d, i = D[rows].reshape(-1), I[rows].reshape(-1)
        valid = i >= 0
        d, i = d[valid], i[valid]
        by_score = np.argsort(-d, kind="stable")
        _, first = np.unique(i[by_score], return_index=True)
        pick = by_score[np.sort(first)][:k]
        D2[g, :len(pick)], I2[g, :len(pick)] = d[pick], i[pick]
    return D2, I2


def group_queries(query_ids: list[str]) -> tuple[list[str], np.ndarray]:
    """(distinct query ids in order of first appearance, each row's position among them)."""
    codes, first = factorize(query_ids)
    return [query_ids[r] for r in first], codes


def is_regional(meta: dict | None) -> bool:
    """True for features (or an index's recorded features) written by `cairn extract --detector`."""
    return bool((meta or {}).get("regions"))


class RegionalIndex:
    """A VectorIndex of region vectors, seen as an index of images (see the module docstring)."""

    def __init__(self, inner):
        self.inner = inner
        self.row_image, first = factorize(inner.image_ids)
        self.first_row = first
        self.image_ids = [inner.image_ids[r] for r in first]
        self.labels = inner.labels[first]
        counts = np.bincount(self.row_image) if len(self.row_image) else np.zeros(1, np.int64)
        self.regions_per_image = int(counts.max()) if len(counts) else 1
        self.nonlandmarks = RegionalIndex(inner.nonlandmarks) if inner.nonlandmarks is not None else None
        self._ids_array = None

    def __getattr__(self, name: str):
        """What does not depend on images vs regions (config, features_metadata, factory, dim, ...) is the
        region index's."""
        if name == "inner":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def ntotal(self) -> int:
        return len(self.image_ids)

    @property
    def regions(self) -> int:
        return self.inner.ntotal

    def search(self, xq: np.ndarray, k: int, batch_size: int = 4096, progress: bool = False,
               params: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest database images of each query vector, each at its best region: D [Q, k] (distances
        for an L2 index, similarities for inner product, as VectorIndex.search), I [Q, k] image numbers."""
        rows = min(self.inner.ntotal, k * self.regions_per_image)  # enough rows to hold k distinct images
        D, I = self.inner.search(xq, max(1, rows), batch_size=batch_size, progress=progress, params=params)
        return best_per_group(D, I, self.row_image, k, larger_is_better=self.config.metric != "l2")

    def labels_of(self, I: np.ndarray) -> np.ndarray:
        return labels_of_ids(self.labels, I)

    def ids_of(self, I: np.ndarray) -> list[list[str]]:
        return [[self.image_ids[j] for j in row if j >= 0] for row in I]

    def id_array(self):
        import pyarrow as pa

        if self._ids_array is None:
            self._ids_array = pa.array(self.image_ids, pa.string())
        return self._ids_array


def wrap(index):
    """``index`` as a RegionalIndex when it holds regions, else unchanged."""
    if isinstance(index, VectorIndex) and is_regional(index.features_metadata):
        return RegionalIndex(index)
    return index
