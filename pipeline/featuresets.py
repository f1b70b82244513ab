"""Feature folders: the layout every job that writes or reads descriptors shares.

A features folder (written by `cairn extract` or `cairn encode`) holds one kind of features as sharded Parquet:

    features-SSSSS-of-NNNNN.parquet   global descriptors: id, landmark_id, vector (pipeline/schemas.py)
    local-SSSSS-of-NNNNN.parquet      local features: keypoints, scales, ..., descriptors per image
    sparse-SSSSS-of-NNNNN.parquet     sparse vectors (BoVW): indices and values per image

beside the job's record (extract.json or encode.json). The shards' footers carry the ``cairn`` metadata: the
method, its config, the dimension.
"""

from __future__ import annotations

import os

import pyarrow.parquet as pq

from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.parquet_io import find_shards, shard_pattern
from pipeline.schemas import cairn_metadata

FEATURE_PREFIX = {"global": "features", "local": "local", "sparse": "sparse"}  # shard name per feature kind


def features_prefix(out: str, kind: str = "global") -> str:
    """Where a job writes features of ``kind`` under OUT (shards ``<prefix>-SSSSS-of-NNNNN.parquet``)."""
    return fs.join(out, FEATURE_PREFIX[kind])


def features_kind(folder: str) -> str:
    """Which kind of features a job folder holds ("global", "local" or "sparse"); CairnError if none."""
    for kind, prefix in FEATURE_PREFIX.items():
        if fs.glob(shard_pattern(fs.join(folder, prefix))):
            return kind
    raise CairnError(f"{folder} holds no features (features-*, local-* or sparse-* shards); "
                     "run `cairn extract` (or `cairn encode`) first")


def features_metadata(folder: str, kind: str | None = None) -> dict:
    """The ``cairn`` metadata of a folder's feature shards (read from the first shard's footer)."""
    kind = kind or features_kind(folder)
    with fs.FileSystems.open(find_shards(features_prefix(folder, kind))[0]) as f:
        return cairn_metadata(pq.read_schema(f))


def features_fingerprint(folder: str) -> str:
    """A fingerprint of a features folder's content: the config of the job that wrote it (extract.json or
    encode.json), which fixes its content, plus its row count. Cheap at any scale (no feature bytes read)."""
    for name in ("extract.json", "encode.json"):
        path = fs.join(folder, name)
        if fs.exists(path):
            record = cfg.load_json(path)
            return cfg.fingerprint({"config": record.get("config"), "counts": record.get("counts")})
    raise CairnError(f"{folder} has no extract.json or encode.json; it was not written by `cairn extract/encode`")


def shards_bytes(prefix: str) -> int:
    """Bytes of the shard set ``<prefix>-*-of-*.parquet`` (0 when there is none)."""
    return sum(fs.size(p) for p in fs.glob(shard_pattern(prefix)))


def tree_bytes(folder: str) -> int:
    """Bytes of the files under a local folder (0 for remote ones: not measured)."""
    if fs.has_scheme(folder):
        return 0
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(folder) for n in names)
