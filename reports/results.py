"""A `cairn compare` run's outputs, read back and scored: the numbers of metrics.json and of the report.

Everything here is computed from what the run wrote (RUN/run.json, the two manifests, RUN/predictions/<method>.csv,
RUN/neighbours/<method>.parquet, RUN/work/<method>/costs.json, RUN/dead_letters.csv): no feature is recomputed.

metrics.json (format "cairn-metrics", version 3) holds, per method, five groups with stable keys (README "Outputs"):

    quality  gap, accuracy, landmark_accuracy, map_at_100, recall_at_k {"1","5","10","100"}, mean_class_ap,
             gap_all_answers (the GAP if the no-landmark threshold dropped no answer), auc (how well the confidence before the no-landmark threshold separates the queries that show a
             database landmark from the others; RUN/confidences/<method>.parquet), note (why some of these are
             null: a figure whose denominator is empty, e.g. GAP when no query shows a landmark, is null, never
             0.0; null when every figure is defined)
    cost     images_per_second, extract_seconds, train_seconds, index_seconds, search_seconds, verify_seconds,
             dim, bytes_per_image, feature_bytes_per_image, local_feature_bytes_per_image, index_bytes
    counts   queries, queries_with_landmark, predicted, dead_letters
    config   index_factory, vote, params (the method's part of the run's methods_config)
    tuning   what tuning chose (rule, its parameters, min_confidence, threshold_from), query_threshold (the
             threshold fitted to the queries: their estimated landmark share, estimated accuracy and GAP, the
             validation threshold) and its validation figures (queries of a database landmark, unseen-landmark
             and non-landmark queries; gap, accuracy, the plain top-1 rule's gap); null when the method was not
             tuned (--no-tune)
    detection  ap_50, mean_iou, annotated_images, detections_per_image, regions_per_image (+det methods; null
             for the others, and ap_50 / mean_iou null without --boxes)

A key that does not apply to a method (vote for a -linear classifier, local_feature_bytes_per_image without
re-ranking, a cost of a run made before the key existed) is present with null; verify_seconds is 0 without
re-ranking. Queries that could not be processed (dead letters) count as unanswered: they stay
in GAP's M and in the accuracy denominator.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from pipeline import config as cfg
from pipeline import fs
from pipeline.boxes import BoxSet, read_boxes
from pipeline.errors import CairnError
from pipeline.featuresets import features_prefix
from pipeline.manifest import Manifest, manifest_fingerprint, read_manifest
from pipeline.parquet_io import find_shards, read_shards
from pipeline.submission import read_submission
from reports import metrics as M
from reports.detection import REGION_COLUMNS, detection_metrics

FORMAT = "cairn-metrics"
VERSION = 3
RECALL_KS = (1, 5, 10, 100)
COST_KEYS = ("images_per_second", "extract_seconds", "train_seconds", "index_seconds", "search_seconds",
             "verify_seconds", "dim", "bytes_per_image", "feature_bytes_per_image", "local_feature_bytes_per_image",
             "index_bytes")

DETECTION_KEYS = ("ap_50", "mean_iou", "annotated_images", "detections_per_image", "regions_per_image")

DEFINITIONS = {
    "gap": "Global Average Precision (Google Landmark Recognition): predictions sorted by confidence, "
           "sum of precision at each correct one, divided by the queries that show a landmark",
    "accuracy": "share of all queries answered right (the landmark, or no prediction for no-landmark queries)",
    "landmark_accuracy": "top-1 accuracy over the queries that show a landmark",
    "map_at_100": "mean average precision at 100 (Google Landmark Retrieval) of the nearest database images, "
                  "relevant = same landmark, over the queries that show a landmark with database images",
    "recall_at_k": "share of the queries that show a landmark (one with database images) with at least one "
                   "database image of that landmark among their k nearest",
    "mean_class_ap": "AP per landmark class (its predictions by confidence, precision at each right one, divided "
                     "by its queries), averaged over classes: every class counts the same, however many queries",
    "images_per_second": "descriptor extraction throughput (decode + extract, Beam job wall time incl. start-up)",
    "train_seconds": "learning the method: vocabulary, encoder, PCA, classifier, CNN fine-tuning",
    "index_seconds": "building the FAISS index or inverted file over the database",
    "bytes_per_image": "bytes searched per database image: the float32 vector, the stored non-zeros of a BoVW "
                       "vector, plus for +sv the local features kept for verification",
    "feature_bytes_per_image": "bytes per image of the Parquet feature files on disk (compressed)",
    "index_bytes": "size of the index files on disk",
    "ap_50": "detection AP at IoU 0.5 (PASCAL VOC all-point) of the boxes the detector cropped from the queries "
             "(above its score threshold, at most max_boxes per image) against the annotated boxes (--boxes); a box "
             "on a query without one is a false positive",
    "mean_iou": "for each annotated query box, the best IoU of a cropped box of its image, averaged (0 for a miss)",
    "regions_per_image": "vectors per database image in the index: the full image plus its detected boxes",
    "gap_all_answers": "GAP if every query kept its best answer (no no-landmark threshold), ranked by the same "
                       "confidence: what a recognition submission that answers every query scores",
    "auc": "chance that a query showing a database landmark gets a higher confidence (before the no-landmark "
           "threshold) than one that does not",
}


@dataclass
class MethodResult:
    """One method's answers, aligned with the query manifest."""

    name: str
    family: str  # "baseline" or "deep"
    summary: str  # one line on what the method is
    pred: list[int | None]  # predicted landmark per query (None = no landmark)
    conf: list[float]  # its confidence (0 where none)
    neighbours: dict[str, list[tuple[str, float, int | None]]]  # query id -> [(database id, score, landmark)]
    costs: dict = field(default_factory=dict)  # RUN/work/<method>/costs.json
    sections: tuple[str, ...] = ()  # the parts of the run's methods_config the method reads (shown with it)
    classifier: bool = False  # it answers with a classifier (the kNN vote does not apply to it)
    keras_embedding: str = ""  # a Keras embedding model makes its vectors (Grad-CAM can explain it): "fine-tuned"
    # in the run (WORK/cnn/model) or "frozen" (the user's); "": none
    variant_of: str = ""  # the method it changes one thing of (its detection section compares with it)
    raw_pred: list[int | None] | None = None  # best answer per query before the no-landmark threshold (None: no file)
    raw_conf: np.ndarray | None = None  # its confidence
    threshold: float | None = None  # the no-landmark threshold the method used

    def right(self, truth: list[int | None]) -> np.ndarray:
        """[Q] bool: the query was answered right (the landmark, or nothing for a no-landmark query)."""
        return np.array([p == t for p, t in zip(self.pred, truth, strict=True)], dtype=bool)


@dataclass
class RunResults:
    """A compare run read back: its config, manifests and every method's answers."""

    run_dir: str
    run: dict  # run.json
    train: Manifest
    queries: Manifest
    methods: dict[str, MethodResult]
    dead_letters: list[dict]  # rows of RUN/dead_letters.csv

    @property
    def truth(self) -> list[int | None]:
        return self.queries.labels

    @functools.cached_property
    def train_counts(self) -> Counter:
        """Database images per landmark class."""
        return Counter(label for label in self.train.labels if label is not None)

    @functools.cached_property
    def relevant(self) -> dict[int, set[str]]:
        out: dict[int, set[str]] = defaultdict(set)
        for image_id, label in zip(self.train.ids, self.train.labels, strict=True):
            if label is not None:
                out[label].add(image_id)
        return out


def _read_neighbours(path: str) -> dict[str, list[tuple[str, float, int | None]]]:
    table = pq.read_table(path, columns=["query_id", "rank", "id", "score", "landmark_id"])
    rows: dict[str, list[tuple[int, str, float, int | None]]] = defaultdict(list)
    cols = [table.column(c).to_pylist() for c in ("query_id", "rank", "id", "score", "landmark_id")]
    for q, r, i, s, lab in zip(*cols, strict=True):
        rows[q].append((r, i, s, lab))
    return {q: [(i, float(s), lab) for _, i, s, lab in sorted(v)] for q, v in rows.items()}


def _read_confidences(path: str, query_ids: list[str]):
    """(best answer per query before the threshold, its confidence, the threshold) from a method's
    confidences.parquet, aligned with ``query_ids`` (a query it lacks: no answer, confidence 0); Nones for a run
    made before the file existed."""
    if not fs.exists(path):
        return None, None, None
    with fs.FileSystems.open(path) as f:
        table = pq.read_table(f)
    meta = json.loads((table.schema.metadata or {}).get(b"cairn", b"{}"))
    found = dict(zip(table.column("query_id").to_pylist(),
                     zip(table.column("landmark_id").to_pylist(), table.column("confidence").to_pylist(),
                         strict=True), strict=True))
    rows = [found.get(q, (None, 0.0)) for q in query_ids]
    return [p for p, _ in rows], np.array([c for _, c in rows], np.float32), float(meta.get("threshold", 0.0))


def load_run(run_dir: str, methods: dict[str, dict] | None = None) -> RunResults:
    """Read a compare run; raises CairnError saying what is missing or stale. ``methods``: what each method is
    ({name: {"family", "summary", "sections", "classifier", "keras_embedding", "variant_of"}}; pipeline/run/methods.py's
    descriptions); a method it does not describe counts as a baseline without summary."""
    methods = methods or {}
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
    results = {}
    for name in run["methods"]:
        pred_path = fs.join(run_dir, "predictions", f"{name}.csv")
        nb_path = fs.join(run_dir, "neighbours", f"{name}.parquet")
        for path in (pred_path, nb_path):
            if not fs.exists(path):
                raise CairnError(f"{path} is missing: method {name} did not finish; rerun `cairn compare` "
                                 f"(it reuses what is done)")
        preds = read_submission(pred_path)
        info = methods.get(name, {})
        costs_path = fs.join(run_dir, "work", name, "costs.json")
        results[name] = MethodResult(
            name, info.get("family", "baseline"), info.get("summary", ""),
            [preds[q][0] if preds.get(q) else None for q in queries.ids],
            [preds[q][1] if preds.get(q) else 0.0 for q in queries.ids],
            _read_neighbours(nb_path), cfg.load_json(costs_path) if fs.exists(costs_path) else {},
            tuple(info.get("sections", ())), bool(info.get("classifier")), info.get("keras_embedding") or "",
            info.get("variant_of", ""), *_read_confidences(fs.join(run_dir, "confidences", f"{name}.parquet"),
                                                           queries.ids))
    dead_path = fs.join(run_dir, "dead_letters.csv")
    dead = list(csv.DictReader(io.StringIO(fs.read_text(dead_path)))) if fs.exists(dead_path) else []
    return RunResults(run_dir, run, train, queries, results, dead)


# ---------------------------------------------------------------------------------------------------------------
# metrics.json


def method_quality(res: RunResults, m: MethodResult) -> dict:
    truth, ids = res.truth, res.queries.ids
    relevant_by_label = res.relevant
    retrieved, relevant = [], []
    for q, t in zip(ids, truth, strict=True):
        if t is not None:
            retrieved.append([i for i, _, _ in m.neighbours.get(q, [])])
            relevant.append(relevant_by_label.get(t, set()))
    per_class = M.per_class_ap(m.pred, m.conf, truth, ids)
    recall = M.recall_at_k(retrieved, relevant, RECALL_KS)
    # GAP, landmark accuracy and class AP divide by the queries that show a landmark; mAP and recall by those
    # whose landmark has database images: with none, the figure is undefined (null and a note), not 0.0
    landmarks = bool(retrieved)
    retrievable = any(relevant)
    note = None
    if not landmarks:
        note = ("no query shows a landmark (the queries manifest gives none a landmark_id): GAP, landmark "
                "accuracy, mAP@100, recall@k and class AP are undefined")
    elif not retrievable:
        note = ("no query's landmark has database images: mAP@100 and recall@k are undefined")
    return {
        "gap": round(M.gap(m.pred, m.conf, truth, ids), 6) if landmarks else None,
        "accuracy": round(M.accuracy(m.pred, truth), 6),
        "landmark_accuracy": round(M.landmark_accuracy(m.pred, truth), 6) if landmarks else None,
        "map_at_100": round(M.mean_average_precision_at_k(retrieved, relevant, 100), 6) if retrievable else None,
        "recall_at_k": {str(k): round(recall[k], 6) if retrievable else None for k in RECALL_KS},
        "mean_class_ap": round(float(np.mean(list(per_class.values()))), 6) if per_class else None,
        "gap_all_answers": gap_all_answers(m, truth, ids) if landmarks else None,
        "auc": confidence_auc(m, truth),
        "note": note,
    }


def gap_all_answers(m: MethodResult, truth: list[int | None], ids: list[str]) -> float | None:
    """GAP if no answer were dropped by the no-landmark threshold: every query keeps its best answer, ranked by
    the same confidence (what a Google Landmark Recognition submission that answers every query scores; a
    blank can only lower GAP). None without confidences.parquet."""
    if m.raw_conf is None:
        return None
    conf = [float(c) if p is not None else 0.0 for p, c in zip(m.raw_pred, m.raw_conf, strict=True)]
    return round(M.gap(m.raw_pred, conf, truth, ids), 6)


def confidence_auc(m: MethodResult, truth: list[int | None]) -> float | None:
    """Landmark vs no-landmark AUC of the confidence before the threshold (a query without any answer counts
    0); None without confidences.parquet or when all queries are of one kind."""
    if m.raw_conf is None:
        return None
    positive = np.array([t is not None for t in truth])
    conf = np.where(np.array([p is not None for p in m.raw_pred]), m.raw_conf, 0.0)
    return _round(M.roc_auc(conf, positive))


def _round(v, digits: int = 6):
    return None if v is None else round(float(v), digits)


def tuning_summary(costs: dict) -> dict | None:
    """metrics.json's tuning group from a method's costs.json (see the module docstring)."""
    t = costs.get("tuning")
    if not t or "tuned" not in t:
        return None
    tuned = t["tuned"]
    chosen = {k: v for k, v in tuned.items() if k not in ("gap", "accuracy", "weighted_accuracy")}
    fitted = t.get("query_threshold")  # the threshold fitted to the query set (or why it was not)
    if fitted:
        chosen["query_threshold"] = {k: fitted.get(k) for k in (
            "landmark_share", "estimated_accuracy", "estimated_gap", "validation_threshold", "skipped")
            if fitted.get(k) is not None}
    return {**chosen, "validation": {
        "queries": t.get("queries"), "landmark_queries": t.get("landmark_queries"),
        "unseen_queries": t.get("unseen_queries"), "nonlandmark_queries": t.get("nonlandmark_queries"),
        "gap": tuned.get("gap"), "accuracy": tuned.get("accuracy"),
        "top1_gap": (t.get("top1") or {}).get("gap"), "untuned_gap": (t.get("untuned") or {}).get("gap")}}


def method_entry(res: RunResults, m: MethodResult) -> dict:
    costs = m.costs
    methods_config = res.run["config"].get("methods_config", {})
    return {
        "family": m.family,
        "summary": m.summary,
        "quality": method_quality(res, m),
        "cost": {k: costs.get(k) for k in COST_KEYS},
        "counts": {"queries": len(res.queries), "queries_with_landmark": sum(t is not None for t in res.truth),
                   "predicted": sum(p is not None for p in m.pred), "dead_letters": costs.get("dead_letters")},
        # a classifier method answers with its classifier: the kNN vote does not apply to it
        "config": {"index_factory": costs.get("index_factory"),
                   "vote": None if m.classifier else costs.get("vote"),
                   "params": {part: methods_config.get(part) for part in m.sections}},
        "tuning": tuning_summary(costs),
        "detection": method_detection(res, m),
    }


def detection_table(m: MethodResult, split: str = "queries"):
    """The regional features (id, region, box, box_score, width, height) a +det method wrote for ``split``, or
    None for a method without detection (or a run whose features are gone)."""
    folder = (m.costs.get("regional_features") or {}).get(split)
    if not folder:
        return None
    try:
        find_shards(features_prefix(folder))
    except CairnError:
        return None
    table, _ = read_shards(features_prefix(folder), columns=REGION_COLUMNS)
    return table


@functools.lru_cache(maxsize=4)
def _box_set(path: str, manifest_path: str):
    return read_boxes(path, read_manifest(manifest_path))


def method_detection(res: RunResults, m: MethodResult) -> dict:
    """The detection group of a method: AP@0.5 and mean IoU on the queries (with --boxes), detections per query
    image, regions per database image; every key null for a method without detection."""
    out = dict.fromkeys(DETECTION_KEYS)
    table = detection_table(m)
    if table is None:
        return out

    boxes = res.run["config"].get("boxes") or ""
    box_set = BoxSet()
    if boxes and fs.exists(boxes):
        try:
            box_set = _box_set(boxes, res.queries.source)
        except CairnError:  # no box of a query image: nothing to score against
            box_set = BoxSet()
    found = detection_metrics(table, box_set)
    out.update({k: found[k] for k in ("ap_50", "mean_iou", "detections_per_image")},
               annotated_images=found["annotated_images"], regions_per_image=m.costs.get("regions_per_image"))
    return out


def metrics_of(res: RunResults) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "methods": {name: method_entry(res, m) for name, m in res.methods.items()},
        "data": {"train_images": len(res.train), "queries": len(res.queries),
                 "queries_with_landmark": res.queries.num_landmark_images(),
                 "train_classes": len(res.train_counts)},
        "config": res.run["config"],
        "definitions": DEFINITIONS,
    }


def per_class_rows(res: RunResults) -> list[dict]:
    """One row per (method, landmark class with queries): the class's database images, queries, correct
    answers, accuracy and AP (RUN/per_class.csv)."""
    counts = res.train_counts
    rows = []
    for name, m in res.methods.items():
        acc = M.per_class_accuracy(m.pred, res.truth)
        ap = M.per_class_ap(m.pred, m.conf, res.truth, res.queries.ids)
        for label in sorted(acc):
            right, total = acc[label]
            rows.append({"method": name, "landmark_id": label, "train_images": counts.get(label, 0),
                         "queries": total, "correct": right, "accuracy": round(right / total, 6),
                         "ap": round(ap.get(label, 0.0), 6)})
    return rows


def write_per_class(path: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["method", "landmark_id", "train_images", "queries", "correct", "accuracy", "ap"],
                       lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    fs.write_text(path, buf.getvalue())
