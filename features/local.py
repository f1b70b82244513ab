"""Local features of one image, and their rows in the local-features Parquet schema (pipeline/schemas.py).

:class:`LocalFeatures` is what a local extractor (SIFT here, DELF later) returns for one image and what
geometric verification consumes. :func:`local_features_table` packs many images into one Arrow table
without per-keypoint Python objects; :func:`local_features_from_table` unpacks it again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class LocalFeatures:
    """Keypoints and descriptors of one image. N may be 0."""

    keypoints: np.ndarray  # [N, 2] float32 (x, y) in pixels of the decoded image
    scales: np.ndarray  # [N] float32 keypoint scale (diameter of the region, pixels)
    orientations: np.ndarray  # [N] float32 degrees in [0, 360) (0 where the detector has none)
    scores: np.ndarray  # [N] float32 detector response or attention score
    descriptors: np.ndarray  # [N, D] float32 or uint8
    width: int  # decoded image width the keypoints refer to
    height: int  # decoded image height

    def __len__(self) -> int:
        return len(self.keypoints)

    @classmethod
    def empty(cls, dim: int, width: int, height: int, dtype=np.float32) -> LocalFeatures:
        z = np.zeros(0, np.float32)
        return cls(np.zeros((0, 2), np.float32), z, z.copy(), z.copy(), np.zeros((0, dim), dtype), width, height)

    def validate(self, dim: int) -> None:
        """Raise ValueError when shapes disagree or values are not finite (a bad record, not a crash)."""
        n = len(self.keypoints)
        if self.keypoints.shape != (n, 2) or self.descriptors.shape != (n, dim):
            raise ValueError(f"keypoints {self.keypoints.shape} / descriptors {self.descriptors.shape}, "
                             f"expected [{n}, 2] / [{n}, {dim}]")
        for name in ("scales", "orientations", "scores"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected [{n}]")
        floats = [self.keypoints, self.scales, self.orientations, self.scores]
        if self.descriptors.dtype.kind == "f":
            floats.append(self.descriptors)
        if not all(np.all(np.isfinite(a)) for a in floats):
            raise ValueError("non-finite keypoint or descriptor values")


def _list_of(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType, width: int | None) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    if width is not None:
        flat = pa.FixedSizeListArray.from_arrays(flat, width)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat)


def local_features_table(ids: list[str], labels: list[int | None], feats: list[LocalFeatures],
                         schema: pa.Schema) -> pa.Table:
    """One row per image in ``schema`` (from pipeline.schemas.local_features_schema)."""
    dim = schema.field("descriptors").type.value_type.list_size
    value_type = schema.field("descriptors").type.value_type.value_type
    np_dtype = np.uint8 if value_type == pa.uint8() else np.float32
    lengths = np.array([len(f) for f in feats], np.int64)

    def cat(name, shape_tail, dtype):
        parts = [np.asarray(getattr(f, name), dtype).reshape((-1, *shape_tail)) for f in feats]
        return np.concatenate(parts) if parts else np.zeros((0, *shape_tail), dtype)

    columns = [
        pa.array(ids, pa.string()),
        pa.array(labels, pa.int64()),
        _list_of(cat("keypoints", (2,), np.float32), lengths, pa.float32(), 2),
        _list_of(cat("scales", (), np.float32), lengths, pa.float32(), None),
        _list_of(cat("orientations", (), np.float32), lengths, pa.float32(), None),
        _list_of(cat("scores", (), np.float32), lengths, pa.float32(), None),
        _list_of(cat("descriptors", (dim,), np_dtype), lengths, value_type, dim),
        pa.array([f.width for f in feats], pa.int32()),
        pa.array([f.height for f in feats], pa.int32()),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _unpack(column: pa.ChunkedArray | pa.Array, width: int | None, dtype) -> list[np.ndarray]:
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    # List offsets index the child array as it is seen through its own offset, and flatten() applies the
    # slices of both the list and its child, so rebasing on offsets[0] is all a sliced array needs.
    offsets = col.offsets.to_numpy()
    offsets = offsets - offsets[0]
    values = col.flatten()
    if width is not None:
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    if width is not None:
        flat = flat.reshape(-1, width)
    return [flat[offsets[i]: offsets[i + 1]] for i in range(len(col))]


def local_features_from_table(table: pa.Table) -> list[LocalFeatures]:
    """The inverse of :func:`local_features_table` (rows in table order)."""
    dtype = np.uint8 if table.schema.field("descriptors").type.value_type.value_type == pa.uint8() else np.float32
    dim = table.schema.field("descriptors").type.value_type.list_size
    kp = _unpack(table.column("keypoints"), 2, np.float32)
    sc = _unpack(table.column("scales"), None, np.float32)
    ori = _unpack(table.column("orientations"), None, np.float32)
    scr = _unpack(table.column("scores"), None, np.float32)
    desc = _unpack(table.column("descriptors"), dim, dtype)
    w = table.column("width").to_pylist()
    h = table.column("height").to_pylist()
    return [LocalFeatures(*parts) for parts in zip(kp, sc, ori, scr, desc, w, h, strict=True)]
