"""pipeline/fs.py: the stats and checksums that reuse is keyed on (issue 23 items 2 and 3)."""

import hashlib
import os

from pipeline import fs


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
