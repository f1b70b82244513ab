"""The cost record every stage returns beside its outputs: what `cairn plan` fits and projects.

A stage body (extract, encode, a trainer, the index build, recognition) returns its record with a ``cost``
entry, made here. It says how much work the stage did and what that work grows with, in the stage's own terms;
the run that chains the stages (pipeline/run/) times the stage and maps those terms onto the run's sizes:

    units     the amount of work (images, descriptors, vectors, query x database pairs, SGD steps, ...)
    grows     [[quantity, cap], ...]: the work is proportional to each quantity, each capped at ``cap`` (None:
              uncapped). Quantities: "images" (the stage's own input images: the database or the queries),
              "database", "queries" and "classes".
    cap       a cap on the units themselves (k-means learns from at most its sample of descriptors)
    parallel  the work runs on Beam workers (``cores`` in all, ``workers`` processes); otherwise on the
              launching machine
    parts     parts of the stage it timed itself ({"kind", "key", "name", "seconds", "units", "grows", ...}), which
              the run records on their own (under the stage's key + "/" + key) and takes out of the stage's time
              (the search inside a recognition); ``rename`` then names what remains of the stage
    probe     a kernel `cairn plan` times at the target's shape instead of extrapolating (a softmax step)

``reused``: the stage found its outputs already made with the same config and did nothing; it costs nothing.
"""

from __future__ import annotations


def reused() -> dict:
    """The cost of a stage that found its outputs made with the same config: nothing (not recorded)."""
    return {"reused": True}


def cost(kind: str, units: int | float, grows: list | None = None, **info) -> dict:
    """A stage's cost record (see the module docstring); ``info`` adds images, parallel, cores, workers,
    output_bytes, cap, parts, probe, output_grows, and what an index build reports (vectors, dim, factory)."""
    return {"kind": kind, "units": int(units), "grows": [list(g) for g in (grows or [])], "reused": False, **info}


def part(kind: str, name: str, seconds: float, units: int | float, grows: list | None = None, key: str = "",
         **info) -> dict:
    """A part of a stage that the stage timed itself; ``name`` may hold ``{name}``, the stage's own name;
    ``key`` (default: ``kind``) tells it from the stage's other parts."""
    return {"kind": kind, "key": key or kind, "name": name, "seconds": float(seconds), "units": int(units),
            "grows": [list(g) for g in (grows or [])], **info}


def beam_cost(kind: str, record: dict, output_bytes: int = 0) -> dict:
    """The cost of a per-image Beam job (extract, encode) from its record: its input rows, on its workers."""
    counts = record.get("counts", {})
    return cost(kind, int(counts.get("inputs", 0)), [["images", None]], images=int(counts.get("outputs", 0)),
                parallel=True, cores=int(record.get("workers", 1)) * int(record.get("threads_per_worker", 1)),
                workers=int(record.get("workers", 1)), output_bytes=output_bytes)
