"""The bad-input corpus: every kind is made, and the image loader gives each the outcome the corpus promises."""

import csv

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.badinput import KINDS, add_bad_inputs, exif_jpeg, image_variants, ycck_jpeg
from pipeline.errors import ManifestError
from pipeline.images import DecodeConfig, ImageError, decode_image, load_image
from pipeline.manifest import read_manifest

# what a job must make of each kind, written out here rather than read from the corpus module
EXPECTED = {
    "jpeg-truncated": "decode", "png-truncated": "decode", "jpeg-zero-bytes": "decode", "png-zero-bytes": "decode",
    "text-as-jpeg": "decode", "html-as-jpeg": "decode", "gif-animated": "ok", "webp": "ok", "jpeg-cmyk": "ok",
    "jpeg-ycck": "ok", "jpeg-grey": "ok", "png-16bit-rgb": "ok", "png-16bit-grey": "ok", "png-palette-alpha": "ok",
    "png-rgba": "ok", **{f"jpeg-exif-{o}": "ok" for o in range(1, 9)}, "png-1x1": "decode",
    "png-10x100000": "decode", "png-bomb": "decode", "missing-file": "read", "path-spaces-non-ascii": "ok",
    "path-quoted-comma": "ok", "path-absolute": "ok", "duplicate-id": "manifest", "empty-landmark-id": "ok",
    "landmark-id-text": "manifest", "landmark-id-float": "manifest", "landmark-id-negative": "manifest",
    "empty-id": "manifest",
}


def _photo(h=48, w=64) -> np.ndarray:
    """Smooth colour gradients with a dark square in one corner: any flip or turn moves the square."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    img[4:16, 4:16] = 20
    return img


def test_the_corpus_has_every_kind_the_issue_names_and_this_test_expects():
    assert {k: v[0] for k, v in KINDS.items()} == EXPECTED
    assert len(KINDS) >= 20


@pytest.mark.parametrize("kind", sorted(image_variants(_photo())))
def test_each_image_variant_decodes_or_fails_as_promised(kind):
    _, data = image_variants(_photo())[kind]
    if EXPECTED[kind] == "ok":
        img = decode_image(data, DecodeConfig(max_side=0))
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    else:
        with pytest.raises(ImageError) as e:
            decode_image(data, DecodeConfig(max_side=0))
        assert e.value.stage == EXPECTED[kind] and e.value.reason


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_show_the_original_picture(orientation):
    photo = _photo()
    img = decode_image(exif_jpeg(photo, orientation), DecodeConfig(max_side=0))
    assert img.shape == photo.shape  # 5-8 store the picture turned; the loader turns it back
    assert np.abs(img.astype(int) - photo).mean() < 4  # JPEG loss only; a wrong turn or flip moves the square


def test_ycck_jpeg_decodes_to_the_original_colours_as_opencv_does():
    photo = _photo()
    data = ycck_jpeg(photo)
    with Image.open(__import__("io").BytesIO(data)) as im:
        assert im.mode == "CMYK" and im.info.get("adobe_transform") == 2
    ours = decode_image(data, DecodeConfig(max_side=0)).astype(int)
    opencv = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.abs(ours - opencv.astype(int)).mean() < 2
    assert np.abs(ours - photo).mean() < 6


def test_sixteen_bit_png_keeps_the_picture():
    photo = _photo()
    img = decode_image(image_variants(photo)["png-16bit-rgb"][1], DecodeConfig(max_side=0))
    assert np.abs(img.astype(int) - photo).max() <= 1


def _three_image_set(folder) -> None:
    """A data set of 3 photos in FOLDER (train.csv and queries.csv list the same three)."""
    images = folder / "images"
    images.mkdir()
    rows = []
    for i in range(3):
        Image.fromarray(np.roll(_photo(), 9 * i, axis=1)).save(images / f"{i}.jpg", quality=90)
        rows.append(f"img-{i},images/{i}.jpg,{i}")
    for split in ("train", "queries"):
        (folder / f"{split}.csv").write_text("id,path,landmark_id\n" + "\n".join(rows) + "\n")


def test_the_bad_manifests_read_as_promised(tmp_path):
    _three_image_set(tmp_path)
    paths = add_bad_inputs(str(tmp_path))
    raw = (tmp_path / "train-bad.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw and b'"' in raw  # BOM, CRLF, quoted fields
    records = list(csv.DictReader(open(paths["records"], encoding="utf-8")))
    assert len(records) == 2 * len(KINDS)
    for split in ("train", "queries"):
        m = read_manifest(paths[split])
        assert m.total_rows == 3 + len(KINDS)
        dead = {(d.id, d.reason.split(" (")[0]) for d in m.dead_letters}
        for r in (r for r in records if r["split"] == split):
            if r["expected"] == "manifest":
                assert any(i == r["id"] for i, _ in dead), r
            else:  # read and decoded by the loader like a job would
                i = m.ids.index(r["id"])
                if r["expected"] == "ok":
                    assert load_image(m.paths[i]).shape[2] == 3
                    assert m.labels[i] is None if r["kind"] == "empty-landmark-id" else m.labels[i] is not None
                else:
                    with pytest.raises(ImageError) as e:
                        load_image(m.paths[i])
                    assert e.value.stage == r["expected"]
    with pytest.raises(ManifestError, match="needs 'id' and 'path'"):
        read_manifest(paths["missing_columns"])


def test_making_the_bad_inputs_again_leaves_their_files_untouched(tmp_path):
    """Every file written anew got a new modification time, and the next run of `cairn demo --bad-inputs` took
    half of its images for changed ones and extracted them again (a rerun that should reuse everything)."""
    _three_image_set(tmp_path)
    add_bad_inputs(str(tmp_path))
    made = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and "images" not in p.parts}
    assert len(made) > 2 * len(KINDS) // 2
    add_bad_inputs(str(tmp_path))
    assert {p: p.stat().st_mtime_ns for p in made} == made
