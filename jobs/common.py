"""What the `cairn` commands share: flag groups, their parsing into configs, and the tables they print.

Cairn's flags are parsed here; Beam's pipeline options go to Beam, any other flag is an error. A command module
(jobs/<command>.py) parses its flags with these, calls one function of the layers below and prints; command
modules never import each other.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import shlex
import sys

from index.build import parse_memory
from index.faiss_index import IndexConfig
from index.recognize import TuneConfig, VoteConfig
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.images import DecodeConfig
from pipeline.options import AUTO_WORKERS_MIN_IMAGES, beam_flags
from pipeline.run import methods
from pipeline.run.settings import describe_settings, parse_overrides
from pipeline.stages.lookup import BEAM_MIN_QUERIES
from reports.html import ReportConfig

BEAM_EPILOG = (
    "Apache Beam's pipeline options (--name=value) are passed to Beam, e.g. --runner=DataflowRunner --project=P "
    "--region=R --temp_location=gs://B/tmp. The default runner is DirectRunner on this machine. "
    "A flag that is neither this command's nor a Beam pipeline option is an error."
)


def parser(prog: str, description: str, beam: bool = False) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=BEAM_EPILOG if beam else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def finite_float(text: str) -> float:
    """argparse type of a number flag: a finite number (``nan`` and ``inf`` are refused, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def add_decode_args(p: argparse.ArgumentParser) -> None:
    d = DecodeConfig()
    g = p.add_argument_group("image decoding")
    g.add_argument("--max-side", type=int, default=d.max_side,
                   help=f"shrink images so their long side is at most this many pixels (0 = keep; default {d.max_side})")
    g.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help=f"reject images declaring more pixels than this (decompression-bomb guard; default {d.max_pixels})")
    g.add_argument("--min-side", type=int, default=d.min_side,
                   help=f"reject images whose short side is below this (default {d.min_side})")
    g.add_argument("--max-image-bytes", type=int, default=d.max_bytes,
                   help="read only regular files of at most this many bytes; larger files, FIFOs and devices become "
                        f"dead letters (default {d.max_bytes:,} = {d.max_bytes >> 20} MiB)")


def decode_config(args: argparse.Namespace) -> DecodeConfig:
    for name in ("max_side", "min_side"):
        if getattr(args, name) < 0:
            raise CairnError(f"--{name.replace('_', '-')} must be >= 0")
    if args.max_pixels < 1:  # 0 would turn every image into a dead letter
        raise CairnError("--max-pixels must be >= 1 (the largest width x height accepted, e.g. 64000000)")
    if args.max_image_bytes < 1:  # 0 would turn every image into a dead letter
        raise CairnError("--max-image-bytes must be >= 1 (the largest image file read, e.g. 268435456 for 256 MiB)")
    return DecodeConfig(max_side=args.max_side, max_pixels=args.max_pixels, min_side=args.min_side,
                        max_bytes=args.max_image_bytes)


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


def parse(p: argparse.ArgumentParser, argv: list[str] | None, beam: bool = False):
    """(known args, Beam args). Beam args must be flags of Beam's pipeline options (pipeline.options.beam_flags);
    any other flag is an error that names the closest known flag. Without ``beam``, every unknown flag is an
    error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not beam:
        return p.parse_args(argv), []
    args, rest = p.parse_known_args(argv)
    stray = [a for a in rest if not a.startswith("--")]
    if stray:
        p.error(f"unexpected arguments {stray}; Cairn's own flags are listed by --help, Beam flags start with --")
    ours = {s for action in p._actions for s in action.option_strings if s.startswith("--")}
    beams = beam_flags()
    for arg in rest:
        name = arg.split("=", 1)[0]
        if name.replace("_", "-") in ours:  # --max_side for --max-side would silently go to Beam
            p.error(f"{name} is not a flag; did you mean {name.replace('_', '-')}?")
        if name not in beams:  # Beam would drop it with a warning: --methd=hog would run every method
            close = difflib.get_close_matches(name, sorted(ours | beams), n=1)
            hint = f"did you mean {close[0]}?" if close else "Cairn's flags are listed by --help"
            p.error(f"{name} is neither a flag of this command nor a Beam pipeline option; {hint}")
    return args, rest


@contextlib.contextmanager
def writing(out: str, command: str, argv: list[str] | None, flag: str = "--out"):
    """The command's exclusive hold on its output folder ``out`` (pipeline/fs.py, locked_folder), for the whole
    run: a second run writing there ends with one line naming this one. ``argv``: the command's arguments, recorded
    in the lock so that the other run can say who holds the folder. A disk that fills up during the run (an
    error of any library that says so) ends it with one line naming ``out``."""
    args = sys.argv[1:] if argv is None else list(argv)
    with fs.locked_folder(out, shlex.join(["cairn", command, *args]), flag):
        try:
            yield
        except CairnError:
            raise
        except Exception as e:
            if not fs.disk_full(e):
                raise
            where = getattr(e, "filename", None) or out
            raise CairnError(fs.disk_full_message(where, hint=f"choose another {flag}")) from e


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


def add_set_arg(p) -> None:
    p.add_argument("--set", action="append", default=[], metavar="NAME.FIELD=VALUE",
                   help="change a method parameter, e.g. bovw.vocabulary.k=4096 (repeatable). Parameters and "
                        "defaults:\n  " + "\n  ".join(describe_settings()))


def add_vote_args(p) -> None:
    """Recognition flags shared by `cairn recognize` and `cairn compare`."""
    d, t = VoteConfig(), TuneConfig()
    g = p.add_argument_group("recognition from neighbours")
    g.add_argument("--k", type=int, default=d.k, help=f"neighbours that vote (default {d.k})")
    g.add_argument("--min-confidence", type=finite_float, default=d.min_confidence,
                   help="predict no landmark below this confidence (default 0; tuned when tuning)")
    g.add_argument("--aggregate", default=d.aggregate, choices=["sum", "max"],
                   help="a class's score: sum or max of its neighbours' similarities (default sum; tuned)")
    g.add_argument("--class-norm", type=finite_float, default=d.class_norm,
                   help="divide a class's sum by min(its images, k) ** this, for the long tail (0..1, default 0; "
                        "tuned)")
    g.add_argument("--nonlandmark-weight", type=finite_float, default=d.nonlandmark_weight,
                   help="confidence -= this x mean similarity to the nearest known non-landmark database images "
                        "(database rows without a landmark_id; default 0; tuned)")
    g.add_argument("--nonlandmark-k", type=int, default=d.nonlandmark_k,
                   help=f"non-landmark images averaged into that penalty (default {d.nonlandmark_k})")
    g.add_argument("--margin", type=finite_float, default=d.margin,
                   help="confidence -= this x the best other landmark's score (0..1, default 0; tuned)")
    g.add_argument("--nonlandmark-prior", type=finite_float, default=t.nonlandmark_prior,
                   help="the share of queries expected to show no database landmark, which weighs the two kinds of "
                        f"validation queries when the threshold is tuned (0..1, default {t.nonlandmark_prior})")
    g.add_argument("--gap-weight", type=finite_float, default=t.gap_weight,
                   help="the tuned threshold maximises this x GAP + (1 - this) x accuracy: 1 answers every query "
                        f"(best for a GLR submission), 0 the most right yes/no answers (default {t.gap_weight})")
    g.add_argument("--threshold-from", choices=["queries", "validation"], default=t.threshold_from,
                   help="fit the no-landmark threshold to the query set (default: the share of queries showing a "
                        "database landmark is estimated from their confidences beside the validation landmark "
                        "queries', then GAP and accuracy on the queries; needs "
                        f"{t.min_threshold_queries}+ answered queries, else the validation threshold is used) or to "
                        "the validation queries alone (each query's answer then does not depend on the others); "
                        "--classifier always uses the validation threshold")
    g.add_argument("--no-tune", action="store_true",
                   help="do not tune the confidence (top-1, votes, margin, non-landmark penalty, calibrated "
                        "inliers) and the threshold on validation queries made from the database: held-out "
                        f"landmark images (up to {t.landmark_queries:,}, several per class when classes are few), the "
                        "same images with their landmark removed from the database (unseen-landmark queries) and "
                        f"{t.nonlandmark_share * 100:.0f}%% of the known non-landmark images")


def vote_args(args) -> tuple[VoteConfig, TuneConfig | None]:
    if not (math.isfinite(args.min_confidence) and 0 <= args.min_confidence <= 1):
        raise CairnError("--min-confidence must be a number between 0 and 1")
    for flag in ("k", "nonlandmark_k"):
        if getattr(args, flag) < 1:
            raise CairnError(f"--{flag.replace('_', '-')} must be >= 1")
    try:
        vc = VoteConfig(k=args.k, min_confidence=args.min_confidence, aggregate=args.aggregate,
                        class_norm=args.class_norm, nonlandmark_k=args.nonlandmark_k,
                        nonlandmark_weight=args.nonlandmark_weight, margin=args.margin)
        tc = TuneConfig(nonlandmark_prior=args.nonlandmark_prior, gap_weight=args.gap_weight,
                        threshold_from=args.threshold_from)
    except ValueError as e:  # name the flag, not the field
        message = str(e)
        for field in ("nonlandmark_weight", "nonlandmark_prior", "nonlandmark_k", "class_norm", "gap_weight",
                      "min_confidence", "margin", "aggregate"):
            message = message.replace(field, "--" + field.replace("_", "-"))
        raise CairnError(f"recognition flags: {message}") from e
    return vc, None if args.no_tune else tc


def add_query_args(p) -> None:
    """The flags `cairn recognize` and `cairn neighbours` share: index, queries, output, search, Beam."""
    p.add_argument("--index", required=True, help="index folder from `cairn index`")
    p.add_argument("--features", required=True, help="query folder from `cairn extract`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--search-params", default=None,
                   help="FAISS search parameters for this run, e.g. nprobe=128 or efSearch=256 "
                        "(default: those stored with the index)")
    p.add_argument("--beam", choices=["auto", "on", "off"], default="auto",
                   help="search as a Beam job that loads the index once per worker (auto: for "
                        f"{BEAM_MIN_QUERIES:,}+ queries or a --runner other than DirectRunner)")
    add_worker_args(p)


def add_index_args(p) -> None:
    """The index-building flags (shared with `cairn compare`)."""
    d = IndexConfig()
    g = p.add_argument_group("index")
    g.add_argument("--factory", default=d.factory,
                   help="FAISS index_factory string (Flat, IVF4096,PQ64, HNSW32,Flat, ...; sizes FAISS would abort "
                        "on, e.g. HNSW0, are refused) or auto (default): "
                        "chosen from the vector count, dimension and --memory-budget")
    g.add_argument("--metric", default=d.metric, choices=["ip", "l2"],
                   help="ip: inner product = cosine on the L2-normalised descriptors (default); l2: Euclidean")
    g.add_argument("--search-params", default=d.search,
                   help="default search parameters stored with the index, FAISS syntax: nprobe=64 (IVF), "
                        "efSearch=128 (HNSW), k_factor_rf=16 (Refine); default: the auto choice's")
    g.add_argument("--memory-budget", default="0",
                   help="RAM the index may take, e.g. 4G (default: half of the available RAM); an IVF index "
                        "above it is merged with its inverted lists on disk")
    g.add_argument("--train-size", type=int, default=d.train_size,
                   help="vectors the index trains on (default: 40 per IVF list, at least 65,536)")
    g.add_argument("--shard-size", type=int, default=d.shard_size,
                   help=f"vectors added per shard before merging (default {d.shard_size:,})")
    g.add_argument("--on-disk", default=d.on_disk, choices=["auto", "on", "off"],
                   help="IVF inverted lists in OUT/index.ivfdata, memory-mapped (default auto: above the budget)")
    g.add_argument("--gpu", action="store_true", help="train, add and search on GPUs when FAISS sees some "
                   "(falls back to the CPU, with a log line, without one or for kinds the GPU lacks)")


def index_config(args) -> IndexConfig:
    try:
        return IndexConfig(factory=args.factory.strip(), metric=args.metric, search=args.search_params.strip(),
                           memory_budget=parse_memory(args.memory_budget), train_size=args.train_size,
                           shard_size=args.shard_size, on_disk=args.on_disk, use_gpu=args.gpu)
    except ValueError as e:
        raise CairnError(f"index flags: {e}") from e


def add_report_args(p) -> None:
    g = p.add_argument_group("report")
    d = ReportConfig()
    g.add_argument("--baseline", default=d.baseline,
                   help="baseline method of the report's query grids (default: the baseline with the best GAP)")
    g.add_argument("--deep", default=d.deep,
                   help="deep method of the query grids and Grad-CAM (default: the deep method with the best GAP)")
    g.add_argument("--examples", type=int, default=d.examples, help=f"queries per grid (default {d.examples})")
    g.add_argument("--gradcam", type=int, default=d.gradcam,
                   help=f"Grad-CAM examples (default {d.gradcam}; 0 = none, which skips loading TensorFlow)")


def report_config(args) -> ReportConfig:
    try:
        return ReportConfig(baseline=args.baseline, deep=args.deep, examples=args.examples, gradcam=args.gradcam)
    except ValueError as e:
        raise CairnError(f"report: {e}") from None


def method_list(text: str) -> list[str]:
    """One --methods value: a name, or names separated by commas ("hog,sift-bovw")."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no method name in {text!r}")
    return names


def method_names(values: list[list[str]] | None) -> list[str] | None:
    """--methods as one list of names, in order, each once (None when not given)."""
    if not values:
        return None
    return list(dict.fromkeys(n for names in values for n in names))


def add_compare_args(p: argparse.ArgumentParser) -> None:
    """The flags of `cairn compare` (and of the runs `cairn plan` measures)."""
    p.add_argument("--train", required=True, help="database manifest (CSV id,path,landmark_id; Parquet; or folder)")
    p.add_argument("--queries", required=True, help="query manifest (empty landmark_id = no landmark)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--methods", nargs="+", default=None, type=method_list,
                   help=f"methods to compare, separated by spaces or commas (default: every method built: "
                        f"{' '.join(methods.available())}; cnn-pretrained only with --set cnn_pretrained.model=PATH)")
    p.add_argument("--boxes", default="",
                   help="landmark boxes of the images (CSV id,xmin,ymin,xmax,ymax[,width,height], or image_path "
                        "instead of id, or PASCAL VOC XML): cnn+det and cnn-pretrained+det train their detector on the "
                        "database's boxes, and the queries' boxes score its detections (AP@0.5, mean IoU)")
    add_vote_args(p)
    add_index_args(p)
    add_set_arg(p)
    add_report_args(p)
    add_beam_job_args(p)


def compare_kwargs(args, beam_args: list[str]) -> dict:
    """pipeline.run.compare.compare's arguments from parsed compare flags."""
    config = parse_overrides(args.set)
    names = method_names(args.methods) or methods.defaults(bool(config.cnn_pretrained.model),
                                             bool(args.boxes or config.detect.detect.model))
    vote, tune = vote_args(args)
    return dict(train=args.train, queries=args.queries, out=args.out, method_names=names,
                decode=decode_config(args), workers=args.workers, threads=args.threads_per_worker,
                beam_args=beam_args, vote=vote, tune=tune, index=index_config(args), force=args.force,
                config=config, report=report_config(args), boxes=args.boxes)


def summary_table(metrics: dict) -> str:
    width = max([14] + [len(name) + 2 for name in metrics["methods"]])
    head = f"{'method':<{width}}{'GAP':>8}{'acc':>8}{'lm-acc':>8}{'mAP@100':>9}{'img/s':>9}{'bytes/img':>11}"
    rows = [head, "-" * len(head)]
    for name, m in metrics["methods"].items():
        q, c = m["quality"], m["cost"]
        rows.append(f"{name:<{width}}{_figure(q['gap']):>8}{_figure(q['accuracy']):>8}"
                    f"{_figure(q['landmark_accuracy']):>8}{_figure(q['map_at_100']):>9}"
                    f"{c.get('images_per_second') or 0:>9.1f}{c.get('bytes_per_image') or 0:>11,}")
    notes = sorted({m["quality"].get("note") for m in metrics["methods"].values()} - {None})
    return "\n".join(rows + [f"n/a: {note}" for note in notes])


def _figure(value) -> str:
    """A quality figure with 3 decimals, or n/a where it is undefined (null in metrics.json)."""
    return "n/a" if value is None else f"{value:.3f}"


def accounting_lines(accounting: dict) -> list[str]:
    """One line per method and split: manifest rows = images used + dead letters (by stage)."""
    lines = []
    for name in sorted(accounting, key=lambda n: list(methods.METHODS).index(n) if n in methods.METHODS else 99):
        splits = accounting[name]["splits"]
        for split, c in sorted(splits.items(), key=lambda kv: kv[0] != "train"):
            stages = ", ".join(f"{k} {v}" for k, v in sorted(c["dead_by_stage"].items())) or "none"
            lines.append(f"  {name:20s} {split:8s} {c['inputs']:6d} rows = {c['outputs']:6d} used + "
                         f"{c['dead_letters']:5d} dead letters ({stages})")
    return lines


def print_compare(out: str, metrics: dict) -> None:
    """What `cairn compare` prints at its end: the summary, the records of every method, where the outputs are."""
    print(summary_table(metrics))
    print("records (every manifest row is used or a dead letter):")
    print("\n".join(accounting_lines(cfg.load_json(fs.join(out, "accounting.json")))))
    print(f"report:       {fs.join(out, 'report.html')}")
    print(f"metrics:      {fs.join(out, 'metrics.json')}")
    print(f"predictions:  {fs.join(out, 'predictions')}/")
    print(f"neighbours:   {fs.join(out, 'neighbours')}/")
    print(f"dead letters: {fs.join(out, 'dead_letters.csv')}")
