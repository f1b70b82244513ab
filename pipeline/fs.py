"""Small helpers over Beam's filesystems, so that every path may be local or gs://, s3://, hdfs://."""

from __future__ import annotations

import contextlib
import functools
import posixpath
import re

from apache_beam.io.filesystems import FileSystems

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def has_scheme(path: str) -> bool:
    """True for ``gs://b/x`` and the like; False for local paths."""
    return bool(_SCHEME.match(path))


def is_local_dir(path: str) -> bool:
    import os

    return not has_scheme(path) and os.path.isdir(path)


def absolute(path: str) -> str:
    """Local paths made absolute (so that a config means the same from any working folder); URLs as they are."""
    import os

    return path if has_scheme(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    """Join path parts with the separator of ``base``'s filesystem."""
    if has_scheme(base):
        return posixpath.join(base, *parts)
    return FileSystems.join(base, *parts)


def dirname(path: str) -> str:
    return FileSystems.split(path)[0]


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def read_bytes(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read()


def read_text(path: str) -> str:
    """Read a UTF-8 text file; a leading byte-order mark is dropped."""
    return read_bytes(path).decode("utf-8-sig")


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file. Local writes are atomic (temporary name, then rename)."""
    if has_scheme(path):
        with FileSystems.create(path) as f:
            f.write(data)
        return
    with _atomic_local(path) as f:
        f.write(data)


def copy_file(source: str, target: str) -> None:
    """Copy a file, streamed; a local target appears complete or not at all (temporary name, then rename)."""
    if has_scheme(source) or has_scheme(target):
        FileSystems.copy([source], [target])
        return
    import shutil

    with _atomic_local(target) as f, open(source, "rb") as src:
        shutil.copyfileobj(src, f)


@contextlib.contextmanager
def _atomic_local(path: str):
    """A binary file object to fill; renamed to the local ``path`` when the block ends, removed if it fails."""
    import os
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@functools.cache
def _umask() -> int:
    """The process's umask, from /proc (setting it to read it would race with threads creating files)."""
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def check_output_folder(path: str) -> None:
    """Refuse output folders that Beam's file sinks cannot finalise: they glob their own output paths."""
    if any(c in path for c in "*?[]"):
        from pipeline.errors import CairnError

        raise CairnError(f"output folder {path!r} contains *, ? or [ ], which Beam's file sinks read as wildcards; "
                         "choose an --out without them")


def makedirs(path: str) -> None:
    """Create a local output folder (cloud filesystems have no folders); a file in the way is a user error."""
    if not has_scheme(path):
        import os

        from pipeline.errors import CairnError

        if os.path.exists(path) and not os.path.isdir(path):
            raise CairnError(f"{path} is a file, but an output folder is needed there; give another --out")
        os.makedirs(path, exist_ok=True)


def escape(path: str) -> str:
    """``path`` with glob wildcards escaped, to build a pattern from a literal folder or prefix."""
    import glob as _glob

    return _glob.escape(path)


def glob(pattern: str) -> list[str]:
    """Sorted paths matching a glob pattern on any Beam filesystem."""
    result = FileSystems.match([pattern])[0]
    return sorted(m.path for m in result.metadata_list)


def size(path: str) -> int:
    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


def delete(paths: list[str]) -> None:
    if paths:
        FileSystems.delete(paths)


def delete_temp_folders(folder: str) -> None:
    """Remove the ``beam-temp-*`` folders Beam's file sinks leave in ``folder`` when a job is killed before it
    finalises its shards (on object stores, the objects under those prefixes)."""
    if has_scheme(folder):
        delete(glob(join(escape(folder), "beam-temp-*", "*")))
        return
    import glob as _glob
    import os
    import shutil

    for path in _glob.glob(join(escape(folder), "beam-temp-*")):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
