"""cairn demo: generate the synthetic landmark set and run `cairn compare` on it with every built method.

Writes OUT/data (the synthetic set) and OUT/run (the comparison: metrics.json, predictions/, ...). The set's
landmark boxes (OUT/data/boxes.csv) train the detector of cnn+det and cnn-pretrained+det and score it.
Reruns reuse what is already there when the config is the same.

The deep methods use a MobileNet v1: with --pretrained FILE.tflite (an ImageNet MobileNet v1 extractor, such
as ../shared/weights/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite, which `make demo` passes when it is
there) cnn-pretrained embeds with that file and cnn starts its fine-tuning from its weights; without it,
cnn-pretrained is left out and cnn starts from random weights.

With --bad-inputs the comparison runs on OUT/data/train-bad.csv and queries-bad.csv: the synthetic set with
every kind of broken or odd input mixed in (see `cairn synth --help`); OUT/data/bad_inputs.csv says what
each record is, and OUT/run/dead_letters.csv what every method made of it.
"""

from __future__ import annotations

import os

from jobs import common
from pipeline import config as cfg
from pipeline.run.demo import demo
from pipeline.synthetic import SynthConfig


def build_parser():
    p = common.parser("cairn demo", __doc__, beam=True)
    p.add_argument("--out", default="demo", help="output folder (default ./demo)")
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed (default 0)")
    p.add_argument("--classes", type=int, default=SynthConfig.classes, help="landmark classes")
    p.add_argument("--views", type=int, default=SynthConfig.views, help="database images of the largest class")
    p.add_argument("--methods", nargs="+", default=None, type=common.method_list,
                   help="methods to compare, separated by spaces or commas (default: every built method; "
                        "cnn-pretrained needs --pretrained)")
    p.add_argument("--pretrained", default="",
                   help="a TFLite MobileNet v1 ImageNet extractor: cnn-pretrained's model and cnn's initial weights")
    p.add_argument("--bad-inputs", action="store_true",
                   help="mix every kind of broken or odd input into the set (truncated, CMYK, EXIF-rotated, bombs, "
                        "missing files, bad manifest rows) and compare on that")
    common.add_vote_args(p)
    common.add_set_arg(p)
    common.add_report_args(p)
    common.add_beam_job_args(p, decode=False)
    return p


def run(argv=None, test_pipeline=None) -> dict:
    """``test_pipeline``: a function that gives a new test pipeline for each of the run's Beam jobs."""
    args, beam_args = common.parse_beam_job(build_parser(), argv)
    vote, tune = common.vote_args(args)
    report = common.report_config(args)
    with common.writing(args.out, "demo", argv):
        made, metrics = demo(args.out, SynthConfig(seed=args.seed, classes=args.classes, views=args.views),
                             common.method_names(args.methods), args.pretrained, args.set, args.bad_inputs,
                             workers=args.workers, threads=args.threads_per_worker, beam_args=beam_args,
                             force=args.force, vote=vote, tune=tune, report=report, test_pipeline=test_pipeline)
    data, run_dir = os.path.join(args.out, "data"), os.path.join(args.out, "run")
    print()
    print(common.summary_table(metrics))
    print()
    print("records (every manifest row is used or a dead letter):")
    print("\n".join(common.accounting_lines(cfg.load_json(os.path.join(run_dir, "accounting.json")))))
    print(f"data:         {data}/ (train.csv, queries.csv, boxes.csv, images/)")
    if args.bad_inputs:
        print(f"bad inputs:   {made['bad_inputs']['records']} (what each record is and what a job makes of it)")
    print(f"report:       {os.path.join(run_dir, 'report.html')}  (open it in a browser)")
    print(f"metrics:      {os.path.join(run_dir, 'metrics.json')}")
    print(f"predictions:  {os.path.join(run_dir, 'predictions')}/<method>.csv")
    print(f"neighbours:   {os.path.join(run_dir, 'neighbours')}/<method>.parquet")
    print(f"dead letters: {os.path.join(run_dir, 'dead_letters.csv')}")
    return metrics
