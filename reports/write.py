"""A compare run scored and reported from its outputs alone (`cairn report`, and the end of `cairn compare`).

Reads RUN/run.json, the run's two manifests, RUN/predictions/<method>.csv, RUN/neighbours/<method>.parquet,
RUN/work/<method>/costs.json and RUN/dead_letters.csv; writes RUN/metrics.json, RUN/per_class.csv and
RUN/report.html. What each method is (family, summary, config sections) comes from the caller
(pipeline/run/methods.py: descriptions), so this package knows no method by name.
"""

from __future__ import annotations

import logging

from pipeline import config as cfg
from pipeline import fs
from reports.html import ReportConfig, build_report
from reports.results import load_run, metrics_of, per_class_rows, write_per_class

log = logging.getLogger(__name__)


def write_metrics(run_dir: str, report: ReportConfig | None = ReportConfig(), strict: bool = True,
                  methods: dict[str, dict] | None = None) -> dict:
    """Write RUN/metrics.json, RUN/per_class.csv and (unless ``report`` is None) RUN/report.html; ``methods``:
    what each method is (pipeline/run/methods.py: descriptions).

    With ``strict=False`` (at the end of `cairn compare`) a failure to draw the report is logged rather than
    raised: the metrics are written first, and `cairn report RUN` draws the report again."""
    res = load_run(run_dir, methods)
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
