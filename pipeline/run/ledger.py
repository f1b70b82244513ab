"""The ledger of a run's stages: what `cairn plan` projects from and `make bench-scale` reports.

A run's stages (an extraction, a training, an encoding, an index build, a search...) are recorded while a
:func:`recording` is active; otherwise :func:`stage` costs nothing. Each record says how long the stage took,
its peak memory, the bytes it wrote, the cores it used, whether it runs on Beam workers (``parallel``) or on
the launching machine, and how its work grows with the size of the data (``grows``):

    units   the stage's amount of work in this run (images, vectors, query x database pairs, ...)
    grows   [[quantity, cap], ...]: the work is proportional to each quantity (train, queries, classes), each
            capped at ``cap`` (None: uncapped). A search of every query in a flat index grows with
            [["queries", None], ["train", None]]; k-means on a capped descriptor sample with [["train", None]]
            and ``cap`` on the units themselves.

``cpu_seconds`` is the CPU time the stage used, in this process and in worker processes that ended with it:
unlike its wall time it does not depend on how evenly Beam spread a small input over the workers.

A stage body reports its own work (its ``cost``: pipeline/stages/costs.py); :func:`record` turns it into the
ledger's terms, where a quantity is one of the run's sizes: "train" (database images), "queries", "classes".

Peak memory is the launching process's high-water mark during the stage (Linux: reset per stage through
/proc/self/clear_refs) and, for stages run in worker processes, the largest worker's (ru_maxrss of the
children, which Linux keeps for the whole run, so it is an upper bound for that stage).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import time

log = logging.getLogger(__name__)

_LEDGER: list[dict] | None = None


@contextlib.contextmanager
def recording():
    """Record every stage run inside the block; yields the list the records are appended to."""
    global _LEDGER
    previous, _LEDGER = _LEDGER, []
    try:
        yield _LEDGER
    finally:
        _LEDGER = previous


def active() -> bool:
    return _LEDGER is not None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:  # not Linux, or not permitted: the peak is the process's since it started
        return False


def _peak_bytes() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        log.debug("no /proc/self/status")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished worker processes (user + system)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _children_peak() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


@contextlib.contextmanager
def stage(kind: str, key: str, **info):
    """Time the block as one stage (``kind``: extract, train, encode, index, search, ...; ``key``: what makes it
    unique, usually its output folder). The block fills the yielded dict: ``units``, ``grows``, ``parallel``,
    ``cores``, ``output_bytes``, ``images``, ``reused`` (:func:`record` fills them from the stage's cost). A stage
    that reused earlier outputs is not recorded; one run again under the same ``key`` is recorded as ``key#2``,
    ``key#3``, ..."""
    rec = _record(kind, key, info)
    if _LEDGER is None:
        yield rec
        return
    _reset_peak()
    children_before = _children_peak()
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    yield rec
    # parts the stage recorded on their own (add) are not counted twice
    rec["seconds"] = round(time.perf_counter() - started - rec.pop("minus_seconds", 0.0), 4)
    rec["started"], rec["ended"] = round(started, 3), round(time.perf_counter(), 3)
    rec["cpu_seconds"] = round(_cpu_seconds() - cpu_before, 3)
    rec["peak_bytes"] = _peak_bytes()
    children = _children_peak()
    rec["worker_peak_bytes"] = children if children > children_before else 0
    if not rec["reused"]:
        _LEDGER.append(rec)


def add(kind: str, key: str, seconds: float, **info) -> None:
    """Record a part of a stage that the stage timed itself (e.g. a recognition's search, inside it); a part
    of a stage run again is numbered as the stage is."""
    if _LEDGER is not None:
        _LEDGER.append({**_record(kind, key, info), "peak_bytes": 0, "worker_peak_bytes": 0,
                        "seconds": round(float(seconds), 4)})


def _record(kind: str, key: str, info: dict) -> dict:
    """A new stage record; a ``key`` already recorded (the same work again, e.g. an index rebuilt for a second
    method) becomes ``key#2``, ``key#3``, ..."""
    if _LEDGER is not None:
        repeats = sum(1 for r in _LEDGER if r["key"].split("#")[0] == key)
        key = f"{key}#{repeats + 1}" if repeats else key
    return {"kind": kind, "key": key, "units": 0, "grows": [], "cap": None, "parallel": False,
            "cores": os.cpu_count() or 1, "output_bytes": 0, "images": 0, "reused": False, **info}


QUANTITIES = {"database": "train", "queries": "queries", "classes": "classes"}  # a cost's terms -> the run's
PART_FIELDS = ("images", "parallel", "cap", "cores", "cluster_parallel")


def record(st: dict, cost: dict, key: str, images: str = "train") -> None:
    """Fill the running stage ``st`` (opened as :func:`stage` under ``key``) from the ``cost`` its body returned;
    the cost's "images" are the run's ``images`` quantity ("train": the database, or "queries"). A reused
    stage is not recorded; its parts are recorded on their own under ``key/<part key>`` and taken out of its
    time, after which the stage may take another name (``rename``, where ``{name}`` is its own)."""
    if cost.get("reused"):
        st["reused"] = True
        return

    def grows(items: list) -> list:
        return [[images if q == "images" else QUANTITIES.get(q, q), cap] for q, cap in items]

    for field in ("units", "images", "parallel", "cores", "workers", "output_bytes", "cap", "probe", "vectors",
                  "dim", "factory"):
        if field in cost:
            st[field] = cost[field]
    st["grows"] = grows(cost.get("grows", []))
    if cost.get("output_grows"):
        st["output_grows"] = grows(cost["output_grows"])
    parts = cost.get("parts") or []
    for p in parts:
        add(p["kind"], f"{key}/{p['key']}", p["seconds"], name=p["name"].format(name=st.get("name", "")),
            units=p["units"], grows=grows(p["grows"]), **{f: p[f] for f in PART_FIELDS if f in p})
    if parts:
        st["minus_seconds"] = st.get("minus_seconds", 0.0) + sum(float(p["seconds"]) for p in parts)
        if cost.get("rename"):
            st["name"] = cost["rename"].format(name=st.get("name", ""))
