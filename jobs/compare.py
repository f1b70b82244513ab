"""cairn compare: run every chosen method on the same train and query manifests and compare them.

For each method: extract database and query descriptors (Beam jobs), train what the method learns, build the
index, recognise the queries; then score all methods together. Writes to OUT:
    report.html                   the comparison as one self-contained page (tables, plots, examples, Grad-CAM)
    metrics.json                  one entry per method: quality (gap, accuracy, map_at_100, recall_at_k, ...),
                                  cost (images_per_second, bytes_per_image, ...), counts and config
    per_class.csv                 per method and landmark class: accuracy and AP
    predictions/<method>.csv      Google Landmark Recognition submission format: every query id of the manifest,
                                  in its order (an empty landmarks cell: no landmark, or a dead letter)
    neighbours/<method>.parquet   top database images per query (query_id, rank, id, score, landmark_id)
    work/<method>/embeddings/     for +det methods: one row per region (full image + detected boxes) with its box
    dead_letters.csv              method,split,id,stage,reason,path for every image a method could not use
    run.json                      the resolved config
    accounting.json               per method: for each split the manifest rows, images used and dead letters by
                                  stage (rows = used + dead letters), and the index it searched
    work/<method>/...             intermediate outputs (features, index), reused by reruns with the same config
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass

from index.faiss_index import IndexConfig
from index.recognize import TuneConfig, VoteConfig
from jobs import common, methods
from jobs.classic import MethodsConfig, RunContext, parse_overrides, run_method
from jobs.index import add_index_args, index_config
from jobs.recognize import add_vote_args, vote_args
from jobs.report import add_report_args, report_config, summary_table, write_metrics
from jobs.train import add_set_arg
from pipeline import config as cfg
from pipeline import fs, stages
from pipeline.errors import CairnError, parse_dead_letters
from pipeline.images import DecodeConfig
from pipeline.manifest import manifest_fingerprint, read_manifest
from reports.html import ReportConfig

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
    methods_config: MethodsConfig = MethodsConfig()  # every method's parameters (jobs/classic.py)


def compare(train: str, queries: str, out: str, method_names: list[str], *, decode: DecodeConfig = DecodeConfig(),
            workers: int = 0, threads: int = 0, beam_args: list[str] | None = None, vote: VoteConfig = VoteConfig(),
            neighbours: int = 100, force: bool = False, config: MethodsConfig = MethodsConfig(),
            tune: TuneConfig | None = TuneConfig(), index: IndexConfig = IndexConfig(),
            report: ReportConfig | None = ReportConfig(), boxes: str = "") -> dict:
    names = methods.check(method_names)
    for side in ("baseline", "deep"):
        chosen = getattr(report, side) if report else ""
        if chosen and chosen not in names:
            raise CairnError(f"--{side} {chosen}: not among the methods of this run ({', '.join(names)})")
    fs.check_output_folder(out)
    train, queries = fs.absolute(train), fs.absolute(queries)
    if boxes and not fs.exists(boxes):
        raise CairnError(f"--boxes {boxes}: no such file or folder")
    boxes = fs.absolute(boxes) if boxes else ""
    if any(n in methods.NEEDS_BOXES for n in names) and not boxes and not config.detect.detect.model:
        raise CairnError(f"{', '.join(n for n in names if n in methods.NEEDS_BOXES)} need a detector: --boxes FILE "
                         "(the database's landmark boxes, to train one) or --set detect.detect.model=PATH")
    # read both now: a bad manifest fails before any heavy work
    read = {split: read_manifest(path) for split, path in (("train", train), ("queries", queries))}
    fingerprints = {split: manifest_fingerprint(m.source, m) for split, m in read.items()}
    fs.makedirs(out)
    run_config = CompareConfig(train, queries, tuple(names), decode, vote, tune, index, neighbours, boxes, workers,
                               tuple(beam_args or ()), config)
    cfg.save_json(fs.join(out, "run.json"), {"config": cfg.to_dict(run_config), "methods": names,
                                             "manifest_sha256": fingerprints})
    ctx = RunContext(train, queries, fs.join(out, "work"), decode, workers, threads, tuple(beam_args or ()), vote,
                     neighbours, force, tune=tune, index=index, boxes=boxes)
    query_ids = read["queries"].ids
    dead_rows, accounting = [], {}
    for name in names:
        log.info("compare: method %s", name)
        result = run_method(name, config, ctx)
        cfg.save_json(fs.join(out, "work", name, "costs.json"), result["costs"])
        complete_submission(fs.join(result["recognize"], "predictions.csv"), query_ids,
                            fs.join(out, "predictions", f"{name}.csv"))
        fs.copy_file(fs.join(result["recognize"], "neighbours.parquet"), fs.join(out, "neighbours", f"{name}.parquet"))
        for split, path in result["dead_letters"].items():
            for d in parse_dead_letters(fs.read_text(path)):
                dead_rows.append((name, split, *d))
        accounting[name] = {"splits": result["counts"], "index": result["index"]}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("method", "split", "id", "stage", "reason", "path"))
    w.writerows(dead_rows)
    fs.write_text(fs.join(out, "dead_letters.csv"), buf.getvalue())
    cfg.save_json(fs.join(out, "accounting.json"), accounting)
    with stages.stage("report", fs.join(out, "report.html"), name="metrics and report") as st:
        st.update(units=len(query_ids) * len(names), grows=[["queries", None]])
        return write_metrics(out, report, strict=False)


def complete_submission(source: str, query_ids: list[str], target: str) -> None:
    """Copy a submission to ``target`` with a row for every query id, in manifest order: the queries a method
    could not read (its dead letters) get an empty prediction, so the file is complete for GLR scoring."""
    import numpy as np

    from pipeline.submission import read_submission, write_submission

    answered = read_submission(source)
    unknown = set(answered) - set(query_ids)
    if unknown:
        raise RuntimeError(f"{source} answers {len(unknown)} ids that are not queries (e.g. {sorted(unknown)[0]}). "
                           "This is a bug; please report it")
    rows = [answered.get(q) or (-1, 0.0) for q in query_ids]
    write_submission(target, query_ids, np.array([p for p, _ in rows], np.int64),
                     np.array([c for _, c in rows], np.float32))


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


def build_parser():
    p = common.parser("cairn compare", __doc__ + "\nMethods:\n" + methods.describe(), beam=True)
    p.add_argument("--train", required=True, help="database manifest (CSV id,path,landmark_id; Parquet; or folder)")
    p.add_argument("--queries", required=True, help="query manifest (empty landmark_id = no landmark)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"methods to compare (default: every method built: {' '.join(methods.available())}; "
                        "cnn-pretrained only with --set cnn_pretrained.model=PATH)")
    p.add_argument("--boxes", default="",
                   help="landmark boxes of the images (CSV id,xmin,ymin,xmax,ymax[,width,height], or image_path "
                        "instead of id, or PASCAL VOC XML): cnn+det and cnn-pretrained+det train their detector on the "
                        "database's boxes, and the queries' boxes score its detections (AP@0.5, mean IoU)")
    add_vote_args(p)
    add_index_args(p)
    add_set_arg(p)
    add_report_args(p)
    common.add_beam_job_args(p)
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, beam_args = common.parse_beam_job(build_parser(), argv)
    config = parse_overrides(args.set)
    names = args.methods or methods.defaults(bool(config.cnn_pretrained.model),
                                             bool(args.boxes or config.detect.detect.model))
    vote, tune = vote_args(args)
    metrics = compare(args.train, args.queries, args.out, names, decode=common.decode_config(args),
                      workers=args.workers, threads=args.threads_per_worker, beam_args=beam_args,
                      vote=vote, tune=tune, index=index_config(args), force=args.force, config=config,
                      report=report_config(args), boxes=args.boxes)
    print(summary_table(metrics))
    print("records (every manifest row is used or a dead letter):")
    print("\n".join(accounting_lines(cfg.load_json(fs.join(args.out, "accounting.json")))))
    print(f"report:       {fs.join(args.out, 'report.html')}")
    print(f"metrics:      {fs.join(args.out, 'metrics.json')}")
    print(f"predictions:  {fs.join(args.out, 'predictions')}/")
    print(f"neighbours:   {fs.join(args.out, 'neighbours')}/")
    print(f"dead letters: {fs.join(args.out, 'dead_letters.csv')}")
    return metrics
