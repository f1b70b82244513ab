"""Small helpers over Beam's filesystems, so that every path may be local or gs://, s3://, hdfs://."""

from __future__ import annotations

import contextlib
import functools
import posixpath
import re
import threading

from apache_beam.io.filesystems import FileSystems

from pipeline.errors import CairnError

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
FileStat = tuple[int, int]  # (size in bytes, modification time in ns) of a file, as its filesystem records it


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
        with FileSystems.create(path, compression_type="uncompressed") as f:
            f.write(data)
        return
    with _atomic_local(path) as f:
        f.write(data)


def copy_file(source: str, target: str) -> None:
    """Copy a file, streamed; a local target appears complete or not at all (temporary name, then rename)."""
    import shutil

    if has_scheme(target):
        if has_scheme(source) and source.split("://")[0] == target.split("://")[0]:
            FileSystems.copy([source], [target])
            return
        with FileSystems.open(source, compression_type="uncompressed") as src, \
                FileSystems.create(target, compression_type="uncompressed") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        return
    if has_scheme(source):
        with _atomic_local(target) as f, FileSystems.open(source, compression_type="uncompressed") as src:
            shutil.copyfileobj(src, f, 1 << 22)
        return

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
        raise CairnError(f"output folder {path!r} contains *, ? or [ ], which Beam's file sinks read as wildcards; "
                         "choose an --out without them")


def makedirs(path: str) -> None:
    """Create a local output folder (cloud filesystems have no folders); a file in the way is a user error."""
    if not has_scheme(path):
        import os

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


def glob_stats(pattern: str) -> dict[str, FileStat]:
    """Path -> (size, modification time in ns) of the files matching a glob pattern, from one listing (an object
    store's time is the object's last update)."""
    return {m.path: (int(m.size_in_bytes), _ns(m.last_updated_in_seconds)) for m in _matches(pattern)}


def _ns(seconds) -> int:
    return int(round(float(seconds or 0) * 1e9))


def sha256(path: str) -> str:
    """sha256 (hex) of a file's bytes on any Beam filesystem, read in 4 MiB chunks (not whole into memory)."""
    import hashlib

    digest = hashlib.sha256()
    with FileSystems.open(path, compression_type="uncompressed") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def stat_files(paths: list[str]) -> list[FileStat | None]:
    """(size, mtime_ns) of each path, None for one that is not there (or cannot be listed): one ``os.stat`` per
    local file, nothing read. Paths on an object store (gs://, s3://) are listed one folder at a time (one listing
    per distinct parent folder, not one request per object); their time is the object's last update (a
    replaced object is a new object with a new time)."""
    import os

    stats: list[FileStat | None] = [None] * len(paths)
    remote: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        if has_scheme(path):
            remote.setdefault(dirname(path), []).append(i)
            continue
        try:
            st = os.stat(path)
        except (OSError, ValueError):  # not there, not permitted, a NUL in the name
            continue
        stats[i] = (int(st.st_size), int(st.st_mtime_ns))
    for folder, rows in remote.items():
        try:
            listed = {m.path: m for m in _matches(join(escape(folder), "*"))}
        except Exception:  # noqa: BLE001 - an unreachable or unlisted folder: its files count as absent
            listed = {}
        for i in rows:
            m = listed.get(paths[i])
            if m is not None:
                stats[i] = (int(m.size_in_bytes), _ns(m.last_updated_in_seconds))
    return stats


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


_LOCAL_COPIES: dict[str, str] = {}
_LOCAL_LOCK = threading.Lock()


def local_path(path: str) -> str:
    """A local path holding ``path``: the path itself when local; for a file or folder on a Beam filesystem
    (gs://, s3://, hdfs://), a copy downloaded into the temporary folder (what a worker does with the models and
    indices a job names: TensorFlow, TFLite and FAISS read local files).

    The copy is keyed by the path, sizes and modification times of its files, so a replaced model is downloaded
    again. Threads of a process share one download; processes of one machine share a finished copy: each
    downloads into a folder of its own and renames it into place, and the first rename wins (a finished copy
    is never removed while another process may be reading it)."""
    if not has_scheme(path):
        return path
    import hashlib
    import os
    import shutil
    import tempfile

    base = path.rstrip("/")
    with _LOCAL_LOCK:
        if base in _LOCAL_COPIES:
            return _LOCAL_COPIES[base]
        name = posixpath.basename(base) or "model"
        matched = _matches(base)
        if len(matched) == 1 and matched[0].path.rstrip("/") == base:
            entries = [(matched[0], name)]
        else:  # a folder: every object under it (folder-marker objects, "x/", skipped)
            entries = [(m, posixpath.join(name, m.path[len(base) + 1:])) for m in _matches(join(escape(base), "**"))
                       if m.path[len(base) + 1:] and not m.path.endswith("/")]
        if not entries:
            raise CairnError(f"{path}: no such file or folder")
        key = hashlib.sha1("\0".join([base] + [f"{m.path}:{m.size_in_bytes}:{m.last_updated_in_seconds}"
                                               for m, _ in entries]).encode()).hexdigest()[:20]
        root = os.path.join(tempfile.gettempdir(), "cairn-models", key)
        if not os.path.isdir(root):
            staging = f"{root}.part-{os.getpid()}-{threading.get_ident()}"
            shutil.rmtree(staging, ignore_errors=True)
            for m, relative in entries:
                copy_file(m.path, os.path.join(staging, *relative.split("/")))
            try:
                os.rename(staging, root)
            except OSError:  # another process renamed its finished copy into place first: use that one
                shutil.rmtree(staging, ignore_errors=True)
                if not os.path.isdir(root):
                    raise
        _LOCAL_COPIES[base] = os.path.join(root, name)
        return _LOCAL_COPIES[base]


def _matches(pattern: str) -> list:
    """FileMetadata of the objects matching ``pattern`` (none when nothing matches)."""
    return list(FileSystems.match([pattern])[0].metadata_list)


def upload_folder(local: str, target: str, last: tuple[str, ...] = ()) -> list[str]:
    """Copy every file under the local folder ``local`` to ``target`` (any Beam filesystem), the files whose
    relative paths are in ``last`` after all others (an index's record, so that a copy cut short is never taken
    for a complete one); returns the target paths."""
    import os

    files = sorted(os.path.relpath(os.path.join(root, n), local).replace(os.sep, "/")
                   for root, _, names in os.walk(local) for n in names)
    files.sort(key=lambda rel: last.index(rel) + 1 if rel in last else 0)  # stable: the rest keep their order
    written = []
    for rel in files:
        dest = join(target, *rel.split("/"))
        copy_file(os.path.join(local, *rel.split("/")), dest)
        written.append(dest)
    return written
