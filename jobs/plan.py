"""cairn plan: what a comparison run will cost, before it runs, measured on samples of its own manifests.

Runs `cairn compare` (the same methods, --set parameters and boxes) on two samples of the manifests on this
machine, each in a process of its own: SAMPLE and SAMPLE/4 database images (whole classes, the non-landmark
images at the same rate, the queries at the same rate as the database), with every stage recorded
(pipeline/run/ledger.py). Each stage's time is fitted as fixed + per-unit cost over the two samples, where a unit
is what the stage's work grows with: images for extraction, encoding, fine-tuning and index adds; SGD steps
timed at the target's shape for the softmax classifiers; sampled descriptors (capped by the vocabulary's sample
size) for k-means; queries x database vectors for the search (queries x classes for a classifier); held-out
database images for the vote tuning. The fit is then projected to the whole manifests (or to --target sizes)
on --workers workers: the stages that run on Beam workers (extraction, encoding, descriptor sampling, and with
a cluster the index adds) divide their per-unit time by the cluster's cores over the cores they used here; the
rest (training, index training and merging, search, tuning, the report) runs on the launching machine, assumed
as fast as this one.

Prints, per stage and in all, the projected time, the storage written (features, models, indices) and the
memory each index takes (CPU, or GPU with --device gpu), with every assumption; writes OUT/plan.json and
OUT/plan.csv. The measured run it is checked against is in BENCHMARKS.md (section "scale", `make bench-scale`).
Read the total as an estimate and the small stages as rough: with the default samples on a 2-core machine, two
plans of the same run differed by 4% and 9% in total, and a stage of a few seconds on the samples (the report, HoG's
extraction) by up to five times (`make bench-plan`); a larger --sample narrows both.
"""

from __future__ import annotations

import sys

from jobs import common
from jobs.cli import leave, one_line
from jobs.logs import setup_logging
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.options import LOCAL_RUNNERS, pipeline_options, runner_name, sized_as
from pipeline.run import ledger
from pipeline.run.compare import compare
from pipeline.run.plan import describe, make_plan


def build_parser():
    p = common.parser("cairn plan", __doc__, beam=True)
    common.add_compare_args(p)
    p.allow_abbrev = False
    p.epilog = ("Beam flags are passed to the sample runs, which run on this machine (DirectRunner); the projection "
                "is for the runner you will use.")
    for action in p._actions:  # --train is the manifest to plan (alias --manifest); --out is the plan's folder
        if action.dest == "train":
            action.option_strings.append("--manifest")
            p._option_string_actions["--manifest"] = action
        if action.dest == "out":
            action.help = "the plan's folder: plan.json, plan.csv and the sample runs (work/)"
        if action.dest == "workers":  # the cluster's workers; the samples run with the automatic local ones
            action.type, action.default = str, "1"
            action.help = ("PLAN: workers to project for, comma-separated, e.g. 1,10,100 (default 1: this "
                           "machine); the samples run here with the automatic DirectRunner workers")
        if action.dest == "force":
            action.help = "PLAN: measure the samples again even with --reuse"
    g = p.add_argument_group("plan")
    g.add_argument("--sample", type=int, default=800,
                   help="database images of the larger sample (default 800; the smaller has a quarter: the wider "
                        "the two sizes lie apart, the less start-up noise tilts the fitted per-image costs)")
    g.add_argument("--cores-per-worker", type=int, default=0,
                   help="cores of each worker (default: this machine's)")
    g.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="where the index is searched: the memory figure is for the CPU or a GPU")
    g.add_argument("--target", default="",
                   help="sizes to project instead of the manifests', e.g. train=1000000,classes=13000,queries=100000")
    g.add_argument("--reuse", action="store_true",
                   help="reuse OUT/work's sample measurements when they were made with the same flags and manifests")
    return p


# the command that runs one sample: a fresh process, as a real run (see pipeline/run/plan.py, measure)
CHILD = [sys.executable, "-c", "import sys; from jobs.plan import measure_child; sys.exit(measure_child(sys.argv[1]))"]


def run(argv=None, test_pipeline=None) -> dict:
    argv = list(sys.argv[2:] if argv is None else argv)
    args, _ = common.parse(build_parser(), argv, beam=True)
    if args.sample < 20:
        raise CairnError("--sample must be at least 20 database images")
    try:
        worker_counts = [int(w) for w in str(args.workers).split(",") if w.strip()]
    except ValueError:
        worker_counts = []
    if not worker_counts or min(worker_counts) < 1:
        raise CairnError(f"--workers {args.workers!r}: give worker counts >= 1, e.g. 1,10,100")
    compare_argv = _compare_argv(argv)
    runner = runner_name(pipeline_options(_compare_argv(argv, beam_only=True)))
    if runner not in LOCAL_RUNNERS:
        raise CairnError(f"--runner={runner}: cairn plan measures its samples on this machine; give the cluster's "
                         "size with --workers and --cores-per-worker, and no --runner")
    ic = common.index_config(args)
    with common.writing(args.out, "plan", argv):
        record = make_plan(compare_argv, args.train, args.queries, args.out, CHILD, sample=args.sample,
                           worker_counts=tuple(worker_counts), cores_per_worker=args.cores_per_worker,
                           device=args.device, target=args.target, reuse=args.reuse, force=args.force,
                           memory_budget=ic.memory_budget, factory=ic.factory, search=ic.search)
    for res in record["plans"]:
        print(describe(res))
        print()
    print(f"plan: {fs.join(args.out, 'plan.json')} and plan.csv; the sample runs are in {fs.join(args.out, 'work')}/")
    return record


def measure_child(spec_path: str) -> int:
    """A sample run's own process: `cairn compare` with its stages recorded into the spec's "result" (its printed
    summary goes to the sample's compare.log), each stage sized as on the whole manifests."""
    spec = cfg.load_json(spec_path)
    setup_logging(verbose=bool(spec.get("verbose")))
    try:
        args, beam_args = common.parse_beam_job(_compare_parser(), spec["argv"])
        with ledger.recording() as stages, sized_as(float(spec["factor"])):
            metrics = compare(**common.compare_kwargs(args, beam_args))
        common.print_compare(args.out, metrics)
    except (CairnError, OSError) as e:
        if isinstance(e, OSError) and e.filename is None:  # not about a path: a bug, with its traceback
            raise
        print(f"cairn plan: the sample run failed: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    cfg.save_json(spec["result"], {"stages": stages})
    leave(0)  # as the cairn command does: no interpreter finalisation, where a library thread could abort it


def _compare_parser():
    p = common.parser("cairn compare", "", beam=True)
    common.add_compare_args(p)
    return p


PLAN_ONLY = {"--sample": 1, "--workers": 1, "--cores-per-worker": 1, "--device": 1, "--target": 1, "--reuse": 0,
             "--force": 0, "--train": 1, "--manifest": 1, "--queries": 1, "--out": 1}


def _compare_argv(argv: list[str], beam_only: bool = False) -> list[str]:
    """The compare arguments of a plan's command line (without the plan's own and the manifests/out); with
    ``beam_only``, the flags that go to Beam (those compare does not know)."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in PLAN_ONLY:
            skip = PLAN_ONLY[name] if "=" not in a else 0
            continue
        out.append(a)
    if beam_only:
        _, beam = common.parse(_compare_parser(), ["--train", "t", "--queries", "q", "--out", "o", *out], beam=True)
        return beam
    return out
