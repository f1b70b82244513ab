"""Local features of one image, and their rows in the local-features Parquet schema (pipeline/schemas.py).

:class:`LocalFeatures` is what a local extractor (SIFT here, DELF later) returns for one image and what
geometric verification consumes. :func:`local_features_table` packs many images into one Arrow table
without per-keypoint Python objects; :func:`local_features_from_table` unpacks it again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.schemas import descriptor_layout


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


def _list_of(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A list<value_type> array: ``values`` [sum(lengths), ...] cut into ``lengths``. A fixed_size_list type
    takes the trailing dimension of ``values``; a binary one takes each row's bytes as one value."""
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.ascontiguousarray(values)
    if pa.types.is_binary(value_type):
        size = values.itemsize * int(np.prod(values.shape[1:]))
        ends = np.arange(len(values) + 1, dtype=np.int64) * size
        if ends[-1] > np.iinfo(np.int32).max:
            raise ValueError(f"{ends[-1]} bytes of descriptors in one table: more than a binary array holds")
        flat = pa.BinaryArray.from_buffers(value_type, len(values),
                                           [None, pa.py_buffer(ends.astype(np.int32)), pa.py_buffer(values)])
    elif pa.types.is_fixed_size_list(value_type):
        flat = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=value_type.value_type),
                                                 value_type.list_size)
    else:
        flat = pa.array(values.reshape(-1), type=value_type)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat)


def local_features_table(ids: list[str], labels: list[int | None], feats: list[LocalFeatures],
                         schema: pa.Schema) -> pa.Table:
    """One row per image in ``schema`` (from pipeline.schemas.local_features_schema)."""
    desc_type = schema.field("descriptors").type
    dim, np_dtype = descriptor_layout(schema)
    if dim is None:
        raise ValueError("local-features schema without 'dim' in its cairn metadata")
    lengths = np.array([len(f) for f in feats], np.int64)

    def cat(name, shape_tail, dtype):
        parts = [np.asarray(getattr(f, name), dtype).reshape((-1, *shape_tail)) for f in feats]
        return np.concatenate(parts) if parts else np.zeros((0, *shape_tail), dtype)

    columns = [
        pa.array(ids, pa.string()),
        pa.array(labels, pa.int64()),
        _list_of(cat("keypoints", (2,), np.float32), lengths, pa.list_(pa.float32(), 2)),
        _list_of(cat("scales", (), np.float32), lengths, pa.float32()),
        _list_of(cat("orientations", (), np.float32), lengths, pa.float32()),
        _list_of(cat("scores", (), np.float32), lengths, pa.float32()),
        _list_of(cat("descriptors", (dim,), np_dtype), lengths, desc_type.value_type),
        pa.array([f.width for f in feats], pa.int32()),
        pa.array([f.height for f in feats], pa.int32()),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _unpack(column: pa.ChunkedArray | pa.Array, width: int | None, dtype) -> list[np.ndarray]:
    """Per row of a list column, its values as one array ([n] or [n, width]); chunk by chunk, so that the
    columns of a large table are never copied into one array (binary offsets would overflow at 2 GiB)."""
    if isinstance(column, pa.ChunkedArray):
        return [part for chunk in column.chunks for part in _unpack(chunk, width, dtype)]
    col = column
    if len(col) == 0:  # an empty chunk may have no offsets buffer at all
        return []
    # List offsets index the child array as it is seen through its own offset, and flatten() applies the
    # slices of both the list and its child, so rebasing on offsets[0] is all a sliced array needs.
    offsets = col.offsets.to_numpy()
    offsets = offsets - offsets[0]
    values = col.flatten()
    if pa.types.is_binary(values.type):  # one value of ``width`` bytes per row, read in place
        flat, width = _bytes_rows(values, width)
    else:
        if width is not None:
            values = values.flatten()
        flat = values.to_numpy(zero_copy_only=False)
    flat = flat.astype(dtype, copy=False)
    if width is not None:
        flat = flat.reshape(len(flat) // width if width else 0, width)
    return [flat[offsets[i]: offsets[i + 1]] for i in range(len(col))]


def _bytes_rows(values: pa.BinaryArray, width: int | None) -> tuple[np.ndarray, int]:
    """The bytes of binary ``values`` (each ``width`` long; with no width, as long as the first) as one
    flat uint8 array, without copying, and that width; ValueError when a value has another length."""
    ends = np.frombuffer(values.buffers()[1], np.int32, count=len(values) + 1, offset=values.offset * 4)
    lengths = np.diff(ends)
    size = width if width is not None else (int(lengths[0]) if len(lengths) else 0)
    if len(lengths) and not np.all(lengths == size):
        bad = int(np.flatnonzero(lengths != size)[0])
        raise ValueError(f"a descriptor of {int(lengths[bad])} bytes where the features have {size}")
    if not len(values):
        return np.zeros(0, np.uint8), size
    return np.frombuffer(values.buffers()[2], np.uint8, count=len(values) * size, offset=int(ends[0])), size


def local_features_from_table(table: pa.Table) -> list[LocalFeatures]:
    """The inverse of :func:`local_features_table` (rows in table order)."""
    dim, dtype = descriptor_layout(table.schema)
    kp = _unpack(table.column("keypoints"), 2, np.float32)
    sc = _unpack(table.column("scales"), None, np.float32)
    ori = _unpack(table.column("orientations"), None, np.float32)
    scr = _unpack(table.column("scores"), None, np.float32)
    desc = _unpack(table.column("descriptors"), dim, dtype)
    w = table.column("width").to_pylist()
    h = table.column("height").to_pylist()
    return [LocalFeatures(*parts) for parts in zip(kp, sc, ori, scr, desc, w, h, strict=True)]
