"""cairn demo: generate the synthetic landmark set and run `cairn compare` on it with every built method.

Writes OUT/data (the synthetic set) and OUT/run (the comparison: metrics.json, predictions/, ...).
Reruns reuse what is already there when the config is the same.
"""

from __future__ import annotations

import os

from jobs import common, methods
from jobs.compare import compare
from jobs.report import summary_table
from jobs.synth import synth
from pipeline.synthetic import SynthConfig


def build_parser():
    p = common.parser("cairn demo", __doc__, beam=True)
    p.add_argument("--out", default="demo", help="output folder (default ./demo)")
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed (default 0)")
    p.add_argument("--classes", type=int, default=SynthConfig.classes, help="landmark classes")
    p.add_argument("--views", type=int, default=SynthConfig.views, help="database images of the largest class")
    p.add_argument("--methods", nargs="+", default=methods.available(), help="methods to compare")
    common.add_beam_job_args(p, decode=False)
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, beam_args = common.parse_beam_job(build_parser(), argv)
    data = os.path.join(args.out, "data")
    synth(data, SynthConfig(seed=args.seed, classes=args.classes, views=args.views), force=args.force)
    run_dir = os.path.join(args.out, "run")
    metrics = compare(os.path.join(data, "train.csv"), os.path.join(data, "queries.csv"), run_dir, args.methods,
                      workers=args.workers, threads=args.threads_per_worker, beam_args=beam_args, force=args.force)
    print()
    print(summary_table(metrics))
    print()
    print(f"data:         {data}/ (train.csv, queries.csv, boxes.csv, images/)")
    print(f"metrics:      {os.path.join(run_dir, 'metrics.json')}")
    print(f"predictions:  {os.path.join(run_dir, 'predictions')}/<method>.csv")
    print(f"neighbours:   {os.path.join(run_dir, 'neighbours')}/<method>.parquet")
    print(f"dead letters: {os.path.join(run_dir, 'dead_letters.csv')}")
    return metrics
