"""cairn report: (re)compute a compare run's metrics.json from its outputs, without recomputing features.

Reads RUN/run.json, RUN/predictions/<method>.csv, RUN/neighbours/<method>.parquet and RUN/work/<method>/costs.json;
writes RUN/metrics.json. Keys per method (stable; see README "Outputs"):
    gap, accuracy, landmark_accuracy, map_at_100            quality
    images_per_second, extract_seconds, index_seconds,      cost
    search_seconds, bytes_per_image, feature_bytes_per_image, index_bytes, dim
    queries, queries_with_landmark, predicted, dead_letters counts
Queries that could not be processed (dead letters) count as unanswered: they stay in GAP's M and in the
accuracy denominator.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import pyarrow.parquet as pq

from jobs import common
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.manifest import manifest_fingerprint, read_manifest
from pipeline.submission import read_submission
from reports import metrics as M

log = logging.getLogger(__name__)
DEFINITIONS = {
    "gap": "Global Average Precision (Google Landmark Recognition): predictions sorted by confidence, "
           "sum of precision at each correct one, divided by the queries that show a landmark",
    "accuracy": "share of all queries answered right (the landmark, or no prediction for no-landmark queries)",
    "landmark_accuracy": "top-1 accuracy over the queries that show a landmark",
    "map_at_100": "mean average precision at 100 (Google Landmark Retrieval) of the nearest database images, "
                  "relevant = same landmark, over queries that show a landmark",
    "images_per_second": "descriptor extraction throughput (decode + extract, Beam job wall time incl. startup)",
    "bytes_per_image": "bytes of the descriptor in memory / in the index (float32)",
    "feature_bytes_per_image": "bytes per image of the Parquet feature files on disk (compressed)",
}


def method_metrics(run_dir: str, method: str, query_ids: list[str], truth: dict[str, int | None],
                   relevant_by_label: dict[int, set[str]]) -> dict:
    preds = read_submission(fs.join(run_dir, "predictions", f"{method}.csv"))
    pred = [preds[q][0] if preds.get(q) else None for q in query_ids]
    conf = [preds[q][1] if preds.get(q) else 0.0 for q in query_ids]
    labels = [truth[q] for q in query_ids]
    table = pq.read_table(fs.join(run_dir, "neighbours", f"{method}.parquet"), columns=["query_id", "rank", "id"])
    ranked: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for q, r, i in zip(*(table.column(c).to_pylist() for c in ("query_id", "rank", "id")), strict=True):
        ranked[q].append((r, i))
    retrieved, relevant = [], []
    for q in query_ids:
        if truth[q] is not None:
            retrieved.append([i for _, i in sorted(ranked.get(q, []))])
            relevant.append(relevant_by_label.get(truth[q], set()))
    out = {
        "gap": round(M.gap(pred, conf, labels, query_ids), 6),
        "accuracy": round(M.accuracy(pred, labels), 6),
        "landmark_accuracy": round(M.landmark_accuracy(pred, labels), 6),
        "map_at_100": round(M.mean_average_precision_at_k(retrieved, relevant, 100), 6),
        "queries": len(query_ids),
        "queries_with_landmark": sum(t is not None for t in labels),
        "predicted": sum(p is not None for p in pred),
    }
    costs_path = fs.join(run_dir, "work", method, "costs.json")
    if fs.exists(costs_path):
        out.update(cfg.load_json(costs_path))
    return out


def write_metrics(run_dir: str) -> dict:
    run_path = fs.join(run_dir, "run.json")
    if not fs.exists(run_path):
        raise CairnError(f"{run_dir} has no run.json; give the --out folder of a `cairn compare` run")
    run = cfg.load_json(run_path)
    for split in ("train", "queries"):
        if not fs.exists(run["config"][split]):
            raise CairnError(f"the run's {split} manifest {run['config'][split]} is gone; the report needs it")
    train = read_manifest(run["config"]["train"])
    queries = read_manifest(run["config"]["queries"])
    now = {"train": manifest_fingerprint(train.source, train), "queries": manifest_fingerprint(queries.source, queries)}
    if run.get("manifest_sha256") != now:
        raise CairnError(f"the manifests of {run_dir} changed since the run ({run['config']['train']}, "
                         f"{run['config']['queries']}); rerun `cairn compare` instead of rebuilding the report")
    relevant: dict[int, set[str]] = defaultdict(set)
    for image_id, label in zip(train.ids, train.labels, strict=True):
        if label is not None:
            relevant[label].add(image_id)
    truth = queries.label_of()
    result = {
        "methods": {m: method_metrics(run_dir, m, queries.ids, truth, relevant) for m in run["methods"]},
        "data": {"train_images": len(train), "queries": len(queries),
                 "queries_with_landmark": queries.num_landmark_images(),
                 "train_classes": len({label for label in train.labels if label is not None})},
        "config": run["config"],
        "definitions": DEFINITIONS,
    }
    cfg.save_json(fs.join(run_dir, "metrics.json"), result)
    return result


def summary_table(metrics: dict) -> str:
    width = max([14] + [len(name) + 2 for name in metrics["methods"]])
    head = f"{'method':<{width}}{'GAP':>8}{'acc':>8}{'lm-acc':>8}{'mAP@100':>9}{'img/s':>9}{'bytes/img':>11}"
    rows = [head, "-" * len(head)]
    for name, m in metrics["methods"].items():
        rows.append(f"{name:<{width}}{m['gap']:>8.3f}{m['accuracy']:>8.3f}{m['landmark_accuracy']:>8.3f}"
                    f"{m['map_at_100']:>9.3f}{m.get('images_per_second', 0):>9.1f}{m.get('bytes_per_image', 0):>11,}")
    return "\n".join(rows)


def build_parser():
    p = common.parser("cairn report", __doc__)
    p.add_argument("run", help="the --out folder of a `cairn compare` run")
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, _ = common.parse(build_parser(), argv)
    metrics = write_metrics(args.run)
    print(summary_table(metrics))
    print(f"metrics: {fs.join(args.run, 'metrics.json')}")
    return metrics
