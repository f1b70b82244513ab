"""Manifest readers: which images a job works on, with their ids and landmark labels.

Three sources give the same :class:`Manifest`:

* **CSV** with a header and the columns ``id``, ``path`` (``url`` is accepted instead) and optionally
  ``landmark_id``. Paths are relative to the manifest's folder, absolute, or any Beam filesystem path
  (``gs://...``). An empty ``landmark_id`` means "no landmark / unknown"; so does a manifest without that
  column (as Google Landmarks' ``test.csv``). Extra columns are ignored. A byte-order mark, CRLF line ends and
  quoted fields are handled.
* **A class-per-folder tree**: ``ROOT/<class>/<image>``. Integer folder names are the landmark ids; other names
  get a stable id derived from the name alone (:func:`class_id`), so that a train tree and a query tree agree on
  every class they share; ``label_names`` maps ids back to names. Image ids are ``<class>/<file stem>``.
* **Parquet** with the same columns as the CSV.

Problems with the whole file (unreadable, not UTF-8, no rows, missing or repeated columns) raise
:class:`ManifestError`. Problems with one row (empty id or path, a duplicate id, a landmark_id that is not a
non-negative integer written with the ASCII digits 0-9 only) become dead letters at stage ``manifest``; the first
row with a given id wins.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import DeadLetter, ManifestError
from pipeline.parquet_io import read_file

NO_LANDMARK = -1  # label used in numpy arrays for "no landmark / unknown"; manifests only hold ids >= 0
# a landmark id as text: ASCII digits only (Python's int() also takes "6_970", "+5" and other scripts' digits)
LANDMARK_ID = re.compile(r"[0-9]+")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("landmark_id", pa.int64(), nullable=True),
    ]
)


@dataclass
class Manifest:
    """Validated manifest rows plus the rows that were rejected."""

    source: str  # where it was read from
    ids: list[str] = field(default_factory=list)  # unique image ids, in file order
    paths: list[str] = field(default_factory=list)  # resolved image paths, aligned with ids
    labels: list[int | None] = field(default_factory=list)  # landmark ids (None = no landmark / unknown)
    dead_letters: list[DeadLetter] = field(default_factory=list)  # rejected rows
    label_names: dict[int, str] = field(default_factory=dict)  # landmark id -> class name (folder trees)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def total_rows(self) -> int:
        """Rows read from the source: accepted + rejected."""
        return len(self.ids) + len(self.dead_letters)

    def records(self) -> Iterator[tuple[str, str, int | None]]:
        yield from zip(self.ids, self.paths, self.labels, strict=True)

    def label_of(self) -> dict[str, int | None]:
        return dict(zip(self.ids, self.labels, strict=True))

    def to_table(self) -> pa.Table:
        return pa.table({"id": self.ids, "path": self.paths, "landmark_id": self.labels}, schema=MANIFEST_SCHEMA)

    def num_landmark_images(self) -> int:
        return sum(label is not None for label in self.labels)

    def to_table_with_stats(self) -> pa.Table:
        """:meth:`to_table` plus each image file's ``size`` and ``mtime_ns`` now (null: not there), one stat per
        file (pipeline.fs.stat_files): what a job records of its inputs so that a rerun can tell whether they
        changed (:func:`changed_images`)."""
        stats = fs.stat_files(self.paths)
        table = self.to_table().append_column("size", pa.array([s and s[0] for s in stats], pa.int64())) \
            .append_column("mtime_ns", pa.array([s and s[1] for s in stats], pa.int64()))
        return table.replace_schema_metadata({b"cairn": json.dumps({
            "kind": "manifest", "source": self.source,
            "columns": {"id": "image id", "path": "the image file, resolved", "landmark_id": "null: no landmark",
                        "size": "bytes when the job read it (null: missing)",
                        "mtime_ns": "modification time then, in ns"}}, allow_nan=False).encode()})


class _Builder:
    """Accumulates rows with the per-row checks shared by every reader."""

    def __init__(self, source: str):
        self.manifest = Manifest(source=source)
        self._first_seen: dict[str, str] = {}

    def add(self, image_id, path, landmark_id, where: str) -> None:
        image_id = "" if image_id is None else str(image_id).strip()
        path = "" if path is None else str(path).strip()
        m = self.manifest
        if not image_id:
            m.dead_letters.append(DeadLetter("", "manifest", "empty id", where))
            return
        if image_id in self._first_seen:
            m.dead_letters.append(
                DeadLetter(image_id, "manifest", f"duplicate id (first seen at {self._first_seen[image_id]})", where)
            )
            return
        if not path:
            m.dead_letters.append(DeadLetter(image_id, "manifest", "empty path", where))
            return
        label, problem = parse_landmark_id(landmark_id)
        if problem:
            m.dead_letters.append(DeadLetter(image_id, "manifest", problem, where))
            return
        self._first_seen[image_id] = where
        m.ids.append(image_id)
        m.paths.append(path)
        m.labels.append(label)


def parse_landmark_id(value) -> tuple[int | None, str]:
    """Parse a landmark_id cell: returns (label or None, problem or "")."""
    if value is None:
        return None, ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value != value:  # NaN from a Parquet float column
            return None, ""
        if float(value).is_integer() and 0 <= value < 2**63:
            return int(value), ""
        return None, f"landmark_id {value!r} is not a non-negative integer"
    text = str(value).strip()
    if not text:
        return None, ""
    if text.startswith("-") and LANDMARK_ID.fullmatch(text[1:]):
        return None, f"landmark_id {text} is negative"
    if not LANDMARK_ID.fullmatch(text):
        return None, f"landmark_id {text!r} is not an integer written with the digits 0-9 only"
    label = int(text)
    if label >= 2**63:
        return None, f"landmark_id {label} does not fit in 64 bits"
    return label, ""


def class_id(name: str) -> int:
    """A stable landmark id for a class folder name: the first 12 hex digits of its SHA-1 (48 bits).

    The same name gives the same id in every manifest, whatever other classes are present.
    """
    return int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:12], 16)


def _resolve(path: str, base: str) -> str:
    if fs.has_scheme(path) or os.path.isabs(path):
        return path
    return fs.join(base, path)


def _pick_columns(columns: list[str], source: str) -> tuple[str, str, str | None]:
    """(id, path, landmark_id or None) column names of a header; ManifestError for a header that lacks one or
    names a column twice (the reader would silently take one of the two)."""
    seen: dict[str, str] = {}
    for c in columns:
        key = "" if c is None else c.strip().lower()
        if key and key in seen:
            raise ManifestError(f"manifest {source} has two columns named {key!r} ({seen[key]!r} and {c!r}); "
                                "rename or remove one of them in the header row")
        seen[key] = c
    names = {c.strip().lower(): c for c in columns if c is not None}
    missing = [c for c in ("id",) if c not in names]
    path_col = names.get("path") or names.get("url")
    if missing or path_col is None:
        raise ManifestError(
            f"manifest {source} has columns {sorted(names)}; it needs 'id' and 'path' (or 'url'), and optionally "
            "'landmark_id'. Fix the header row, e.g. 'id,path,landmark_id'."
        )
    return names["id"], path_col, names.get("landmark_id")


def read_csv_manifest(path: str) -> Manifest:
    """Read an ``id,path[,landmark_id]`` CSV manifest (see the module docstring)."""
    try:
        raw = fs.read_bytes(path)
    except Exception as e:  # noqa: BLE001 - any filesystem error means the same thing to the user
        raise ManifestError(f"cannot read manifest {path}: {e}. Check the path.") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest {path} is not UTF-8 text ({e}); save it as UTF-8 CSV.") from e
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise ManifestError(f"manifest {path} is empty; it needs a header row 'id,path,landmark_id' and rows.")
    id_col, path_col, label_col = _pick_columns(list(reader.fieldnames), path)
    builder = _Builder(path)
    base = fs.dirname(path)
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if any("\n" in v or "\r" in v for v in row.values() if isinstance(v, str)):
                # a quoted field ran over line ends: with an unbalanced quote, the rows after it are swallowed
                raise ManifestError(
                    f"{where}: a quoted field holds a line break, which usually means an unbalanced double "
                    "quote (the rows after it would be lost); fix the quoting of that row"
                )
            raw_path = row.get(path_col)
            resolved = _resolve(raw_path.strip(), base) if raw_path and raw_path.strip() else raw_path
            builder.add(row.get(id_col), resolved, row.get(label_col) if label_col else None, where)
    except csv.Error as e:
        raise ManifestError(f"{path}:{reader.line_num + 1}: the CSV cannot be parsed ({e}); fix that row") from e
    return _finish(builder)


def read_parquet_manifest(path: str) -> Manifest:
    """Read a Parquet manifest with the CSV manifest's columns."""
    try:
        with fs.FileSystems.open(path) as f:
            table = read_file(f)
    except Exception as e:  # noqa: BLE001
        raise ManifestError(f"cannot read Parquet manifest {path}: {e}. Check the path and the file.") from e
    id_col, path_col, label_col = _pick_columns(table.column_names, path)
    ids = table.column(id_col).to_pylist()
    paths = table.column(path_col).to_pylist()
    labels = table.column(label_col).to_pylist() if label_col else [None] * len(ids)
    builder = _Builder(path)
    base = fs.dirname(path)
    for i, (image_id, p, label) in enumerate(zip(ids, paths, labels, strict=True)):
        p = None if p is None else str(p)
        resolved = _resolve(p.strip(), base) if p and p.strip() else p
        builder.add(image_id, resolved, label, f"{path}:row {i}")
    return _finish(builder)


def read_folder_manifest(root: str) -> Manifest:
    """Read a class-per-folder image tree ``ROOT/<class>/<image>``."""
    files = [p for p in fs.glob(fs.join(fs.escape(root), "*", "*")) if p.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise ManifestError(
            f"no images found under {root}/<class>/ (extensions {', '.join(IMAGE_EXTENSIONS)}); "
            "a folder manifest needs one sub-folder per landmark."
        )
    classes = sorted({os.path.basename(fs.dirname(p)) for p in files})
    if all(LANDMARK_ID.fullmatch(c) for c in classes):
        class_ids = {c: int(c) for c in classes}
        names = {}
    else:
        class_ids = {c: class_id(c) for c in classes}
        names = {i: c for c, i in class_ids.items()}
        if len(names) != len(classes):
            raise ManifestError(f"two class folders under {root} hash to the same id; rename one of them")
    builder = _Builder(root)
    for p in files:
        cls = os.path.basename(fs.dirname(p))
        stem = os.path.splitext(os.path.basename(p))[0]
        builder.add(f"{cls}/{stem}", p, class_ids[cls], p)
    builder.manifest.label_names = names
    return _finish(builder)


def _finish(builder: _Builder) -> Manifest:
    m = builder.manifest
    if m.total_rows == 0:
        raise ManifestError(f"manifest {m.source} has no rows; add one row per image.")
    return m


def manifest_fingerprint(path: str, manifest: Manifest | None = None) -> str:
    """A content fingerprint: of the file's bytes, or for a folder tree of its (id, path, label) rows.

    ``manifest`` is the already-read manifest of ``path``, to avoid listing a folder twice.
    """
    if fs.is_local_dir(path):
        return cfg.fingerprint(list((manifest or read_folder_manifest(path)).records()))
    return cfg.file_fingerprint(path)


def changed_images(table: pa.Table) -> list[tuple[str, str]] | None:
    """(id, path) of the images whose file is not as ``table`` (from :meth:`Manifest.to_table_with_stats`)
    recorded it: another size or modification time, gone, or there now when it was not. One stat per file, no
    image read. None when the table has no stats (written before Cairn recorded them): nothing can be told."""
    if "size" not in table.column_names or "mtime_ns" not in table.column_names:
        return None
    ids, paths = table.column("id").to_pylist(), table.column("path").to_pylist()
    recorded = zip(table.column("size").to_pylist(), table.column("mtime_ns").to_pylist(), strict=True)
    now = fs.stat_files(paths)
    return [(i, p) for i, p, (size, mtime), stat in zip(ids, paths, recorded, now, strict=True)
            if (stat is None) != (size is None) or (stat is not None and stat != (size, mtime))]


def read_manifest(path: str) -> Manifest:
    """Read a manifest of any supported kind: a folder tree, a ``.parquet`` file, or a CSV."""
    if fs.is_local_dir(path):
        return read_folder_manifest(path)
    if not fs.exists(path):
        raise ManifestError(f"manifest {path} does not exist; give a CSV, a Parquet file or an image folder.")
    if path.lower().endswith(".parquet"):
        return read_parquet_manifest(path)
    return read_csv_manifest(path)
