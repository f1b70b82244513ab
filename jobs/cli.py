"""The `cairn` command: one sub-command per job."""

from __future__ import annotations

import importlib
import logging
import os
import sys

from jobs.logs import setup_logging
from pipeline.errors import CairnError, DryRun
from pipeline.run.methods import describe

COMMANDS = {
    "synth": ("jobs.synth", "generate the synthetic landmark data set (train.csv, queries.csv, boxes.csv)"),
    "extract": ("jobs.extract", "Beam job: manifest -> descriptors in sharded Parquet, with dead letters"),
    "train": ("jobs.train", "learn a method's models (vocabularies, encoders, PCA, classifiers)"),
    "encode": ("jobs.encode", "Beam job: local features -> BoVW / VLAD vectors (or PCA-whitened ones)"),
    "index": ("jobs.index", "build a FAISS index over database descriptors"),
    "recognize": ("jobs.recognize", "predict landmarks and list the nearest database images of queries"),
    "neighbours": ("jobs.neighbours", "the k most similar database images of every query, with scores"),
    "report": ("jobs.report", "rebuild a compare run's metrics.json, per_class.csv and report.html from its outputs"),
    "compare": ("jobs.compare", "run and score several methods on the same train and query manifests"),
    "demo": ("jobs.demo", "synth + compare on the built-in synthetic data"),
    "plan": ("jobs.plan", "project a run's time, storage and index memory from samples measured on this machine"),
}


def usage() -> str:
    lines = ["usage: cairn COMMAND [--help] [ARGS]", "", "Landmark recognition and image retrieval as batch jobs.",
             "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "methods (cairn compare --methods ...):", describe(), "",
              "Run `cairn COMMAND --help` for a command's flags. Quick start: cairn demo"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"cairn {version('cairn')}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"cairn: unknown command {name!r}; commands: {', '.join(COMMANDS)} (cairn --help)", file=sys.stderr)
        return 2

    setup_logging(verbose="--verbose" in argv)
    argv = [a for a in argv[1:] if a != "--verbose"]

    try:
        importlib.import_module(COMMANDS[name][0]).run(argv)
    except CairnError as e:
        print(f"cairn {name}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except DryRun as e:
        print(f"cairn {name}: {e}")
        return 0
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug, shown with its traceback
            raise
        print(f"cairn {name}: error: {e.strerror or e}: {e.filename}; check the path, its permissions and the free "
              "space there", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cairn {name}: interrupted", file=sys.stderr)
        return 130
    return 0  # the command line's logging is shut down by leave(); a caller in-process keeps its own


def entry() -> None:
    """The `cairn` command: :func:`main`, then :func:`leave`. Uncaught exceptions (bugs) still end with their
    traceback."""
    leave(main())


def leave(code: int) -> None:
    """Exit with ``code`` without finalising the interpreter, once every output is written and closed. Native
    threads of the libraries (Arrow's pools, gRPC's) may still hold Python objects then; one letting go of its
    object while the interpreter is torn down needs the GIL that is gone, and the process aborts ("terminate
    called without an active exception", exit 134) after a job that succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def one_line(message: str) -> str:
    """A message on one line: errors from libraries (Beam's option checks) sometimes span several."""
    return "; ".join(part.strip() for part in message.splitlines() if part.strip())


if __name__ == "__main__":
    entry()
