"""A corpus of broken and odd inputs mixed into a data set, to check that every job handles them.

:func:`add_bad_inputs` takes a data set (``train.csv`` and ``queries.csv`` beside their images, such as the
synthetic set of ``cairn synth``) and writes ``train-bad.csv`` and ``queries-bad.csv``: the same rows plus one
record of every kind below per split, and ``bad_inputs.csv`` that says which record is which kind and what
a job should make of it. The files live under ``bad/`` next to the manifests; the clean manifests are left
as they were. The same data set gives byte-identical files, so reruns reuse their cached outputs.

Every image variant is made from a real image of the set (a view of its landmark), so the variants a job can
read are genuine views of their landmark: an EXIF-rotated JPEG stores the pixels turned the other way, so
that it shows the original once its orientation is applied; the YCCK JPEG shows the original colours.

Expected outcomes (:data:`KINDS`): ``ok`` (the record is used) or the stage of its dead letter:

    manifest   the row is rejected when the manifest is read (duplicate id, bad landmark_id, empty id)
    read       the file cannot be read (it does not exist)
    decode     the bytes are not a usable image (truncated, empty, not an image, too small, a bomb)

The manifests themselves are odd too: ``train-bad.csv`` starts with a byte-order mark, ends its lines with
CRLF, puts its columns in another order, has an extra ``notes`` column with quoted commas and quotes, and
quotes the paths that hold commas. A manifest without the ``path`` column is written as
``missing-columns.csv``: a job must refuse it with one line that names the columns it needs.
"""

from __future__ import annotations

import csv
import io
import os
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from pipeline import fs

# kind -> (expected outcome, what the record is)
KINDS: dict[str, tuple[str, str]] = {
    "jpeg-truncated": ("decode", "a JPEG cut to half its bytes"),
    "png-truncated": ("decode", "a PNG cut to half its bytes"),
    "jpeg-zero-bytes": ("decode", "an empty file named .jpg"),
    "png-zero-bytes": ("decode", "an empty file named .png"),
    "text-as-jpeg": ("decode", "a text file named .jpg"),
    "html-as-jpeg": ("decode", "an HTML error page named .jpg (a failed download)"),
    "gif-animated": ("ok", "an animated GIF of 3 frames (the first is used)"),
    "webp": ("ok", "a WebP"),
    "jpeg-cmyk": ("ok", "a CMYK JPEG (Adobe, inverted)"),
    "jpeg-ycck": ("ok", "a YCCK JPEG (Adobe transform 2)"),
    "jpeg-grey": ("ok", "a greyscale JPEG"),
    "png-16bit-rgb": ("ok", "a 16-bit RGB PNG"),
    "png-16bit-grey": ("ok", "a 16-bit greyscale PNG"),
    "png-palette-alpha": ("ok", "a palette PNG with a transparent colour"),
    "png-rgba": ("ok", "an RGBA PNG with a transparent border"),
    **{f"jpeg-exif-{o}": ("ok", f"a JPEG with EXIF orientation {o}") for o in range(1, 9)},
    "png-1x1": ("decode", "a 1x1 PNG"),
    "png-10x100000": ("decode", "a 10x100000 PNG (too thin to use)"),
    "png-bomb": ("decode", "a PNG declaring 100000x100000 pixels (decompression bomb)"),
    "missing-file": ("read", "a path that does not exist"),
    "path-spaces-non-ascii": ("ok", "a JPEG whose path has spaces and non-ASCII characters"),
    "path-quoted-comma": ("ok", "a JPEG whose path has a comma (quoted in the CSV)"),
    "path-absolute": ("ok", "a JPEG given by its absolute path"),
    "duplicate-id": ("manifest", "a row repeating an earlier row's id"),
    "empty-landmark-id": ("ok", "a row with an empty landmark_id (no landmark / unknown)"),
    "landmark-id-text": ("manifest", "a landmark_id that is a word"),
    "landmark-id-float": ("manifest", "a landmark_id with a fraction"),
    "landmark-id-negative": ("manifest", "a negative landmark_id"),
    "empty-id": ("manifest", "a row without an id"),
}
BAD_FOLDER = "bad"
COLUMNS = ("id", "split", "kind", "expected", "description", "path")

# EXIF orientation -> the transpose that shows the stored pixels upright (PIL's ImageOps.exif_transpose)
_SHOW = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_90}
_UNDO = {Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90}


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def exif_jpeg(rgb: np.ndarray, orientation: int) -> bytes:
    """A JPEG with EXIF ``orientation`` whose pixels are stored so that, oriented, it shows ``rgb``."""
    img = Image.fromarray(rgb)
    show = _SHOW.get(orientation)
    if show is not None:
        img = img.transpose(_UNDO.get(show, show))  # the inverse of what a viewer applies
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(img, "JPEG", quality=92, exif=exif.tobytes())


def ycck_jpeg(rgb: np.ndarray) -> bytes:
    """A 4-channel Adobe JPEG in YCCK (transform 2) that decodes to ``rgb``.

    Pillow writes Adobe CMYK (inverted); the components hold the YCbCr of the inverted colours with K = 255,
    which is what a YCCK decoder (libjpeg) turns back into ``rgb``; then the APP14 marker's transform byte is
    set to 2.
    """
    inv = 255.0 - rgb.astype(np.float64)
    r, g, b = inv[..., 0], inv[..., 1], inv[..., 2]
    ycc = np.stack([0.299 * r + 0.587 * g + 0.114 * b,
                    128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
                    128 + 0.5 * r - 0.418688 * g - 0.081312 * b], axis=-1)
    k = np.full(rgb.shape[:2] + (1,), 255.0)
    cmyk = 255 - np.clip(np.rint(np.concatenate([ycc, k], axis=-1)), 0, 255).astype(np.uint8)
    data = bytearray(_encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95))
    at = data.find(b"\xff\xee")
    if at < 0 or data[at + 4:at + 9] != b"Adobe":
        raise RuntimeError("Pillow wrote no Adobe APP14 marker; cannot make a YCCK JPEG")
    data[at + 4 + 5 + 6] = 2  # marker, length, "Adobe", version, flags0, flags1, then the transform byte
    return bytes(data)


def png_16bit_rgb(rgb: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one; the chunks are written here)."""
    h, w, _ = rgb.shape
    deep = (rgb.astype(">u2") * 257).reshape(h, w * 3)
    raw = b"".join(b"\x00" + row.tobytes() for row in deep)
    return _png_chunks(w, h, bit_depth=16, colour_type=2, idat=zlib.compress(raw, 6))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG declaring ``width`` x ``height`` pixels; only the declared size is ever read."""
    return _png_chunks(width, height, bit_depth=8, colour_type=2, idat=zlib.compress(b"\x00" * 64))


def _png_chunks(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _animated_gif(rgb: np.ndarray) -> bytes:
    frames = [Image.fromarray(rgb)] + [Image.fromarray(np.roll(rgb, 7 * i, axis=1)) for i in (1, 2)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _palette_alpha(rgb: np.ndarray) -> bytes:
    img = Image.fromarray(rgb).quantize(colors=255)  # palette index 255 stays free for the transparent colour
    pixels = np.array(img)
    pixels[:2, :] = 255
    pal = Image.fromarray(pixels, "P")
    pal.putpalette(img.getpalette()[: 255 * 3] + [255, 0, 255])
    return _encode(pal, "PNG", transparency=255)


def _rgba(rgb: np.ndarray) -> bytes:
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:2, :] = alpha[-2:, :] = 0
    return _encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG")


def image_variants(rgb: np.ndarray, kinds=None) -> dict[str, tuple[str, bytes]]:
    """kind -> (file extension, encoded bytes) for every kind that is a file (of ``kinds``, or all), made from
    ``rgb`` ([H, W, 3] uint8)."""
    img = Image.fromarray(rgb)
    jpeg, png = _encode(img, "JPEG", quality=92), _encode(img, "PNG")
    grey16 = (np.asarray(img.convert("L")).astype(np.uint16) * 257)
    makers: dict[str, Callable[[], tuple[str, bytes]]] = {
        "jpeg-truncated": lambda: (".jpg", jpeg[: len(jpeg) // 2]),
        "png-truncated": lambda: (".png", png[: len(png) // 2]),
        "jpeg-zero-bytes": lambda: (".jpg", b""),
        "png-zero-bytes": lambda: (".png", b""),
        "text-as-jpeg": lambda: (".jpg", b"id,url,landmark_id\nthis is not an image\n"),
        "html-as-jpeg": lambda: (".jpg", b"<!DOCTYPE html>\n<html><body><h1>404 Not Found</h1></body></html>\n"),
        "gif-animated": lambda: (".gif", _animated_gif(rgb)),
        "webp": lambda: (".webp", _encode(img, "WEBP", quality=90)),
        "jpeg-cmyk": lambda: (".jpg", _encode(img.convert("CMYK"), "JPEG", quality=92)),
        "jpeg-ycck": lambda: (".jpg", ycck_jpeg(rgb)),
        "jpeg-grey": lambda: (".jpg", _encode(img.convert("L"), "JPEG", quality=92)),
        "png-16bit-rgb": lambda: (".png", png_16bit_rgb(rgb)),
        "png-16bit-grey": lambda: (".png", _encode(Image.fromarray(grey16), "PNG")),
        "png-palette-alpha": lambda: (".png", _palette_alpha(rgb)),
        "png-rgba": lambda: (".png", _rgba(rgb)),
        **{f"jpeg-exif-{o}": (lambda o=o: (".jpg", exif_jpeg(rgb, o))) for o in range(1, 9)},
        "png-1x1": lambda: (".png", _encode(Image.new("RGB", (1, 1), (90, 120, 200)), "PNG")),
        "png-10x100000": lambda: (".png", _encode(Image.new("RGB", (10, 100_000), (90, 120, 200)), "PNG",
                                                  compress_level=9)),
        "png-bomb": lambda: (".png", bomb_png()),
    }
    return {kind: make() for kind, make in makers.items() if kinds is None or kind in kinds}


def _read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def _split_records(folder: str, split: str, rows: list[dict], rng: np.random.Generator) -> tuple[list, list]:
    """(manifest rows [id, path, landmark_id], described records) of the bad inputs of one split."""
    labelled = [r for r in rows if r["landmark_id"].strip()]
    if not labelled:
        raise ValueError(f"{split}: the data set has no image with a landmark to make bad inputs from")
    out_rows, records = [], []
    sub = os.path.join(BAD_FOLDER, split)
    os.makedirs(os.path.join(folder, sub), exist_ok=True)

    def add(kind: str, image_id: str, path: str, label: str) -> None:
        out_rows.append([image_id, path, label])
        expected, description = KINDS[kind]
        records.append([image_id, split, kind, expected, description, path])

    picks = rng.choice(len(labelled), size=len(KINDS), replace=True)
    base_of = {kind: labelled[int(i)] for kind, i in zip(KINDS, picks, strict=True)}
    decoded: dict[str, np.ndarray] = {}
    for kind in KINDS:
        base = base_of[kind]
        image_id = f"{split}-{kind}"
        if base["path"] not in decoded:
            with Image.open(os.path.join(folder, base["path"])) as im:
                decoded[base["path"]] = np.asarray(im.convert("RGB"))
        variants = image_variants(decoded[base["path"]], (kind,))
        if kind in variants:
            ext, data = variants[kind]
            path = f"{sub}/{kind}{ext}"
            _write_if_changed(os.path.join(folder, path), data)
            add(kind, image_id, path, base["landmark_id"])
        elif kind.startswith("path-"):
            name = {"path-spaces-non-ascii": "Torre dos Clérigos — vista 2 ü.jpg",
                    "path-quoted-comma": 'Ribeira, "north" side.jpg', "path-absolute": "absolute.jpg"}[kind]
            with open(os.path.join(folder, base["path"]), "rb") as f:
                _write_if_changed(os.path.join(folder, sub, name), f.read())
            path = os.path.abspath(os.path.join(folder, sub, name)) if kind == "path-absolute" else f"{sub}/{name}"
            add(kind, image_id, path, base["landmark_id"])
        elif kind == "missing-file":
            add(kind, image_id, f"{sub}/no-such-image.jpg", base["landmark_id"])
        elif kind == "duplicate-id":
            add(kind, rows[0]["id"], base["path"], base["landmark_id"])
        elif kind == "empty-id":
            add(kind, "", base["path"], base["landmark_id"])
        else:
            label = {"empty-landmark-id": "", "landmark-id-text": "tower", "landmark-id-float": "3.5",
                     "landmark-id-negative": "-4"}[kind]
            add(kind, image_id, base["path"], label)
    return out_rows, records


def _write_if_changed(path: str, data: bytes) -> None:
    """Write ``path`` whole (or not at all: a full disk, a killed run) unless it already holds ``data``: a file
    written again gets a new modification time, and every job that read it would take it for a changed image
    and compute again (a rerun of `cairn demo --bad-inputs` extracted half of its images again)."""
    if os.path.isfile(path) and os.path.getsize(path) == len(data):
        with open(path, "rb") as f:
            if f.read() == data:
                return
    fs.write_bytes(path, data)


def add_bad_inputs(folder: str, seed: int = 0) -> dict[str, str]:
    """Write the bad-input manifests of the data set in ``folder``; returns their paths by name.

    Returns {"train": ..., "queries": ..., "records": bad_inputs.csv, "missing_columns": ...}.
    """
    rng = np.random.default_rng(seed)
    paths = {"train": os.path.join(folder, "train-bad.csv"), "queries": os.path.join(folder, "queries-bad.csv"),
             "records": os.path.join(folder, "bad_inputs.csv"),
             "missing_columns": os.path.join(folder, BAD_FOLDER, "missing-columns.csv")}
    described = []
    for split in ("train", "queries"):
        rows = _read_rows(os.path.join(folder, f"{split}.csv"))
        bad_rows, records = _split_records(folder, split, rows, rng)
        described += records
        buf = io.StringIO()
        if split == "train":  # BOM, CRLF, another column order, an extra column with quoted commas and quotes
            w = csv.writer(buf, lineterminator="\r\n")
            w.writerow(["landmark_id", "notes", "id", "path"])
            for r in rows:
                w.writerow([r["landmark_id"], "clean row, from the set", r["id"], r["path"]])
            for image_id, path, label in bad_rows:
                w.writerow([label, f'bad input: "{image_id}", see bad_inputs.csv', image_id, path])
            text = "\ufeff" + buf.getvalue()
        else:
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["id", "path", "landmark_id"])
            w.writerows([r["id"], r["path"], r["landmark_id"]] for r in rows)
            w.writerows(bad_rows)
            text = buf.getvalue()
        _write_if_changed(paths[split], text.encode("utf-8"))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows(described)
    _write_if_changed(paths["records"], buf.getvalue().encode("utf-8"))
    _write_if_changed(paths["missing_columns"], b"id,landmark_id\nimage-1,3\n")
    return paths
