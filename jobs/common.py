"""Argument handling shared by the jobs: Cairn flags are parsed here, everything else goes to Beam."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from pipeline.errors import CairnError
from pipeline.images import DecodeConfig

BEAM_EPILOG = (
    "Any other --flag is passed to Apache Beam, e.g. --runner=DataflowRunner --project=P --region=R "
    "--temp_location=gs://B/tmp. The default runner is DirectRunner on this machine."
)


def parser(prog: str, description: str, beam: bool = False) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=BEAM_EPILOG if beam else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_decode_args(p: argparse.ArgumentParser) -> None:
    d = DecodeConfig()
    g = p.add_argument_group("image decoding")
    g.add_argument("--max-side", type=int, default=d.max_side,
                   help=f"shrink images so their long side is at most this many pixels (0 = keep; default {d.max_side})")
    g.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help=f"reject images declaring more pixels than this (decompression-bomb guard; default {d.max_pixels})")
    g.add_argument("--min-side", type=int, default=d.min_side,
                   help=f"reject images whose short side is below this (default {d.min_side})")


def decode_config(args: argparse.Namespace) -> DecodeConfig:
    for name in ("max_side", "min_side"):
        if getattr(args, name) < 0:
            raise CairnError(f"--{name.replace('_', '-')} must be >= 0")
    if args.max_pixels < 1:  # 0 would turn every image into a dead letter
        raise CairnError("--max-pixels must be >= 1 (the largest width x height accepted, e.g. 64000000)")
    return DecodeConfig(max_side=args.max_side, max_pixels=args.max_pixels, min_side=args.min_side)


AUTO_WORKERS_MIN_IMAGES = 1000  # below this, worker processes cost more to start than they save


def add_worker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (DirectRunner)")
    g.add_argument("--workers", type=int, default=0,
                   help="worker processes on DirectRunner; 1 runs in-process (default 0 = auto: one per core "
                        f"for {AUTO_WORKERS_MIN_IMAGES:,}+ images, in-process below)")
    g.add_argument("--threads-per-worker", type=int, default=0,
                   help="CPU threads each worker gives OpenCV/FAISS/TensorFlow (default: cores / workers)")


def check_workers(args: argparse.Namespace) -> None:
    if not (0 <= args.workers <= 1024 and 0 <= args.threads_per_worker <= 1024):
        raise CairnError("--workers and --threads-per-worker must be between 0 (automatic) and 1024")


_SIZE_FACTOR = [1.0]  # `cairn plan`'s samples decide as the whole run would (worker processes, whether to PCA)


def resolve_workers(workers: int, images: int) -> int:
    """0 = automatic: one process per core when there is enough work to pay for their start-up."""
    if workers > 0:
        return workers
    return (os.cpu_count() or 1) if images * size_factor() >= AUTO_WORKERS_MIN_IMAGES else 1


def size_factor() -> float:
    """How many times more images the run being sampled has than the job sees (1 outside `sized_as`)."""
    return _SIZE_FACTOR[-1]


@contextlib.contextmanager
def sized_as(factor: float):
    """Inside the block, the decisions that depend on the number of images are taken for ``factor`` times the
    images a job sees: a sample of a corpus then runs each stage in-process or on worker processes, and learns a
    PCA or keeps the raw descriptor (jobs.train.whitening_dim), as the whole corpus would."""
    _SIZE_FACTOR.append(float(factor))
    try:
        yield
    finally:
        _SIZE_FACTOR.pop()


def parse(p: argparse.ArgumentParser, argv: list[str] | None, beam: bool = False):
    """(known args, Beam args). Without ``beam``, unknown flags are an error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not beam:
        return p.parse_args(argv), []
    args, rest = p.parse_known_args(argv)
    stray = [a for a in rest if not a.startswith("--")]
    if stray:
        p.error(f"unexpected arguments {stray}; Cairn's own flags are listed by --help, Beam flags start with --")
    ours = {s for action in p._actions for s in action.option_strings}
    for arg in rest:
        name = arg.split("=", 1)[0]
        if name.replace("_", "-") in ours:  # --max_side for --max-side would silently go to Beam
            p.error(f"{name} is not a flag; did you mean {name.replace('_', '-')}?")
    return args, rest


def add_beam_job_args(p: argparse.ArgumentParser, decode: bool = True) -> None:
    """--force, and the decoding and parallelism flags every image-reading Beam job shares."""
    p.add_argument("--force", action="store_true", help="recompute even when OUT holds outputs of the same config")
    if decode:
        add_decode_args(p)
    add_worker_args(p)


def parse_beam_job(p: argparse.ArgumentParser, argv: list[str] | None):
    """(args, Beam args) of a Beam job, with its parallelism flags checked."""
    args, beam_args = parse(p, argv, beam=True)
    check_workers(args)
    return args, beam_args

