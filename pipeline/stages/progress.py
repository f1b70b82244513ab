"""Progress of a Beam job on this machine's terminal: images done / total, their rate and the time to go.

Beam's DirectRunner runs the work in worker processes and hands its metrics over only when the job ends, so the
workers count for themselves: :class:`CountImages` (a pass-through step after the input is read) writes each
worker's running count to a small file of a scratch folder, at most twice a second, and :func:`watch` (in the
launching process) adds the files up into a tqdm bar. Only for the local runners and a terminal: a cluster
runner has its own monitoring, and a log file needs no bar.

    folder = progress.folder(progress.wanted(job.runner))   # a path, or None: no bar
    rows = rows | "Progress" >> progress.counted(folder)      # when folder is not None
    ...
    with progress.watch(folder, images, "extract"):
        job.run()
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid

import apache_beam as beam
from tqdm import tqdm

from pipeline.options import LOCAL_RUNNERS

log = logging.getLogger(__name__)
WRITE_EVERY = 0.5  # seconds between two writes of a worker's count
POLL_EVERY = 0.5  # seconds between two reads of the counts


def wanted(runner: str) -> bool:
    """Whether a job on ``runner`` shows a bar: a local runner, and stderr a terminal."""
    return runner in LOCAL_RUNNERS and sys.stderr.isatty()


class CountImages(beam.DoFn):
    """Passes every element on and counts it in FOLDER/<process>-<random>: one file per DoFn instance.
    ``per_element``: the images an element holds, a number or a function of the element (``len`` for chunks)."""

    def __init__(self, folder: str, per_element=1):
        self.folder = folder
        self.per_element = per_element
        self.path = None
        self.count = 0
        self.written = 0.0

    def setup(self):
        self.path = os.path.join(self.folder, f"{os.getpid()}-{uuid.uuid4().hex}")
        self.count, self.written = 0, 0.0

    def _write(self) -> None:
        if self.path is None:
            return
        try:
            with open(self.path + ".tmp", "w", encoding="ascii") as f:
                f.write(str(self.count))
            os.replace(self.path + ".tmp", self.path)
        except OSError as e:  # the launcher removed the folder (the job is over) or the disk is full
            log.debug("progress: %s not written (%s); counting stops", self.path, e)
            self.path = None  # the bar is a convenience: the job goes on without it
        self.written = time.monotonic()

    def process(self, element):
        self.count += self.per_element if isinstance(self.per_element, int) else self.per_element(element)
        if time.monotonic() - self.written >= WRITE_EVERY:
            self._write()
        yield element

    def finish_bundle(self):
        self._write()


def counted(folder: str, per_element=1) -> beam.ParDo:
    return beam.ParDo(CountImages(folder, per_element))


def read_counts(folder: str) -> int:
    """The sum of the workers' counts in ``folder`` (files half-written or gone count 0)."""
    total = 0
    for name in os.listdir(folder):
        if name.endswith(".tmp"):
            continue
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(folder, name), encoding="ascii") as f:
                total += int(f.read() or 0)
    return total


def folder(enabled: bool) -> str | None:
    """Where the workers will write their counts (made by :func:`watch` when the job runs), or None."""
    return os.path.join(tempfile.gettempdir(), f"cairn-progress-{uuid.uuid4().hex}") if enabled else None


@contextlib.contextmanager
def watch(folder: str | None, total: int, desc: str):
    """While the block runs (the job), a bar on stderr of the counts in ``folder`` against ``total``; the folder
    is made first and removed afterwards. Nothing when ``folder`` is None."""
    if folder is None or total <= 0:
        yield
        return
    os.makedirs(folder, exist_ok=True)
    tqdm.monitor_interval = 0  # no monitor thread: this module's own thread updates the bar
    bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, leave=False)
    done = threading.Event()

    def poll():
        while not done.wait(POLL_EVERY):
            bar.update(min(total, read_counts(folder)) - bar.n)

    thread = threading.Thread(target=poll, name="cairn-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.update(min(total, read_counts(folder)) - bar.n)
        bar.close()
        shutil.rmtree(folder, ignore_errors=True)
