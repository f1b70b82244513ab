"""pipeline/fs.py: the exclusive lock of an output folder; the stats and checksums that reuse is keyed on."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import fs
from pipeline.errors import CairnError

ROOT = Path(__file__).resolve().parents[2]
_HOLDER = """
import sys
from pipeline import fs
with fs.locked_folder(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def held_by_another_process(folder: Path, command: str):
    """``folder`` locked by another process (as another cairn run would hold it) for the block; yields its pid."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), command], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = holder.stdout.readline()
        assert line == "held\n", holder.stderr.read()
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def _locked_by_someone(folder: Path) -> bool:
    """Whether some open file description holds ``folder``'s lock (tried from a fresh one)."""
    fd = os.open(folder / fs.LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_folder_held_by_another_run_is_refused_with_who_holds_it(tmp_path):
    out = tmp_path / "run"
    with held_by_another_process(out, "cairn compare --out run --methods hog sift-bovw") as pid:
        record = json.loads((out / fs.LOCK_NAME).read_text())
        assert record["pid"] == pid and record["host"] == socket.gethostname()
        with pytest.raises(CairnError) as error, fs.locked_folder(str(out), "cairn compare --out run --methods hog"):
            pytest.fail("the second writer got the folder")
        message = str(error.value)
        assert message.startswith(f"{out} is in use by another cairn run (pid {pid} on host {socket.gethostname()}, "
                                  "`cairn compare --out run --methods hog sift-bovw` since ")
        assert message.endswith("UTC); wait for it or choose another --out")
        assert json.loads((out / fs.LOCK_NAME).read_text()) == record  # the holder's record is untouched
    # the holder has ended: its lock file is gone, and so is the folder it made (empty)
    assert not out.exists()
    with fs.locked_folder(str(out), "cairn compare --out run"):
        assert _locked_by_someone(out)


def test_the_lock_goes_on_errors_and_interrupts_and_a_killed_runs_file_holds_nobody(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for error in (CairnError("bad flag"), KeyboardInterrupt()):
        with pytest.raises(type(error)), fs.locked_folder(str(out), "cairn extract"):
            assert _locked_by_someone(out)
            raise error
        assert not (out / fs.LOCK_NAME).exists() and out.is_dir()  # a folder that was there stays
    # a run killed with SIGKILL leaves its lock file, which the kernel no longer holds
    (out / fs.LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": socket.gethostname(), "command": "cairn x",
                                                "started": "2026-01-01 00:00:00 UTC"}))
    with fs.locked_folder(str(out), "cairn extract --out run"):
        assert json.loads((out / fs.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert list(out.iterdir()) == []


def test_a_nested_lock_of_a_held_folder_does_not_lock_the_run_out(tmp_path):
    out = tmp_path / "run"
    with fs.locked_folder(str(out), "cairn compare"):
        with fs.locked_folder(str(out), "cairn compare (a stage)"), fs.locked_folder(str(out / "work"), "stage"):
            (out / "work" / "x").write_text("x")
        assert _locked_by_someone(out)  # the outer block still holds it
        assert not (out / "work" / fs.LOCK_NAME).exists()
    assert sorted(p.name for p in out.iterdir()) == ["work"]


def test_a_file_in_the_way_is_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(CairnError, match="is a file, but an output folder is needed there; give another --out"), \
            fs.locked_folder(str(tmp_path / "f"), "cairn extract"):
        raise AssertionError("a file was locked as an output folder")


def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """A write that runs out of space (ENOSPC half-way through the file): one CairnError naming the folder and
    saying the disk is full; the file keeps its old content (or stays absent), and no temporary file is left."""
    import errno

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.json").write_text('{"old": 1}')
    for name in ("new.parquet", "old.json"):
        with pytest.raises(CairnError) as error:
            fs.write_bytes(str(out / name), b"x" * 1000)
        assert str(error.value).startswith(f"the disk holding {out} is full (no space left on device) while writing "
                                           f"{name}; "), error.value
    assert sorted(p.name for p in out.iterdir()) == ["old.json"] and (out / "old.json").read_text() == '{"old": 1}'


def test_a_full_disk_is_recognised_in_library_errors():
    import errno

    assert fs.disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert fs.disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    faiss_error = RuntimeError("Error in void faiss::write_index(...): write error in /x: 4051 != 2560000 (No space "
                               "left on device)")
    assert fs.disk_full(faiss_error)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("a Beam worker failed") from e
    except RuntimeError as wrapped:
        assert fs.disk_full(wrapped)
    assert not fs.disk_full(OSError(errno.EACCES, "Permission denied")) and not fs.disk_full(ValueError("x"))


def test_stat_files_gives_size_and_mtime_or_none_locally_and_by_listing(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    files = [tmp_path / "a" / "x.jpg", tmp_path / "a" / "y.jpg", tmp_path / "z.jpg"]
    for i, f in enumerate(files):
        f.write_bytes(b"x" * (i + 1))
    paths = [str(f) for f in files] + [str(tmp_path / "a" / "gone.jpg")]
    local = fs.stat_files(paths)
    assert local == [(i + 1, os.stat(f).st_mtime_ns) for i, f in enumerate(files)] + [None]
    # an object store's branch (one listing per folder), run on the local filesystem through Beam's listing
    monkeypatch.setattr(fs, "has_scheme", lambda path: True)
    listed = fs.stat_files(paths)
    assert listed[-1] is None and [s[0] for s in listed[:-1]] == [1, 2, 3]
    assert all(abs(a[1] - b[1]) < 1000 for a, b in zip(local[:-1], listed[:-1], strict=True))  # float seconds


def test_sha256_streams_the_file(tmp_path):
    data = os.urandom((1 << 22) + 17)  # more than one chunk
    (tmp_path / "f").write_bytes(data)
    assert fs.sha256(str(tmp_path / "f")) == hashlib.sha256(data).hexdigest()
