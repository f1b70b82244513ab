"""Per-worker resources: how many local worker processes this machine runs (cores and memory), and thread
limits for OpenCV, FAISS and TensorFlow.

Thread limits are set from DoFn.setup() (once per worker process), never at import time. They apply to the
libraries already imported or importable without cost; TensorFlow is only configured if the worker has imported
it, because importing it just to set threads costs seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

log = logging.getLogger(__name__)


def available_memory() -> int:
    """Bytes of RAM available now (MemAvailable), or 8 GiB when unknown."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux
        log.debug("no /proc/meminfo")
    return 8 << 30


WORKER_MEMORY = 1 << 30  # RAM one local worker process is given (Python, Beam, NumPy, OpenCV, a model)


def max_workers() -> tuple[int, str]:
    """(the most DirectRunner worker processes this machine runs usefully, why): one per core, and no more than
    the available memory holds at :data:`WORKER_MEMORY` each; at least 1."""
    cores, memory = os.cpu_count() or 1, available_memory()
    cap = max(1, min(cores, memory // WORKER_MEMORY))
    return cap, (f"{cores} cores and {memory / (1 << 30):.1f} GiB of available memory "
                 f"({WORKER_MEMORY / (1 << 30):.0f} GiB per worker process)")


def cap_workers(workers: int) -> int:
    """``workers`` (> 0) local worker processes, or :func:`max_workers` when that is fewer: more processes than
    cores only add memory, and more than memory holds swap or get killed. A reduction is logged with why."""
    cap, why = max_workers()
    if workers > cap:
        log.warning("--workers %d: running %d worker processes, the most this machine runs usefully: %s",
                    workers, cap, why)
        return cap
    return workers


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
LARGE_BUFFERS = 32 << 20  # bytes: allocations up to this size come from the heap, not a fresh mmap


def keep_large_buffers() -> bool:
    """Let glibc's malloc reuse freed buffers of up to 32 MB instead of returning them to the system.

    By default glibc serves allocations above its mmap threshold (128 KB, raised adaptively) with a fresh
    mmap and unmaps them on free, so an image pipeline that allocates and frees the same few-MB buffers per
    image (OpenCV's SIFT pyramid, decoded images) pays page faults on every image: SIFT on 320x240 images ran
    at 19.9 ms per image with the defaults and 10.4 ms with the heap kept (measured 2026-11-21, one thread).
    The cost is up to LARGE_BUFFERS of freed memory kept per arena. No-op (False) without glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE_BUFFERS)) and bool(mallopt(M_TRIM_THRESHOLD, 4 * LARGE_BUFFERS))


def limit_threads(threads: int) -> None:
    """Cap the CPU threads of OpenCV, FAISS (OpenMP), BLAS and TensorFlow in this process (and keep large
    buffers in the heap: :func:`keep_large_buffers`)."""
    keep_large_buffers()
    threads = max(1, int(threads))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)  # read by libraries loaded after this point
    import cv2

    cv2.setNumThreads(threads)
    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(threads)
    if "tensorflow" in sys.modules:
        tf = sys.modules["tensorflow"]
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, threads // 2))
        except RuntimeError:  # TF already initialised its thread pools in this process
            log.debug("TensorFlow threads already fixed in this process")


# What TensorFlow's C++ side writes to the process's stderr on start-up, whatever TF_CPP_MIN_LOG_LEVEL says
NATIVE_START_UP_NOISE = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "Created TensorFlow Lite XNNPACK delegate",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions",
)


@contextlib.contextmanager
def quiet_native_start_up():
    """Run the block (TensorFlow's import, a model's load) with the process's stderr (file descriptor 2, which C++
    writes to directly) caught; afterwards every caught line that is not :data:`NATIVE_START_UP_NOISE` is written
    to stderr, so that nothing else is lost. Other threads' stderr output in the meantime is caught and passed on
    too, after the block."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr is not a file (a notebook, a test's capture)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not any(noise in line for noise in NATIVE_START_UP_NOISE)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
