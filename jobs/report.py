"""cairn report: score a `cairn compare` run and write its report, from the run's outputs alone.

Reads RUN/run.json, the run's two manifests, RUN/predictions/<method>.csv, RUN/neighbours/<method>.parquet,
RUN/work/<method>/costs.json and RUN/dead_letters.csv; no feature is recomputed. Writes:
    RUN/metrics.json   per method: quality (gap, accuracy, landmark_accuracy, map_at_100, recall_at_k,
                       mean_class_ap), cost (images_per_second, train_seconds, index_seconds, bytes_per_image,
                       index_bytes, ...), counts and config; plus the data counts, the run config and definitions
    RUN/per_class.csv  per method and landmark class: database images, queries, correct, accuracy, AP
    RUN/report.html    one self-contained page (open it in any browser, offline): summary table, quality vs
                       cost, precision-recall, per-class accuracy, confusions, query grids, Grad-CAM,
                       dead letters, config
`cairn compare` runs this at its end; run it again to change what the report shows (--baseline, --deep, ...).
"""

from __future__ import annotations

from jobs import common
from pipeline import fs
from pipeline.run.compare import report


def build_parser():
    p = common.parser("cairn report", __doc__)
    p.add_argument("run", help="the --out folder of a `cairn compare` run")
    common.add_report_args(p)
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, _ = common.parse(build_parser(), argv)
    config = common.report_config(args)
    with common.writing(args.run, "report", argv, flag="RUN folder"):
        metrics = report(args.run, config)
    print(common.summary_table(metrics))
    print(f"metrics:   {fs.join(args.run, 'metrics.json')}")
    print(f"per class: {fs.join(args.run, 'per_class.csv')}")
    print(f"report:    {fs.join(args.run, 'report.html')}")
    return metrics
