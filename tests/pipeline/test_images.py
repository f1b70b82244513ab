import io
import os

import numpy as np
import pytest
from PIL import Image

from pipeline.images import DecodeConfig, ImageError, decode_image, load_image
from tests.conftest import bad_image_corpus, call_with_hang_guard

CORPUS = bad_image_corpus()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_decodes_or_fails_with_a_reason(name):
    data, expected = CORPUS[name]
    if expected == "ok":
        img = decode_image(data)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.flags.c_contiguous
    else:
        with pytest.raises(ImageError) as e:
            decode_image(data)
        assert e.value.stage == expected
        assert len(e.value.reason) > 10


def test_reasons_say_what_happened():
    reasons = {}
    for name, (data, expected) in CORPUS.items():
        if expected != "ok":
            with pytest.raises(ImageError) as e:
                decode_image(data)
            reasons[name] = e.value.reason
    assert "empty" in reasons["zero.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["text.jpg"]
    assert "decompression-bomb" in reasons["huge_declared.png"] and "pixels" in reasons["huge_declared.png"]
    assert "1x1" in reasons["one_by_one.png"]


def test_cmyk_becomes_the_right_rgb():
    img = decode_image(CORPUS["cmyk.jpg"][0])
    # C=0 M=255 Y=0 K=0 is magenta
    assert np.abs(img[15, 20].astype(int) - [255, 0, 255]).max() <= 8


def test_16_bit_grey_is_scaled_not_clipped():
    img = decode_image(CORPUS["grey16.png"][0])
    src = (np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)
    expected = np.clip(np.rint(src / 257.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(img[:, :, 0], expected)
    assert img[:, :, 0].max() > 200  # a clip to 255 or a plain cast would not give this ramp


def test_palette_transparency_is_composited_on_white():
    img = decode_image(CORPUS["palette_alpha.png"][0])
    assert img.shape == (24, 32, 3)
    np.testing.assert_array_equal(img[5, 20], [255, 255, 255])  # transparent red -> white
    np.testing.assert_array_equal(img[5, 5], [0, 0, 255])  # opaque blue stays blue


def test_exif_orientation_is_applied():
    img = decode_image(CORPUS["exif_rotated.jpg"][0])
    assert img.shape == (40, 20, 3)  # stored 40 wide x 20 high, displayed rotated


def test_max_side_shrinks_keeping_aspect():
    buf = io.BytesIO()
    Image.new("RGB", (3000, 1500), (10, 200, 30)).save(buf, "JPEG")
    img = decode_image(buf.getvalue(), DecodeConfig(max_side=500))
    assert img.shape == (250, 500, 3)
    assert np.abs(img[100, 100].astype(int) - [10, 200, 30]).max() <= 6
    full = decode_image(buf.getvalue(), DecodeConfig(max_side=0))
    assert full.shape == (1500, 3000, 3)


def test_grey_and_rgba_become_rgb():
    buf = io.BytesIO()
    Image.new("L", (20, 20), 77).save(buf, "PNG")
    np.testing.assert_array_equal(decode_image(buf.getvalue())[0, 0], [77, 77, 77])
    buf = io.BytesIO()
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(buf, "PNG")
    np.testing.assert_array_equal(decode_image(buf.getvalue())[0, 0], [255, 255, 255])


def test_animated_gif_takes_the_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    img = decode_image(buf.getvalue())
    assert img[0, 0, 0] > 200 and img[0, 0, 1] < 50


def test_max_pixels_guard_rejects_before_decoding():
    buf = io.BytesIO()
    Image.new("RGB", (400, 300)).save(buf, "PNG")
    with pytest.raises(ImageError) as e:
        decode_image(buf.getvalue(), DecodeConfig(max_pixels=100_000))
    assert "400x300" in e.value.reason and "max-pixels" in e.value.reason
    assert decode_image(buf.getvalue(), DecodeConfig(max_pixels=120_000)).shape == (300, 400, 3)


def test_load_image_reports_a_missing_file(tmp_path):
    with pytest.raises(ImageError) as e:
        load_image(str(tmp_path / "nope.jpg"))
    assert e.value.stage == "read" and "not found" in e.value.reason


def test_web_urls_are_refused_with_advice():
    with pytest.raises(ImageError) as e:
        load_image("https://example.com/a.jpg")
    assert e.value.stage == "read" and "download" in e.value.reason


def test_decoder_crashes_of_any_type_become_decode_errors():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    data[72] = 2  # corrupts a TIFF tag's type: Pillow 12.3 raises TypeError, not OSError
    with pytest.raises(ImageError) as e:
        decode_image(bytes(data))
    assert e.value.stage == "decode" and "TypeError" in e.value.reason


def test_max_pixels_above_pillows_warning_level_is_honoured():
    buf = io.BytesIO()
    Image.new("L", (10_000, 9_100)).save(buf, "PNG")  # 91 MP: above Pillow's 89.5 MP warning level
    assert decode_image(buf.getvalue(), DecodeConfig(max_pixels=100_000_000, max_side=64)).shape == (58, 64, 3)


def test_16_bit_scaling_does_not_depend_on_the_image_content():
    for value, expected in ((200, 1), (256, 1), (65535, 255)):
        buf = io.BytesIO()
        Image.fromarray(np.full((20, 20), value, np.uint16)).save(buf, "PNG")
        assert decode_image(buf.getvalue())[0, 0, 0] == expected


def test_extreme_aspect_ratio_is_rejected_after_shrinking():
    buf = io.BytesIO()
    Image.new("L", (20_000, 16)).save(buf, "PNG")
    with pytest.raises(ImageError, match="would be 1024x1"):
        decode_image(buf.getvalue())


def test_a_fifo_is_a_read_error_not_a_hang(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    finished, outcome = call_with_hang_guard(lambda: load_image(str(fifo)), fifo)
    assert finished, "reading a FIFO blocked"
    assert isinstance(outcome, ImageError) and outcome.stage == "read"
    assert "FIFO" in outcome.reason and "regular file" in outcome.reason


def test_a_device_is_refused_before_any_byte_is_read():
    # an explicit cap, so that code without one fails here at once instead of reading /dev/zero until memory ends
    config = DecodeConfig(max_bytes=1 << 20)
    for device in ("/dev/zero", "/dev/null"):
        with pytest.raises(ImageError) as e:
            load_image(device, config)
        assert e.value.stage == "read" and "character device" in e.value.reason, device


def test_a_file_above_the_size_cap_is_refused_unread(tmp_path):
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(8 << 20)  # sparse: 8 MiB declared, nothing written
    with pytest.raises(ImageError) as e:
        load_image(str(big), DecodeConfig(max_bytes=1 << 20))
    assert e.value.stage == "read" and "8,388,608 bytes" in e.value.reason and "--max-image-bytes" in e.value.reason
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(small)
    assert load_image(str(small), DecodeConfig(max_bytes=small.stat().st_size)).shape == (30, 40, 3)
    with pytest.raises(ImageError, match="cap"):
        load_image(str(small), DecodeConfig(max_bytes=small.stat().st_size - 1))
    assert DecodeConfig().max_bytes == 256 << 20  # the default is generous


def test_a_folder_is_a_read_error(tmp_path):
    with pytest.raises(ImageError) as e:
        load_image(str(tmp_path))
    assert e.value.stage == "read" and "a folder" in e.value.reason


def float_tiff(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.float32), mode="F").save(buf, format="TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_float_tiff_with_non_finite_pixels_is_refused(bad):
    values = np.linspace(0, 1, 32 * 24, dtype=np.float32).reshape(24, 32)
    values[3, 4] = bad
    with pytest.raises(ImageError) as e:
        decode_image(float_tiff(values))
    assert e.value.stage == "decode" and "1 non-finite pixel" in e.value.reason


def test_float_tiff_with_finite_pixels_keeps_its_ramp():
    values = np.linspace(-2, 3, 32 * 24, dtype=np.float32).reshape(24, 32)
    img = decode_image(float_tiff(values))
    assert img.shape == (24, 32, 3) and img[0, 0, 0] == 0 and img[-1, -1, 0] == 255


def test_float_tiff_spanning_the_whole_float32_range_is_not_black():
    values = np.linspace(-3e38, 3e38, 32 * 24, dtype=np.float32).reshape(24, 32)
    img = decode_image(float_tiff(values))
    assert img[0, 0, 0] == 0 and img[-1, -1, 0] == 255 and 100 < img[12, 16, 0] < 155
