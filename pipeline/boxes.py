"""Landmark box files: the annotations a detector trains on and is scored against.

Three formats are read, each matched to a manifest's images:

* **CSV by id**: ``id,xmin,ymin,xmax,ymax`` and optionally ``width,height`` (the size of the image the box was
  drawn on; the synthetic set's ``boxes.csv``). One row per box; an id may have several.
* **CSV by path**: ``image_path`` (or ``path``) instead of ``id``, relative to the CSV's folder (the Porto set's
  ``boxes.csv``: ``image_path,label,xmin,ymin,xmax,ymax,width,height``), matched to the manifest's paths.
* **PASCAL VOC XML**: one ``.xml`` file or a folder of them; ``<filename>`` (its stem or its name is matched to
  the manifest's ids, then to its file names), ``<size>``, and one ``<object><bndbox>`` per box. VOC pixel
  indices start at 1 and include the last pixel, so (xmin - 1, ymin - 1, xmax, ymax) are the continuous
  coordinates. ``classes`` keeps the objects of those names only.

Boxes are (xmin, ymin, xmax, ymax) in continuous pixels of the annotated image; :func:`scale_boxes` maps them
onto the decoded image (decoding may shrink it). A row that cannot be used (no such image, numbers that are not
numbers, an empty or inverted box) is listed in ``problems`` with its reason, never silently dropped.
"""

from __future__ import annotations

import csv
import io
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import numpy as np

from pipeline import fs
from pipeline.errors import CairnError


@dataclass
class BoxSet:
    """Boxes per image id of a manifest, with the size they refer to (None: the image's own decoded size)."""

    boxes: dict[str, np.ndarray] = field(default_factory=dict)  # id -> [N, 4] float32
    sizes: dict[str, tuple[float, float]] = field(default_factory=dict)  # id -> (width, height) annotated on
    problems: list[tuple[str, str]] = field(default_factory=list)  # (where, reason) of unusable rows
    source: str = ""

    def add(self, image_id: str, box, size: tuple[float, float] | None, where: str) -> None:
        x0, y0, x1, y1 = box
        if not all(np.isfinite(v) for v in box) or x1 <= x0 or y1 <= y0:
            self.problems.append((where, f"empty or inverted box {tuple(box)}"))
            return
        old = self.boxes.get(image_id)
        row = np.array([[x0, y0, x1, y1]], np.float32)
        self.boxes[image_id] = row if old is None else np.concatenate([old, row])
        if size is not None:
            self.sizes[image_id] = size

    def for_image(self, image_id: str, width: int, height: int) -> np.ndarray:
        """[N, 4] boxes of ``image_id`` in the pixels of its decoded image (``width`` x ``height``)."""
        b = self.boxes.get(image_id)
        if b is None:
            return np.zeros((0, 4), np.float32)
        return scale_boxes(b, self.sizes.get(image_id), (width, height))

    def __len__(self) -> int:
        return len(self.boxes)


def scale_boxes(boxes: np.ndarray, annotated: tuple[float, float] | None, decoded: tuple[int, int]) -> np.ndarray:
    """Boxes drawn on an image of size ``annotated`` (width, height; None = the same) mapped onto ``decoded``."""
    out = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    if annotated is not None and annotated[0] > 0 and annotated[1] > 0:
        out[:, [0, 2]] *= decoded[0] / annotated[0]
        out[:, [1, 3]] *= decoded[1] / annotated[1]
    return out


def _number(text) -> float:
    return float(str(text).strip())


def read_boxes(path: str, manifest, classes: tuple[str, ...] = ()) -> BoxSet:
    """The boxes of ``path`` (a CSV or VOC XML file, or a folder of VOC XML files) for the images of
    ``manifest`` (pipeline.manifest.Manifest). Raises CairnError when the file cannot be read or matches no image."""
    if not fs.exists(path):
        raise CairnError(f"box file {path} does not exist; give a CSV (id,xmin,ymin,xmax,ymax) or PASCAL VOC XML")
    if os.path.isdir(path) or path.lower().endswith(".xml"):
        found = _read_voc(path, manifest, classes)
    else:
        found = _read_csv(path, manifest)
    if not found.boxes:
        raise CairnError(f"{path}: no box matches an image of the manifest ({len(found.problems)} rows unusable"
                         + (f", e.g. {found.problems[0][0]}: {found.problems[0][1]}" if found.problems else "")
                         + "); ids (or image paths) must be the manifest's")
    return found


def _read_csv(path: str, manifest) -> BoxSet:
    try:
        text = fs.read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CairnError(f"box file {path} is not UTF-8 text ({e})") from e
    reader = csv.DictReader(io.StringIO(text))
    names = {(n or "").strip().lower(): n for n in reader.fieldnames or []}
    key = next((k for k in ("id", "image_path", "path") if k in names), None)
    missing = [c for c in ("xmin", "ymin", "xmax", "ymax") if c not in names]
    if key is None or missing:
        raise CairnError(f"box file {path} has columns {sorted(names)}; it needs id (or image_path) and "
                         "xmin,ymin,xmax,ymax (optionally width,height), e.g. 'id,xmin,ymin,xmax,ymax'")
    known = set(manifest.ids)
    by_path = {}
    if key != "id":
        base = fs.dirname(fs.absolute(path))
        by_path = {os.path.normpath(p): i for i, p in zip(manifest.ids, manifest.paths, strict=True)}
    found = BoxSet(source=fs.absolute(path))
    for line, row in enumerate(reader, start=2):
        where = f"{path}:{line}"
        raw = (row.get(names[key]) or "").strip()
        if key == "id":
            image_id = raw
        else:
            image_id = by_path.get(os.path.normpath(raw if os.path.isabs(raw) else os.path.join(base, raw)))
        if not image_id or image_id not in known:
            found.problems.append((where, f"no manifest image {raw!r}"))
            continue
        try:
            box = tuple(_number(row[names[c]]) for c in ("xmin", "ymin", "xmax", "ymax"))
            size = None
            if "width" in names and "height" in names and (row.get(names["width"]) or "").strip():
                size = (_number(row[names["width"]]), _number(row[names["height"]]))
        except (TypeError, ValueError):
            found.problems.append((where, "a coordinate or size is not a number"))
            continue
        found.add(image_id, box, size, where)
    return found


def _read_voc(path: str, manifest, classes: tuple[str, ...]) -> BoxSet:
    files = [path] if not os.path.isdir(path) else sorted(
        os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(".xml"))
    if not files:
        raise CairnError(f"{path} holds no .xml file (PASCAL VOC annotations)")
    known = set(manifest.ids)
    by_name = {os.path.basename(p): i for i, p in zip(manifest.ids, manifest.paths, strict=True)}
    found = BoxSet(source=fs.absolute(path))
    for f in files:
        try:
            root = ET.fromstring(fs.read_bytes(f))
        except ET.ParseError as e:
            found.problems.append((f, f"not XML: {e}"))
            continue
        filename = (root.findtext("filename") or os.path.basename(f)[:-4]).strip()
        stem = os.path.splitext(filename)[0]
        image_id = next((c for c in (stem, filename) if c in known), None) or by_name.get(filename)
        if image_id is None:
            found.problems.append((f, f"no manifest image {filename!r}"))
            continue
        size = None
        with_size = root.find("size")
        if with_size is not None:
            try:
                size = (_number(with_size.findtext("width")), _number(with_size.findtext("height")))
            except (TypeError, ValueError):
                size = None
        for k, obj in enumerate(root.iter("object")):
            if classes and (obj.findtext("name") or "").strip() not in classes:
                continue
            bb = obj.find("bndbox")
            try:
                x0, y0, x1, y1 = (_number(bb.findtext(c)) for c in ("xmin", "ymin", "xmax", "ymax"))
            except (AttributeError, TypeError, ValueError):
                found.problems.append((f"{f} object {k}", "no numeric bndbox"))
                continue
            found.add(image_id, (x0 - 1, y0 - 1, x1, y1), size, f"{f} object {k}")
    return found


def voc_xml(filename: str, width: int, height: int, boxes, name: str = "landmark") -> str:
    """A PASCAL VOC annotation of ``boxes`` ([N, 4] continuous pixels) on an image (for exports and tests)."""
    objects = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{int(round(b[0])) + 1}</xmin>"
        f"<ymin>{int(round(b[1])) + 1}</ymin><xmax>{int(round(b[2]))}</xmax><ymax>{int(round(b[3]))}</ymax>"
        "</bndbox></object>" for b in np.asarray(boxes).reshape(-1, 4))
    return (f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{objects}</annotation>")
