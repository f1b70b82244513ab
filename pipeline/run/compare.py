"""`cairn compare`: every chosen method on the same train and query manifests, scored together.

For each method its recipe (pipeline/run/recipes.py, found in the registry: methods.py) extracts database and
query descriptors, trains what the method learns and builds its index; its queries are recognised; then all
methods are scored together and the report is written (reports/write.py). The outputs are listed in
`cairn compare --help` (jobs/compare.py).
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from index.faiss_index import IndexConfig
from index.recognize import TuneConfig, VoteConfig
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError, parse_dead_letters
from pipeline.images import DecodeConfig
from pipeline.manifest import manifest_fingerprint, read_manifest
from pipeline.run import ledger, methods
from pipeline.run.recipes import NoDatabaseImages, RunContext, run_method
from pipeline.run.settings import MethodsConfig
from pipeline.submission import read_submission, write_submission
from reports.html import ReportConfig
from reports.write import write_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompareConfig:
    """A comparison run, saved as OUT/run.json."""

    train: str  # database manifest (absolute path)
    queries: str  # query manifest (absolute path)
    methods: tuple[str, ...]  # methods, in report order
    decode: DecodeConfig = DecodeConfig()  # image decoding, the same for every method
    vote: VoteConfig = VoteConfig()  # kNN recognition (the starting point of tuning)
    tune: TuneConfig | None = TuneConfig()  # tune the vote on held-out database images (None = off)
    index: IndexConfig = IndexConfig()  # the FAISS index of every dense method
    neighbours: int = 100  # database images listed per query (mAP@100 needs 100)
    boxes: str = ""  # landmark boxes (pipeline/boxes.py): train the +det methods' detector, score its detections
    workers: int = 0  # DirectRunner worker processes (0 = automatic)
    beam_args: tuple[str, ...] = ()  # Beam flags passed through
    methods_config: MethodsConfig = MethodsConfig()  # every method's parameters (pipeline/run/settings.py)


def compare(train: str, queries: str, out: str, method_names: list[str], *, decode: DecodeConfig = DecodeConfig(),
            workers: int = 0, threads: int = 0, beam_args: list[str] | None = None, vote: VoteConfig = VoteConfig(),
            neighbours: int = 100, force: bool = False, config: MethodsConfig = MethodsConfig(),
            tune: TuneConfig | None = TuneConfig(), index: IndexConfig = IndexConfig(),
            report: ReportConfig | None = ReportConfig(), boxes: str = "", test_pipeline: Callable | None = None) -> dict:
    """Run and score ``method_names`` (see the module docstring); returns metrics.json's content.
    ``test_pipeline``: a function giving a new test pipeline for each Beam job (tests)."""
    names = methods.check(method_names)
    for name in names:
        try:
            methods.METHODS[name].check_sections(config)
        except ValueError as e:
            raise CairnError(str(e)) from None
    for side in ("baseline", "deep"):
        chosen = getattr(report, side) if report else ""
        if chosen and chosen not in names:
            raise CairnError(f"--{side} {chosen}: not among the methods of this run ({', '.join(names)})")
    fs.check_output_folder(out)
    train, queries = fs.absolute(train), fs.absolute(queries)
    if boxes and not fs.exists(boxes):
        raise CairnError(f"--boxes {boxes}: no such file or folder")
    boxes = fs.absolute(boxes) if boxes else ""
    needs_boxes = [n for n in names if methods.METHODS[n].needs_boxes]
    if needs_boxes and not boxes and not config.detect.detect.model:
        raise CairnError(f"{', '.join(needs_boxes)} need a detector: --boxes FILE "
                         "(the database's landmark boxes, to train one) or --set detect.detect.model=PATH")
    # read both now: a bad manifest fails before any heavy work
    read = {split: read_manifest(path) for split, path in (("train", train), ("queries", queries))}
    fingerprints = {split: manifest_fingerprint(m.source, m) for split, m in read.items()}
    fs.makedirs(out)
    run_config = CompareConfig(train, queries, tuple(names), decode, vote, tune, index, neighbours, boxes, workers,
                               tuple(beam_args or ()), config)
    described = methods.descriptions()
    cfg.save_json(fs.join(out, "run.json"), {"config": cfg.to_dict(run_config), "methods": names,
                                             "manifest_sha256": fingerprints,
                                             # so that `cairn report` knows a method the registry does not
                                             "method_descriptions": {n: described[n] for n in names}})
    remove_dropped_methods(out, names)
    ctx = RunContext(train, queries, fs.join(out, "work"), decode, workers, threads, tuple(beam_args or ()), vote,
                     neighbours, force, tune=tune, index=index, boxes=boxes, test_pipelines=test_pipeline)
    query_ids = read["queries"].ids
    dead_rows, accounting = [], {}
    for name in names:
        log.info("compare: method %s", name)
        try:
            result = run_method(methods.METHODS[name], config, ctx)
        except NoDatabaseImages as e:  # the run ends, with what became of every row written where it says
            accounting[name] = {"splits": {split: r["counts"] for split, r in e.records.items()}, "index": None}
            dead_rows += _dead_rows(name, {split: r["outputs"]["dead_letters"] for split, r in e.records.items()})
            write_accounting(out, dead_rows, accounting)
            raise CairnError(f"{name}: {e}; each row's reason is in {fs.join(out, 'dead_letters.csv')} and the "
                             f"counts in {fs.join(out, 'accounting.json')}") from None
        cfg.save_json(fs.join(out, "work", name, "costs.json"), result["costs"])
        complete_submission(fs.join(result["recognize"], "predictions.csv"), query_ids,
                            fs.join(out, "predictions", f"{name}.csv"))
        fs.copy_file(fs.join(result["recognize"], "neighbours.parquet"), fs.join(out, "neighbours", f"{name}.parquet"))
        fs.copy_file(fs.join(result["recognize"], "confidences.parquet"),
                     fs.join(out, "confidences", f"{name}.parquet"))
        dead_rows += _dead_rows(name, result["dead_letters"])
        accounting[name] = {"splits": result["counts"], "index": result["index"]}
    write_accounting(out, dead_rows, accounting)
    with ledger.stage("report", fs.join(out, "report.html"), name="metrics and report") as st:
        st.update(units=len(query_ids) * len(names), grows=[["queries", None]])
        return write_metrics(out, report, strict=False, methods=methods.descriptions())


# each method's results in OUT: folder -> the file name's ending
METHOD_OUTPUTS = {"predictions": ".csv", "confidences": ".parquet", "neighbours": ".parquet"}


def remove_dropped_methods(out: str, names: list[str]) -> None:
    """Remove the results (METHOD_OUTPUTS) of methods that are not among ``names`` from OUT: an earlier run into
    this folder with other methods left them, and they would be taken for this run's."""
    for folder, ending in METHOD_OUTPUTS.items():
        pattern = fs.join(fs.escape(fs.join(out, folder)), f"*{ending}")
        stale = [p for p in fs.glob(pattern) if posixpath.basename(p)[: -len(ending)] not in names]
        for path in stale:
            log.info("compare: removed %s: %s is not among this run's methods", path,
                     posixpath.basename(path)[: -len(ending)])
        fs.delete(stale)


def _dead_rows(method: str, dead_letters: dict[str, str]) -> list[tuple]:
    """(method, split, id, stage, reason, path) of every dead letter in the CSV files ``dead_letters`` {split: path}."""
    return [(method, split, *d) for split, path in dead_letters.items() for d in parse_dead_letters(fs.read_text(path))]


def write_accounting(out: str, dead_rows: list[tuple], accounting: dict) -> None:
    """OUT/dead_letters.csv (every method's dead letters, ``dead_rows``) and OUT/accounting.json."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("method", "split", "id", "stage", "reason", "path"))
    w.writerows(dead_rows)
    fs.write_text(fs.join(out, "dead_letters.csv"), buf.getvalue())
    cfg.save_json(fs.join(out, "accounting.json"), accounting)


def report(run_dir: str, config: ReportConfig = ReportConfig()) -> dict:
    """`cairn report`: a compare run's metrics.json, per_class.csv and report.html written again from its
    outputs, its methods described by the registry (or, for one the registry does not hold now, by the run)."""
    run_path = fs.join(run_dir, "run.json")
    saved = cfg.load_json(run_path).get("method_descriptions", {}) if fs.exists(run_path) else {}
    return write_metrics(run_dir, config, methods={**saved, **methods.descriptions()})


def complete_submission(source: str, query_ids: list[str], target: str) -> None:
    """Copy a submission to ``target`` with a row for every query id, in manifest order: the queries a method
    could not read (its dead letters) get an empty prediction, so the file is complete for GLR scoring."""
    answered = read_submission(source)
    unknown = set(answered) - set(query_ids)
    if unknown:
        raise RuntimeError(f"{source} answers {len(unknown)} ids that are not queries (e.g. {sorted(unknown)[0]}). "
                           "This is a bug; please report it")
    rows = [answered.get(q) or (-1, 0.0) for q in query_ids]
    write_submission(target, query_ids, np.array([p for p, _ in rows], np.int64),
                     np.array([c for _, c in rows], np.float32))
