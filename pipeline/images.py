"""Image reading and decoding: any file a user may have in a photo corpus becomes RGB uint8, or a clear reason.

``decode_image`` applies the EXIF orientation, turns grey, CMYK/YCCK, palette, alpha and 16-bit images into
RGB uint8 (alpha is composited on white), takes the first frame of animations, shrinks the image so that its
long side is at most ``max_side`` (JPEGs are decoded at reduced scale when that is enough, which is much
faster), and guards against decompression bombs by checking the declared size before decoding any pixel.
Only regular files up to ``max_bytes`` are read (a FIFO would hang the reader, a device never end), and float
images must hold finite pixels. Every failure raises :class:`ImageError` with the stage (``read`` or ``decode``)
and a reason, which the Beam jobs turn into dead-letter records.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import fs


@dataclass(frozen=True)
class DecodeConfig:
    """How images are decoded and validated."""

    max_side: int = 1024  # long side after decoding, in pixels; larger images are shrunk (0 = keep size)
    max_pixels: int = 64_000_000  # largest declared width x height accepted (decompression-bomb guard)
    min_side: int = 16  # images whose short side is smaller than this are rejected as unusable
    max_bytes: int = 256 * 2**20  # largest image file read, in bytes; larger files, and FIFOs/devices, are refused


class ImageError(Exception):
    """An image that cannot be used; ``stage`` is ``read`` or ``decode``."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


def read_image_bytes(path: str, max_bytes: int = DecodeConfig.max_bytes) -> bytes:
    """The encoded bytes of an image file on any Beam filesystem; raises ImageError(stage='read').

    Only regular files of at most ``max_bytes`` are read (:func:`pipeline.fs.read_regular_file`): a FIFO, a
    device or an oversized file is this record's read error, never a hang or a batch's memory.
    """
    if path.startswith(("http://", "https://")):
        raise ImageError("read", f"{path} is a web URL; download the images first and point the manifest at them")
    try:
        return fs.read_regular_file(path, max_bytes)
    except fs.RefusedFile as e:
        raise ImageError("read", str(e)) from None
    except FileNotFoundError:
        raise ImageError("read", f"file not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - Beam wraps filesystem errors in several types
        text = str(e)
        if "No such file" in text or "not found" in text.lower():
            raise ImageError("read", f"file not found: {path}") from None
        raise ImageError("read", f"cannot read {path}: {type(e).__name__}: {text[:300]}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; alpha is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img)
        if mode == "F":
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:  # one inf would stretch the range so that every other pixel scales to black
                raise ImageError("decode", f"float image with {bad} non-finite pixel(s) (inf or nan) of {arr.size}; "
                                 "its brightness cannot be scaled, so the image is not used")
            arr = arr.astype(np.float64)  # float32's extremes differ by more than float32 holds
            lo, hi = float(arr.min()), float(arr.max())
            scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        elif mode.startswith("I;16"):
            scaled = arr / 257.0  # 16-bit: 0..65535 -> 0..255
        else:
            # 32-bit "I": Pillow uses it for 16-bit PNGs too; only values beyond 8 bits say which it holds
            scaled = arr / 257.0 if arr.max(initial=0) > 255 else arr
        grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK (incl. Adobe-inverted), YCbCr, LAB, HSV, RGBX, ...


def decode_image(data: bytes, config: DecodeConfig = DecodeConfig()) -> np.ndarray:
    """Decode encoded image bytes.

    Returns:
        [H, W, 3] uint8 RGB, C-contiguous, with max(H, W) <= config.max_side (when max_side > 0).
    Raises:
        ImageError(stage='decode') with the reason.
    """
    if not data:
        raise ImageError("decode", "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below replaces Pillow's warning; its hard error (2x its limit) remains
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > config.max_pixels:
                raise ImageError(
                    "decode",
                    f"declared size {width}x{height} exceeds max_pixels={config.max_pixels} "
                    "(decompression-bomb guard); raise --max-pixels if the image is genuine",
                )
            if min(width, height) < config.min_side:
                raise ImageError("decode", f"image is {width}x{height}, smaller than min_side={config.min_side}")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            if config.max_side and img.format == "JPEG" and max(width, height) > config.max_side:
                scale = config.max_side / max(width, height)
                img.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        kind = "HTML or text" if head.startswith((b"<", b"{")) or head.isascii() else "unrecognised binary"
        raise ImageError("decode", f"not an image: the file holds {kind} data") from None
    except Image.DecompressionBombError as e:
        raise ImageError("decode", f"decompression-bomb guard: {e} (Pillow's own limit, about 179 megapixels, "
                         "applies whatever --max-pixels says)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError("decode", f"truncated or corrupt image data: {e}") from None
    except Exception as e:  # noqa: BLE001 - decoders raise odd types on corrupt files (TIFF: TypeError)
        raise ImageError("decode", f"corrupt image data ({type(e).__name__}: {e})") from None
    if config.max_side and max(img.size) > config.max_side:
        w, h = img.size
        scale = config.max_side / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if min(size) < config.min_side:
            raise ImageError("decode", f"image is {w}x{h}: shrunk to max_side={config.max_side} it would be "
                             f"{size[0]}x{size[1]}, smaller than min_side={config.min_side}")
        img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError("decode", f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)


def load_image(path: str, config: DecodeConfig = DecodeConfig()) -> np.ndarray:
    """Read and decode one image file: [H, W, 3] uint8 RGB. Raises ImageError (stage read or decode)."""
    return decode_image(read_image_bytes(path, config.max_bytes), config)
