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

import logging

from jobs import common
from pipeline import fs
from reports.html import ReportConfig, build_report
from reports.results import load_run, metrics_of, per_class_rows, write_per_class

log = logging.getLogger(__name__)


def write_metrics(run_dir: str, report: ReportConfig | None = ReportConfig(), strict: bool = True) -> dict:
    """Write RUN/metrics.json, RUN/per_class.csv and (unless ``report`` is None) RUN/report.html.

    With ``strict=False`` (at the end of `cairn compare`) a failure to draw the report is logged rather than
    raised: the metrics are written first, and `cairn report RUN` draws the report again."""
    from pipeline import config as cfg

    res = load_run(run_dir)
    metrics = metrics_of(res)
    cfg.save_json(fs.join(run_dir, "metrics.json"), metrics)
    write_per_class(fs.join(run_dir, "per_class.csv"), per_class_rows(res))
    if report is not None:
        try:
            fs.write_text(fs.join(run_dir, "report.html"), build_report(res, metrics, report))
        except Exception as e:
            if strict:
                raise
            log.error("report: could not draw %s (%s: %s); the metrics are written, and `cairn report %s` "
                      "draws it again", fs.join(run_dir, "report.html"), type(e).__name__, e, run_dir)
        else:
            log.info("report: %s", fs.join(run_dir, "report.html"))
    return metrics


def summary_table(metrics: dict) -> str:
    width = max([14] + [len(name) + 2 for name in metrics["methods"]])
    head = f"{'method':<{width}}{'GAP':>8}{'acc':>8}{'lm-acc':>8}{'mAP@100':>9}{'img/s':>9}{'bytes/img':>11}"
    rows = [head, "-" * len(head)]
    for name, m in metrics["methods"].items():
        q, c = m["quality"], m["cost"]
        rows.append(f"{name:<{width}}{q['gap']:>8.3f}{q['accuracy']:>8.3f}{q['landmark_accuracy']:>8.3f}"
                    f"{q['map_at_100']:>9.3f}{c.get('images_per_second') or 0:>9.1f}"
                    f"{c.get('bytes_per_image') or 0:>11,}")
    return "\n".join(rows)


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
    from pipeline.errors import CairnError

    try:
        return ReportConfig(baseline=args.baseline, deep=args.deep, examples=args.examples, gradcam=args.gradcam)
    except ValueError as e:
        raise CairnError(f"report: {e}") from None


def build_parser():
    p = common.parser("cairn report", __doc__)
    p.add_argument("run", help="the --out folder of a `cairn compare` run")
    add_report_args(p)
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, _ = common.parse(build_parser(), argv)
    metrics = write_metrics(args.run, report_config(args))
    print(summary_table(metrics))
    print(f"metrics:   {fs.join(args.run, 'metrics.json')}")
    print(f"per class: {fs.join(args.run, 'per_class.csv')}")
    print(f"report:    {fs.join(args.run, 'report.html')}")
    return metrics
