"""Small helpers over Beam's filesystems, so that every path may be local or gs://, s3://, hdfs://."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import posixpath
import re
import stat
import threading

from apache_beam.io.filesystems import FileSystems

from pipeline.errors import CairnError

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
FileStat = tuple[int, int]  # (size in bytes, modification time in ns) of a file, as its filesystem records it


def has_scheme(path: str) -> bool:
    """True for ``gs://b/x`` and the like; False for local paths."""
    return bool(_SCHEME.match(path))


def is_local_dir(path: str) -> bool:

    return not has_scheme(path) and os.path.isdir(path)


def absolute(path: str) -> str:
    """Local paths made absolute (so that a config means the same from any working folder); URLs as they are."""

    return path if has_scheme(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    """Join path parts with the separator of ``base``'s filesystem."""
    if has_scheme(base):
        return posixpath.join(base, *parts)
    return FileSystems.join(base, *parts)


def dirname(path: str) -> str:
    return FileSystems.split(path)[0]


def basename(path: str) -> str:
    return FileSystems.split(path)[1]


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def read_bytes(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read()


class RefusedFile(ValueError):
    """A file that :func:`read_regular_file` will not read: not a regular file, or larger than the cap."""


def read_regular_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a file of at most ``max_bytes`` bytes; :class:`RefusedFile` for anything else.

    A local path must be a regular file (after following links): a FIFO would block for ever and a device such as
    /dev/zero never ends, so both are refused before any byte is read. The type is checked by ``stat`` before
    opening and again by ``fstat`` on the descriptor (opened non-blocking, so that even a FIFO swapped in between
    cannot hang the open), and the size is checked before reading. On other filesystems (gs://, s3://, ...) at
    most ``max_bytes + 1`` bytes are read, so an oversized object is refused without holding it in memory.
    """
    if has_scheme(path):
        with FileSystems.open(path, compression_type="uncompressed") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise RefusedFile(f"{path} is larger than the cap of {max_bytes:,} bytes; raise --max-image-bytes "
                              "if the file is genuine")
        return data

    def check(st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise RefusedFile(f"{path} is not a regular file ({_file_kind(st.st_mode)}); only regular files are read")
        if st.st_size > max_bytes:
            raise RefusedFile(f"{path} holds {st.st_size:,} bytes, more than the cap of {max_bytes:,}; raise "
                              "--max-image-bytes if the file is genuine")

    check(os.stat(path))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        check(os.fstat(fd))  # the file opened may not be the one stat saw
        data = f.read(max_bytes + 1)  # a file that grew since fstat is still cut at the cap
    if len(data) > max_bytes:
        raise RefusedFile(f"{path} grew beyond the cap of {max_bytes:,} bytes while being read")
    return data


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a plain file")


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
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as e:
        if disk_full(e):
            raise CairnError(disk_full_message(folder, os.path.basename(path))) from e
        raise
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, Exception) and not isinstance(e, CairnError) and disk_full(e):
            raise CairnError(disk_full_message(folder, os.path.basename(path))) from e
        raise


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_TEXTS = tuple(os.strerror(n) for n in sorted(_DISK_FULL_ERRNOS))  # "No space left on device", ...


def disk_full(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, says that a disk is full (ENOSPC) or a quota is spent
    (EDQUOT): as an OSError, or in the text of a library's error (FAISS, Arrow, TensorFlow and Beam's workers
    pass it on as text)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(error) for text in _DISK_FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_message(folder: str, writing: str = "", hint: str = "choose another output folder") -> str:
    """The one line for a disk that filled up while writing into ``folder`` (``writing``: the file, if known)."""
    what = f" while writing {writing}" if writing else ""
    return (f"the disk holding {folder} is full (no space left on device){what}; nothing half-written was kept "
            f"under a final name: free some space there, or {hint}, and run again")


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

        if os.path.exists(path) and not os.path.isdir(path):
            raise CairnError(f"{path} is a file, but an output folder is needed there; give another --out")
        os.makedirs(path, exist_ok=True)


LOCK_NAME = ".cairn-lock"  # the file in a locked output folder that names the run holding it

# Folders this process holds locked -> [lock file descriptor, depth]: a nested lock of a folder the process already
# holds (a command calling a stage into its own --out) is a no-op instead of a lock against itself.
_HELD: dict[str, list[int]] = {}
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def locked_folder(path: str, command: str, flag: str = "--out"):
    """Hold an exclusive lock on the local output folder ``path`` (created when missing) for the block: two runs
    writing into one folder would mix their outputs. The lock is ``flock`` on ``path/.cairn-lock``, which holds
    the run's pid, host, ``command`` (its command line) and start time; the kernel releases it when the process
    ends however it ends, so a lock file left by a killed run holds nobody. A folder another process holds is a
    CairnError naming that run (``flag``: the option that chose the folder, for the hint). The lock file goes when
    the block ends, and so does the folder when this call created it and it is still empty. Folders on object
    stores (gs://, s3://) are not locked: those have no locks."""
    if has_scheme(path):
        yield
        return

    folder = os.path.abspath(path)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CairnError(f"{path} is a file, but an output folder is needed there; give another {flag}")
    created = []  # the folders this call makes, deepest first
    parent = folder
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(folder, exist_ok=True)
    key = os.path.realpath(folder)
    with _HELD_LOCK:
        nested = key in _HELD
        if nested:
            _HELD[key][1] += 1
        else:
            try:
                _HELD[key] = [_lock(folder, path, command, flag), 1]
            except BaseException:
                _remove_empty(created)
                raise
    try:
        yield
    finally:
        with _HELD_LOCK:
            _HELD[key][1] -= 1
            if not _HELD[key][1]:
                fd = _HELD.pop(key)[0]
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, LOCK_NAME))  # while still locked: see _lock
                os.close(fd)
                _remove_empty(created)


def _lock(folder: str, shown: str, command: str, flag: str) -> int:
    """The descriptor of ``folder``'s lock file, locked and holding this run's description."""
    import datetime
    import fcntl
    import json
    import socket

    lock_path = os.path.join(folder, LOCK_NAME)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise CairnError(f"{shown} is in use by another cairn run ({holder}); wait for it or choose another "
                             f"{flag}") from None
        except BaseException:
            os.close(fd)
            raise
        # the holder removes the file before it unlocks: a file locked after that is no longer the folder's lock
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            break
        os.close(fd)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": started})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (record + "\n").encode("utf-8"), 0)
    return fd


def _holder(fd: int) -> str:
    """Who holds a lock file, in words, from what it holds."""
    import json
    import socket

    try:
        record = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8"))
        pid, host, command, started = record["pid"], record["host"], record["command"], record["started"]
    except (ValueError, KeyError, TypeError, OSError):  # it has locked the file but not written it yet
        return "it has just started"
    command = command if len(command) <= 400 else command[:397] + "..."
    words = f"pid {pid} on host {host}, `{command}` since {started}"
    if host == socket.gethostname() and not _running(pid):
        words += f"; pid {pid} has ended, but processes it started still hold the folder"
    return words


def _running(pid) -> bool:
    """Whether process ``pid`` of this host is there (one of another user counts; a malformed pid does not)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, but another user's
        return True
    except (OSError, ValueError):
        return False
    return True


def _remove_empty(folders: list[str]) -> None:
    """Remove the folders (deepest first) that are empty, up to the first that is not."""

    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


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
    import shutil

    for path in _glob.glob(join(escape(folder), "beam-temp-*")):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def delete_tree(folder: str) -> None:
    """Remove a folder and everything in it (on object stores, the objects under that prefix); nothing if it is
    not there."""
    if has_scheme(folder):
        delete(glob(join(escape(folder), "*")))
        return
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


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

    files = sorted(os.path.relpath(os.path.join(root, n), local).replace(os.sep, "/")
                   for root, _, names in os.walk(local) for n in names)
    files.sort(key=lambda rel: last.index(rel) + 1 if rel in last else 0)  # stable: the rest keep their order
    written = []
    for rel in files:
        dest = join(target, *rel.split("/"))
        copy_file(os.path.join(local, *rel.split("/")), dest)
        written.append(dest)
    return written
