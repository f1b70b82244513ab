"""Fuzzing (hypothesis) of the two readers every job starts with: the manifest reader and the image loader.

Whatever the bytes, the manifest reader returns a manifest whose rows add up, or raises ManifestError; the image
loader returns an RGB uint8 array within the size limits, or raises ImageError. Nothing else may escape.

The budget is bounded for CI: CAIRN_FUZZ_EXAMPLES examples per test (default 150) with a fixed seed, so a run
is repeatable; set CAIRN_FUZZ_EXAMPLES=5000 CAIRN_FUZZ_RANDOM=1 for a longer, fresh search.
"""

import csv
import io
import os

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.badinput import bomb_png, image_variants
from pipeline.errors import ManifestError
from pipeline.images import DecodeConfig, ImageError, decode_image
from pipeline.manifest import read_csv_manifest

FUZZ = settings(max_examples=int(os.environ.get("CAIRN_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                derandomize=not os.environ.get("CAIRN_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------------------------------------------------------
# the manifest reader

CELLS = st.one_of(
    st.sampled_from(["", " ", "12", "-3", "3.5", "1e3", "tower", "00", "9" * 25, "images/a.jpg", "a, b.jpg",
                     'say "hi"', "Sé ü — 東京", "\t", "0x1F"]),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=12),
)
HEADERS = st.sampled_from([["id", "path", "landmark_id"], ["id", "url", "landmark_id"], ["id", "path"],
                           ["landmark_id", "path", "id", "notes"], [" ID ", "Path", "Landmark_Id"],
                           ["id", "landmark_id"], ["path"], ["id", "id", "path"], []])


@st.composite
def csv_manifests(draw) -> bytes:
    """CSV files as users make them: a header, rows of odd cells, BOMs, CRLF, stray quotes, ragged rows."""
    header = draw(HEADERS)
    rows = draw(st.lists(st.lists(CELLS, min_size=max(0, len(header) - 1), max_size=len(header) + 1), max_size=8))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    if header:
        w.writerow(header)
    w.writerows(rows)
    text = buf.getvalue()
    if draw(st.booleans()):  # damage: a stray quote, a cut, or a NUL somewhere
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(['"', "", "\x00", "\n", ","])) + text[at + draw(st.integers(0, 3)):]
    data = text.encode("utf-8")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    return data


def _check_manifest(tmp_path, data: bytes) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(data)
    try:
        m = read_csv_manifest(str(path))
    except ManifestError as e:
        assert str(e)  # a message that says what to fix
        return
    assert m.total_rows >= 1 and len(m.ids) == len(m.paths) == len(m.labels)
    assert len(set(m.ids)) == len(m.ids) and all(i and p for i, p in zip(m.ids, m.paths, strict=True))
    assert all(label is None or (isinstance(label, int) and 0 <= label < 2**63) for label in m.labels)
    assert all(d.stage == "manifest" and d.reason for d in m.dead_letters)
    # every data record of the file is accounted for: accepted or a dead letter
    records = [r for r in csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")) if r]  # blank lines skipped
    assert m.total_rows == len(records) - 1


@FUZZ
@given(data=csv_manifests())
@example(data=b"id,path,landmark_id\r\n")  # a header and no rows
@example(data=b'\xef\xbb\xbfid,path\r\na,"b, c.jpg"\r\n')
def test_manifest_reader_on_csv_like_input(tmp_path, data):
    _check_manifest(tmp_path, data)


@FUZZ
@given(data=st.binary(max_size=300))
@example(data=b"\xff\xfe" + "id,path\n".encode("utf-16-le"))  # UTF-16 from a spreadsheet
@example(data=b"")
def test_manifest_reader_on_arbitrary_bytes(tmp_path, data):
    _check_manifest(tmp_path, data)


# ---------------------------------------------------------------------------------------------------------------
# the image loader

_PHOTO = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
SEEDS = [data for kind, (_, data) in sorted(image_variants(_PHOTO).items()) if data and "bomb" not in kind
         and "100000" not in kind]
_tiff = io.BytesIO()
Image.fromarray(_PHOTO).save(_tiff, "TIFF")
_bmp = io.BytesIO()
Image.fromarray(_PHOTO).save(_bmp, "BMP")
SEEDS += [_tiff.getvalue(), _bmp.getvalue(), bomb_png()]
CONFIG = DecodeConfig(max_side=64, max_pixels=4_000_000, min_side=8)


def _check_image(data: bytes) -> None:
    try:
        img = decode_image(data, CONFIG)
    except ImageError as e:
        assert e.stage == "decode" and e.reason
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.flags.c_contiguous
    assert CONFIG.min_side <= min(img.shape[:2]) and max(img.shape[:2]) <= CONFIG.max_side


@st.composite
def damaged_images(draw) -> bytes:
    """A valid image of some format (JPEG, PNG, GIF, WebP, TIFF, BMP, ...) with bytes changed, cut or inserted."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "zero-run"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at: at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at: at + 32] = bytes(min(32, len(data) - at))
    return bytes(data)


@FUZZ
@given(data=damaged_images())
def test_image_loader_on_damaged_images(data):
    _check_image(data)


@FUZZ
@given(data=st.binary(max_size=400))
@example(data=b"\x89PNG\r\n\x1a\n")  # a PNG signature and nothing else
@example(data=b"\xff\xd8\xff")  # a JPEG start and nothing else
@example(data=b"GIF89a")
def test_image_loader_on_arbitrary_bytes(data):
    _check_image(data)
