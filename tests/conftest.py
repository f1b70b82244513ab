"""Shared fixtures: a tiny synthetic landmark set, a corpus of bad images made on the fly, ../shared paths."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.synthetic import SynthConfig, generate

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY = SynthConfig(seed=7, classes=4, views=4, tail=0.0, min_views=4, queries_per_class=2, non_landmark_queries=4,
                   non_landmark_train=4, width=160, height=120)


@pytest.fixture(autouse=True)
def _cli_logging_removed():
    """A test that runs the CLI in this process (jobs.cli.main -> jobs.logs.setup_logging) leaves a root handler
    on the stderr it captured, closed when the test ends; later tests would log into it ("I/O operation on closed
    file"). Remove that handler after each test (pytest's own handlers are subclasses and stay)."""
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (real data lives in ../shared beside the checkout)")
    return path


# `cairn demo` at a size the suite can afford: the tiny class count, one epoch at 64 px
SMALL_DEMO = ["--classes", "4", "--views", "4", "--workers", "2", "--set", "cnn.finetune.input_size=64",
              "--set", "cnn.finetune.epochs=1", "--set", "cnn.finetune.head_epochs=1",
              "--set", "delf.train.input_size=64", "--set", "delf.train.epochs=1",
              "--set", "delf.train.attention_epochs=1", "--set", "delf.max_side=128", "--set", "delf.max_features=100",
              "--set", "delf.train.pca_images=10", "--set", "detect.train.input_size=96",
              "--set", "detect.train.epochs=2"]
PRETRAINED = SHARED / "weights" / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
ARTIFACTS = Path(os.environ.get("CAIRN_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def cairn(*args: str, timeout: int = 900):
    """Run the `cairn` command in a subprocess (its logging set-up stays out of the test process)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """`cairn demo --bad-inputs` run once per session, as `make demo` runs it (with the shared MobileNet when it
    is there) but with every kind of bad input mixed into the set (pipeline/badinput.py); returns its --out."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    pretrained = ["--pretrained", str(PRETRAINED)] if PRETRAINED.is_file() else []
    result = cairn("demo", "--out", str(out), "--bad-inputs", *SMALL_DEMO, *pretrained)
    assert result.returncode == 0, result.stderr[-3000:]
    (out / "stdout.txt").write_text(result.stdout)
    return out


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory) -> str:
    """A small untrained embedding model (.keras: MobileNet v2, 16-d head, 64 px input), made once per session."""
    from features.backbones import BackboneConfig
    from features.embedding import HeadConfig, build_embedding_model, model_metadata, save_embedding_model

    backbone, head = BackboneConfig("mobilenet_v2"), HeadConfig(dim=16)
    path = str(tmp_path_factory.mktemp("model") / "model.keras")
    save_embedding_model(build_embedding_model(backbone, head), path, model_metadata(backbone, head, 64))
    return path


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """A 16-train / 12-query synthetic set, generated once per session."""
    out = tmp_path_factory.mktemp("synth")
    generate(str(out), TINY, workers=1, progress=False)
    return out


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares width x height RGB pixels (a decompression bomb's signature)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def bad_image_corpus() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, expected outcome: "ok" or the dead-letter stage)."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    good = _jpeg(photo)
    out = {
        "good.jpg": (good, "ok"),
        "truncated.jpg": (good[: len(good) // 2], "decode"),
        "zero.jpg": (b"", "decode"),
        "text.jpg": (b"<html><body>404 Not Found</body></html>\n", "decode"),
        "one_by_one.png": (None, "decode"),
        "huge_declared.png": (huge_png(), "decode"),
    }
    buf = io.BytesIO()
    Image.new("CMYK", (40, 30), (0, 255, 0, 0)).save(buf, "JPEG", quality=95)
    out["cmyk.jpg"] = (buf.getvalue(), "ok")
    buf = io.BytesIO()
    Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)).save(buf, "PNG")
    out["grey16.png"] = (buf.getvalue(), "ok")
    pal = Image.new("P", (32, 24), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.paste(1, (0, 0, 16, 24))
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)  # palette index 0 (red) is transparent
    out["palette_alpha.png"] = (buf.getvalue(), "ok")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    out["exif_rotated.jpg"] = (_jpeg(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8), exif=exif.tobytes()), "ok")
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (1, 2, 3)).save(buf, "PNG")
    out["one_by_one.png"] = (buf.getvalue(), "decode")
    return out


@pytest.fixture()
def bad_images(tmp_path) -> dict[str, tuple[Path, str]]:
    """The bad-image corpus written to files: name -> (path, expected outcome)."""
    folder = tmp_path / "bad"
    folder.mkdir()
    result = {}
    for name, (data, expected) in bad_image_corpus().items():
        path = folder / name
        path.write_bytes(data)
        result[name] = (path, expected)
    return result


def write_manifest(path: Path, rows: list[tuple], header: str = "id,path,landmark_id") -> Path:
    path.write_text(header + "\n" + "".join(",".join(str(c) for c in r) + "\n" for r in rows), encoding="utf-8")
    return path


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def unblock_fifo(path) -> None:
    """Open ``path`` (a FIFO) for writing and close it: a reader blocked in open() then reads end of file."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def call_with_hang_guard(fn, fifo, timeout: float = 60.0):
    """fn() in a thread; (finished, result or exception). A call still blocked after ``timeout`` (the bug: a read
    of the FIFO hanging for ever) is released by a writer on ``fifo``, so that the suite goes on either way."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result["value"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    finished = not thread.is_alive()
    while thread.is_alive():
        unblock_fifo(fifo)
        thread.join(1.0)
    return finished, result.get("value")


def side(folder) -> Path:
    """The folder beside a features folder where its job keeps its record, manifest shards and dead letters
    (pipeline.featuresets.side_folder)."""
    return Path(f"{folder}.cairn")


def rerecord_shards(folder) -> None:
    """After a test rewrote a features folder's shards by hand (to shard the same rows otherwise, as other workers
    would), record them in its FOLDER.cairn/extract.json, as the job does for what it writes (readers refuse unrecorded shards)."""
    import json

    from pipeline.featuresets import record_files
    from pipeline.stages.extract import output_files

    record_path = side(folder) / "extract.json"
    record = json.loads(record_path.read_text())
    record["files"] = record_files(output_files(str(folder)))
    record_path.write_text(json.dumps(record, indent=2))


def tensorboard_scalars(log_dir) -> dict[str, dict[str, list[int]]]:
    """{run ("train", "validation"): {tag: the steps it was logged at}} of the TensorBoard event files under
    ``log_dir`` (what `tensorboard --logdir` would plot)."""
    import tensorflow as tf

    runs: dict[str, dict[str, list[int]]] = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        run = path.parent.relative_to(log_dir).as_posix()
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                runs.setdefault(run, {}).setdefault(value.tag, []).append(int(event.step))
    return runs
