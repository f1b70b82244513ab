"""Feature folders: the layout every job that writes or reads descriptors shares.

A features folder (written by `cairn extract` or `cairn encode`) holds one kind of features as sharded Parquet:

    features-SSSSS-of-NNNNN.parquet   global descriptors: id, landmark_id, vector (pipeline/schemas.py)
    local-SSSSS-of-NNNNN.parquet      local features: keypoints, scales, ..., descriptors per image
    sparse-SSSSS-of-NNNNN.parquet     sparse vectors (BoVW): indices and values per image

and nothing else, so that pandas (``pd.read_parquet(folder)``), ``pyarrow.dataset``, DuckDB
(``'folder/*.parquet'``), Spark and autofaiss (which also reads sub-folders) read it as one data set. What the job
keeps about the features is in the sibling folder ``<folder>.cairn/`` (:func:`side_folder`):

    extract.json or encode.json       the job's record
    manifest-SSSSS-of-NNNNN.parquet   the validated manifest the extraction read
    dead_letters.csv                  the images it could not use, with the reason

The shards' footers carry the ``cairn`` metadata: the method, its config, the dimension.

The record lists every file the job wrote under ``files`` (:func:`record_files`: file name -> bytes, sha256, rows),
so that a shard copied in from elsewhere, truncated or replaced is told from the job's own: a rerun verifies the
checksums before it reuses the outputs (:func:`verify_files`), and every reader of a folder's features refuses
a shard the record does not list or whose size differs (:func:`features_kind`).
"""

from __future__ import annotations

import logging
import os

import pyarrow.parquet as pq

from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.parquet_io import find_shards, footer_sha256, shard_pattern
from pipeline.schemas import cairn_metadata

log = logging.getLogger(__name__)

FEATURE_PREFIX = {"global": "features", "local": "local", "sparse": "sparse"}  # shard name per feature kind
SIDE_SUFFIX = ".cairn"  # <folder>.cairn/ beside a features folder holds what is not features


def side_folder(folder: str) -> str:
    """The folder beside a features folder where its job keeps its record, manifest shards and dead letters:
    ``<folder>.cairn``. CairnError for a folder that has no sibling (a filesystem or bucket root)."""
    remote = fs.has_scheme(folder)
    name = folder.rstrip("/") if remote else os.path.abspath(folder)
    root = "/" not in name.split("://", 1)[1] if remote else name == "/"
    if root:
        raise CairnError(f"--out {folder} is a {'bucket' if remote else 'filesystem'} root; a features folder "
                         f"needs a parent for its {SIDE_SUFFIX} folder: give a folder inside it")
    return name + SIDE_SUFFIX


def side_path(folder: str, name: str) -> str:
    """Where a job keeps ``name`` (its record, the manifest shards' prefix, the dead letters) for the features of
    ``folder``: in :func:`side_folder`."""
    return fs.join(side_folder(folder), name)


def shard_globs(folder: str, kinds: tuple[str, ...] = tuple(FEATURE_PREFIX)) -> list[str]:
    """Glob patterns of the feature shards of ``kinds`` in ``folder``."""
    return [fs.join(fs.escape(folder), f"{FEATURE_PREFIX[kind]}-*") for kind in kinds]


def features_prefix(out: str, kind: str = "global") -> str:
    """Where a job writes features of ``kind`` under OUT (shards ``<prefix>-SSSSS-of-NNNNN.parquet``)."""
    return fs.join(out, FEATURE_PREFIX[kind])


def features_kind(folder: str) -> str:
    """Which kind of features a job folder holds ("global", "local" or "sparse"); CairnError if none, or if its
    shards are not the ones its job recorded (:func:`check_recorded_shards`)."""
    for kind, prefix in FEATURE_PREFIX.items():
        if fs.glob(shard_pattern(fs.join(folder, prefix))):
            check_recorded_shards(folder, kind)
            return kind
    raise CairnError(f"{folder} holds no features (features-*, local-* or sparse-* shards); "
                     "run `cairn extract` (or `cairn encode`) first")


JOB_RECORDS = ("extract.json", "encode.json")  # the records of the jobs that write features folders


def record_files(patterns: list[str] | tuple[str, ...]) -> dict[str, dict]:
    """What a job records of the files it wrote (those matching the glob ``patterns``, each a path): file name ->
    {"bytes", "mtime_ns", "sha256", "rows", "footer_sha256" (Parquet files: from the footer:
    parquet_io.footer_sha256; others: None)}. Reads each local file once; on an object store (gs://, s3://),
    where an object cannot change without a new update time, "sha256" is None: the job's outputs are not
    downloaded again to be hashed."""
    files = {}
    for name, (path, size, mtime) in sorted(_listed(patterns).items()):
        rows, footer = None, None
        if name.endswith(".parquet"):
            with fs.FileSystems.open(path) as f:
                rows = pq.ParquetFile(f).metadata.num_rows
            footer = footer_sha256(path)
        sha = None if fs.has_scheme(path) else fs.sha256(path)
        files[name] = {"bytes": size, "mtime_ns": mtime, "sha256": sha, "rows": rows, "footer_sha256": footer}
    return files


def _listed(patterns: list[str] | tuple[str, ...]) -> dict[str, tuple[str, int, int]]:
    """File name -> (path, size, mtime_ns) of the files matching the glob ``patterns`` (one listing per pattern;
    the names of a job's outputs are unique across the folders it writes)."""
    return {os.path.basename(path): (path, *stat) for pattern in patterns
            for path, stat in fs.glob_stats(pattern).items()}


def verify_files(recorded: dict[str, dict] | None, patterns: list[str] | tuple[str, ...],
                 checksums: bool = True) -> str:
    """Why the files matching the glob ``patterns`` are not the ``recorded`` ones (:func:`record_files`),
    or "" when they are: a file the record does not list (copied in), one it lists that is gone, another size
    (truncated or replaced), another Parquet footer (other rows: two small reads per file), or, with
    ``checksums``, other bytes: every file whose modification time is not the recorded one is read and its
    sha256 compared (a file untouched since the job wrote it is not read again: at a million images the local
    features are far larger than what a rerun should read to decide whether to reuse them)."""
    if recorded is None:
        return "its record lists no files (written before Cairn recorded them)"
    found = _listed(patterns)
    extra = sorted(set(found) - set(recorded))
    if extra:
        return f"{some_names(extra)} not written by the job that recorded it (copied in?)"
    missing = sorted(set(recorded) - set(found))
    if missing:
        return f"{some_names(missing)} missing"
    for name, (path, size, mtime) in sorted(found.items()):
        if size != recorded[name]["bytes"]:
            return f"{name} has {size} bytes where the job wrote {recorded[name]['bytes']} (truncated or replaced)"
        footer = recorded[name].get("footer_sha256")
        if footer and footer_sha256(path) != footer:
            return f"{name} is not the file the job wrote (its Parquet footer differs)"
        if not checksums or mtime == recorded[name].get("mtime_ns"):
            continue
        if recorded[name]["sha256"] is None:  # an object store's object: a new update time is a new object
            return f"{name} was written again after the job wrote it (its update time differs)"
        if fs.sha256(path) != recorded[name]["sha256"]:
            return f"{name} is not the file the job wrote (its sha256 differs)"
    return ""


def some_names(names: list[str], first: int = 3) -> str:
    """The first ``first`` of ``names``, and how many more (for a one-line message)."""
    return ", ".join(names[:first]) + (f" and {len(names) - first} more" if len(names) > first else "")


def record_path(folder: str, name: str) -> str:
    """Where the record ``name`` (extract.json, encode.json) of a features folder is: in its
    :func:`side_folder`, or in the folder itself for one written before the records moved out of it (still
    read; a rerun of its job rewrites it in the new layout)."""
    legacy = fs.join(folder, name)
    if fs.exists(legacy):
        path = side_path(folder, name)
        return legacy if not fs.exists(path) else path
    return side_path(folder, name)


def job_records(folder: str) -> dict[str, dict]:
    """The records of the jobs that wrote a features folder (extract.json, encode.json), by file name."""
    paths = {name: record_path(folder, name) for name in JOB_RECORDS}
    return {name: cfg.load_json(path) for name, path in paths.items() if fs.exists(path)}


def check_recorded_shards(folder: str, kind: str) -> None:
    """CairnError unless the ``kind`` shards in ``folder`` are exactly those its job recorded, each of the size
    and with the Parquet footer it wrote (one listing and two small reads per shard; the checksums of every byte
    are verified when a rerun reuses the folder). A folder with no job record (built by hand) is not checked; one whose record predates the list is
    read with a warning."""
    records = job_records(folder)
    if not records:
        return
    if any("files" not in r for r in records.values()):
        log.warning("%s: %s lists no files (written before Cairn recorded them); its shards are not verified; "
                    "rerun the job that wrote it to record them", folder, " and ".join(records))
        return
    recorded = {name: f for r in records.values() for name, f in r["files"].items()
                if name.startswith(f"{FEATURE_PREFIX[kind]}-")}
    problem = verify_files(recorded, shard_globs(folder, (kind,)), checksums=False)
    if problem:
        raise CairnError(f"{folder}: {problem}; its features are not what {' / '.join(records)} records. Rerun "
                         "the job that wrote the folder (it recomputes what does not match), or remove the file")


def features_metadata(folder: str, kind: str | None = None) -> dict:
    """The ``cairn`` metadata of a folder's feature shards (read from the first shard's footer); CairnError when
    the shards are not the ones its job recorded (:func:`check_recorded_shards`)."""
    if kind:
        check_recorded_shards(folder, kind)
    kind = kind or features_kind(folder)
    with fs.FileSystems.open(find_shards(features_prefix(folder, kind))[0]) as f:
        return cairn_metadata(pq.read_schema(f))


def features_fingerprint(folder: str) -> str:
    """A fingerprint of a features folder's content: the config of the job that wrote it (extract.json or
    encode.json), its row count and the checksums of the feature shards it recorded (so that features extracted
    again from changed images are new to what was trained on them; a shard's time is left out: the same
    content written again is the same features). Cheap at any scale (the record only, no feature bytes read)."""
    shards = tuple(f"{prefix}-" for prefix in FEATURE_PREFIX.values())
    for record in job_records(folder).values():  # the first of JOB_RECORDS there is
        content = {n: f.get("sha256") or f.get("footer_sha256") for n, f in (record.get("files") or {}).items()
                   if n.startswith(shards)}
        return cfg.fingerprint({"config": record.get("config"), "counts": record.get("counts"),
                                **({"shards": content} if content else {})})
    raise CairnError(f"{side_folder(folder)} has no extract.json or encode.json; {folder} was not written by "
                     "`cairn extract/encode`")


def shards_bytes(prefix: str) -> int:
    """Bytes of the shard set ``<prefix>-*-of-*.parquet`` (0 when there is none)."""
    return sum(fs.size(p) for p in fs.glob(shard_pattern(prefix)))


def tree_bytes(folder: str) -> int:
    """Bytes of the files under a local folder (0 for remote ones: not measured)."""
    if fs.has_scheme(folder):
        return 0
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(folder) for n in names)
