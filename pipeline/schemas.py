"""Parquet schemas of Cairn's artefacts. Every file carries a ``cairn`` JSON entry in its schema metadata.

Global features (``features-SSSSS-of-NNNNN.parquet``), one row per image:
    id            string, not null      image id from the manifest
    landmark_id   int64, nullable       null = no landmark / unknown
    vector        fixed_size_list<float32>[dim], not null

Regional global features (``cairn extract --detector``), one row per region of an image (several per id):
    id, landmark_id, vector              as above (the id is the parent image's)
    region        int32                 0 = the full image, 1.. = detected boxes, best first
    box           fixed_size_list<float32>[4]   (xmin, ymin, xmax, ymax) in pixels of the decoded image
    box_score     float32               the detector's score (1 for the full image)
    width, height int32                 size of the decoded image
  The ``cairn`` metadata has ``regions``: the detector's config and model fingerprint.

Local features (``local-SSSSS-of-NNNNN.parquet``), one row per image:
    id, landmark_id                      as above
    keypoints     list<fixed_size_list<float32>[2]>   (x, y) in pixels of the decoded image
    scales        list<float32>                       keypoint scale (pixels)
    orientations  list<float32>                       degrees, 0..360 (0 where the detector has none)
    scores        list<float32>                       detector response or attention score
    descriptors   list<binary>  for uint8 descriptors: one dim-byte value per keypoint (dim in the metadata)
                  list<fixed_size_list<float32>[dim]>  for float32 ones
  (version 1 stored uint8 descriptors as list<fixed_size_list<uint8>[dim]>; :func:`descriptor_layout` reads both)
    width, height int32                               size of the decoded image the keypoints refer to

Sparse features (``sparse-SSSSS-of-NNNNN.parquet``), one row per image, for bag-of-visual-words vectors whose
dimension (the vocabulary size, up to 65,536) is too large to store densely:
    id, landmark_id                      as above
    indices       list<int32>            non-zero dimensions, increasing
    values        list<float32>          their values (the row is L2-normalised)

Images (``images-SSSSS-of-NNNNN.parquet``), one row per image, packed so that a million images are a few
hundred files rather than a million:
    id, landmark_id                      as above
    path          string                 where the image came from
    width, height int32                  decoded size
    image         binary, nullable       encoded image bytes (null when only the index of images is kept)

The ``cairn`` metadata entry is a JSON object with at least ``schema`` (name/version), and for features the
``method``, ``dim``, the extractor ``config`` and its ``preprocessing``.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

METADATA_KEY = b"cairn"
GLOBAL_FEATURES = "cairn.global_features/1"
LOCAL_FEATURES = "cairn.local_features/2"
SPARSE_FEATURES = "cairn.sparse_features/1"
IMAGES = "cairn.images/1"

_ID = pa.field("id", pa.string(), nullable=False)
_LABEL = pa.field("landmark_id", pa.int64(), nullable=True)


def _with_metadata(fields: list[pa.Field], schema_name: str, metadata: dict | None) -> pa.Schema:
    meta = {"schema": schema_name, **(metadata or {})}
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True, allow_nan=False).encode()})


REGION_FIELDS = [
    pa.field("region", pa.int32(), nullable=False),
    pa.field("box", pa.list_(pa.float32(), 4), nullable=False),
    pa.field("box_score", pa.float32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
]


def global_features_schema(dim: int, metadata: dict | None = None, regional: bool = False) -> pa.Schema:
    """Schema of global descriptors: id, landmark_id, vector (float32[dim]); with ``regional`` one row per
    detected region, with its region number, box, score and the image size (``metadata`` should then hold
    ``regions``)."""
    vector = pa.field("vector", pa.list_(pa.float32(), dim), nullable=False)
    fields = [_ID, _LABEL, vector] + (REGION_FIELDS if regional else [])
    return _with_metadata(fields, GLOBAL_FEATURES, {"dim": dim, **(metadata or {})})


def is_regional(schema: pa.Schema) -> bool:
    """True for global features with one row per detected region (several rows per image id)."""
    return "region" in schema.names


def descriptors_type(dim: int, dtype: str) -> pa.DataType:
    """Arrow type of one image's descriptors. uint8 descriptors are one ``dim``-byte binary value per keypoint:
    as lists of ``dim`` uint8, Parquet writes each byte as a value with its repetition levels (SIFT: 175 MB of
    pages for 48 MB of descriptors, 4x longer to write, for the same file size). Variable-size binary rather
    than fixed_size_binary, which pandas cannot convert inside a list; ``dim`` is in the schema metadata."""
    if dtype == "uint8":
        return pa.list_(pa.binary())
    if dtype == "float32":
        return pa.list_(pa.list_(pa.float32(), dim))
    raise ValueError(f"descriptor dtype {dtype!r}: expected 'uint8' or 'float32'")


def descriptor_layout(schema: pa.Schema) -> tuple[int | None, np.dtype]:
    """(dim, numpy dtype) of the ``descriptors`` column of a local-features schema: this version's
    (:func:`descriptors_type`; the dim of binary descriptors from the metadata, None when it has none) or
    version 1's list<fixed_size_list<uint8>[dim]>, so that features written before keep being read."""
    inner = schema.field("descriptors").type.value_type
    if pa.types.is_binary(inner):
        dim = cairn_metadata(schema).get("dim")
        return (int(dim) if dim is not None else None), np.dtype(np.uint8)
    if pa.types.is_fixed_size_list(inner) and inner.value_type in (pa.uint8(), pa.float32()):
        return inner.list_size, np.dtype(inner.value_type.to_pandas_dtype())
    raise ValueError(f"descriptors of type {schema.field('descriptors').type}: not a Cairn local-features column")


def local_features_schema(dim: int, dtype: str = "float32", metadata: dict | None = None) -> pa.Schema:
    """Schema of local features: keypoints, scales, orientations, scores and descriptors per image."""
    fields = [
        _ID,
        _LABEL,
        pa.field("keypoints", pa.list_(pa.list_(pa.float32(), 2)), nullable=False),
        pa.field("scales", pa.list_(pa.float32()), nullable=False),
        pa.field("orientations", pa.list_(pa.float32()), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
        pa.field("descriptors", descriptors_type(dim, dtype), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
    return _with_metadata(fields, LOCAL_FEATURES, {"dim": dim, "dtype": dtype, **(metadata or {})})


def sparse_features_schema(dim: int, metadata: dict | None = None) -> pa.Schema:
    """Schema of sparse vectors: id, landmark_id, indices (int32), values (float32); ``dim`` in the metadata."""
    fields = [
        _ID,
        _LABEL,
        pa.field("indices", pa.list_(pa.int32()), nullable=False),
        pa.field("values", pa.list_(pa.float32()), nullable=False),
    ]
    return _with_metadata(fields, SPARSE_FEATURES, {"dim": dim, **(metadata or {})})


def sparse_features_table(ids: list[str], labels: list[int | None], matrix, schema: pa.Schema) -> pa.Table:
    """Build a sparse-features table from a scipy.sparse CSR matrix [N, dim] (rows in ``ids`` order)."""
    import scipy.sparse as sp

    m = sp.csr_matrix(matrix, dtype=np.float32)
    m.sort_indices()
    offsets = pa.array(m.indptr.astype(np.int32), pa.int32())
    return pa.Table.from_arrays([
        pa.array(ids, pa.string()),
        pa.array(labels, pa.int64()),
        pa.ListArray.from_arrays(offsets, pa.array(m.indices.astype(np.int32), pa.int32())),
        pa.ListArray.from_arrays(offsets, pa.array(m.data.astype(np.float32), pa.float32())),
    ], schema=schema)


def sparse_matrix_of(table: pa.Table, dim: int):
    """The scipy.sparse CSR matrix [N, dim] float32 of a sparse-features table."""
    import scipy.sparse as sp

    idx = table.column("indices").combine_chunks()
    val = table.column("values").combine_chunks()
    offsets = idx.offsets.to_numpy().astype(np.int64)
    start = offsets[0]
    indices = idx.values.to_numpy()[start: offsets[-1]].astype(np.int32)
    data = val.values.to_numpy(zero_copy_only=False)[start: offsets[-1]].astype(np.float32)
    return sp.csr_matrix((data, indices, offsets - start), shape=(len(table), dim))


def images_schema(metadata: dict | None = None) -> pa.Schema:
    """Schema of packed images: id, landmark_id, path, width, height, image bytes."""
    fields = [
        _ID,
        _LABEL,
        pa.field("path", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=True),
    ]
    return _with_metadata(fields, IMAGES, metadata)


def same_features(a: dict, b: dict) -> bool:
    """Whether two features' metadata describe the same extraction (method and config), e.g. a database and
    its queries, or an encoder's training features and the features it is applied to."""
    return (a.get("method"), a.get("config")) == (b.get("method"), b.get("config"))


def cairn_metadata(schema: pa.Schema) -> dict:
    """The ``cairn`` metadata entry of a schema ({} when absent)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def global_features_table(ids: list[str], labels: list[int | None], vectors: np.ndarray,
                          schema: pa.Schema, extra: pa.Table | None = None) -> pa.Table:
    """Build a global-features table from [N, D] float32 vectors (no per-row Python lists); the columns of a
    regional schema after the vector (region, box, ...) are taken from ``extra``."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = schema.field("vector").type.list_size
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"vectors have shape {vectors.shape}, schema expects [N, {dim}]")
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    column = pa.FixedSizeListArray.from_arrays(flat, dim)
    rest = [extra.column(name) for name in schema.names[3:]] if len(schema.names) > 3 else []
    return pa.Table.from_arrays(
        [pa.array(ids, pa.string()), pa.array(labels, pa.int64()), column, *rest], schema=schema
    )


def vectors_of(table: pa.Table, column: str = "vector") -> np.ndarray:
    """[N, D] float32 view of a fixed_size_list column (zero-copy when the table has one chunk)."""
    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    values = col.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, dim).astype(np.float32, copy=False)


def labels_of(table: pa.Table, no_landmark: int = -1) -> np.ndarray:
    """[N] int64 landmark ids with ``no_landmark`` for nulls."""
    import pyarrow.compute as pc

    return pc.fill_null(table.column("landmark_id"), no_landmark).to_numpy().astype(np.int64)
