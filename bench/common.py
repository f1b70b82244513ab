"""Helpers shared by the benchmarks: entries, timing, machine description, offline Beam arguments."""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent  # the project root


def entry(group: str, name: str, value, unit: str, reference: str | None = None, *, better: str = "higher",
          repeats: int | None = None, note: str = "", **details) -> dict:
    """One measured figure.

    Args:
        group: the table it belongs to (one data set / setting); references are looked up within it.
        name: what was measured, unique within the group.
        value: the figure (a number, or a word such as "yes" for checks).
        unit: e.g. "images/s", "queries/s", "s", "bytes".
        reference: name of the entry in the same group this one is compared with (None: this is a reference
            or a stand-alone figure). run.py adds ``ratio`` = value / reference value when both are numbers
            with the same unit.
        better: "higher", "lower" or "" (no direction), to read the ratio.
        repeats: how many timed runs the figure is the best of.
        note: a short remark shown in the table.
        details: anything else worth keeping in results.json (all times, counts, sizes).
    """
    return {"group": group, "name": name, "value": value, "unit": unit, "reference": reference,
            "better": better, "repeats": repeats, "note": note, "details": details}


def skipped(group: str, name: str, reason: str) -> dict:
    """An entry that was not measured, with the reason (shown on the page, logged by the caller)."""
    return {"group": group, "name": name, "skipped": reason}


def time_runs(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall-clock seconds (time.perf_counter) of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict:
    """best / median / all of a list of seconds, rounded for results.json."""
    return {"best_s": round(min(times), 6), "median_s": round(statistics.median(times), 6),
            "all_s": [round(t, 6) for t in times]}


def offline_beam_args(workdir: str) -> list[str]:
    """Beam flags for an offline local run. Cairn's jobs build DirectRunner pipelines on Beam's FnApiRunner
    (pipeline.options.make_pipeline), so no Prism binary is fetched; the runner is still named explicitly."""
    return ["--runner=DirectRunner"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # no /proc (not Linux): fall back to what platform knows
        log.debug("no /proc/cpuinfo")
    return platform.processor() or platform.machine() or "unknown"


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:  # no /proc: RAM unknown
        log.debug("no /proc/meminfo")
    return None


def _git() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other work on the machine skews timings; recorded for context)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    """CPU, cores, RAM, OS, Python and library versions, date and project commit."""
    import apache_beam
    import cv2
    import faiss
    import numpy
    import PIL
    import pyarrow

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "ram_gib": _ram_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "numpy": numpy.__version__,
            "faiss": faiss.__version__,
            "opencv": cv2.__version__,
            "apache-beam": apache_beam.__version__,
            "pyarrow": pyarrow.__version__,
            "pillow": PIL.__version__,
        },
        "date": now(),
        "load_average": load_average(),
        "git": _git(),
    }
