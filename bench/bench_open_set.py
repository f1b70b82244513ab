"""Benchmark "open_set": recognition on real photos when many queries show a landmark the database does not have
(`make porto`).

Data: ../shared/data/porto (484 photos of 5 landmarks), read in place. Five rounds, one per landmark: the
database is 80% of the photos of the four others (stratified, seed 0); the queries are the other 20% plus every
photo of the held-out landmark with an empty landmark_id (about 174 queries, 56% of them without a database
landmark). Each round is one `cairn compare` run with the default settings (tuning on, as a user runs it) and the demo's
MobileNet for the deep methods (../shared/weights: cnn-pretrained embeds with it, cnn and DELF start from it).

Per method, the mean over the five rounds of GAP, accuracy and the landmark vs no-landmark AUC of the confidence
(before the no-landmark threshold), each beside the plain top-1 reference computed from the same method's
vectors: every query gets the landmark of its nearest database image, ranked by that similarity (no
threshold, so its accuracy counts every no-landmark query wrong). Verified methods (+sv) and classifiers
(-linear) are compared with the top-1 rule of the vectors they search or classify, and a verified method with
its unverified base method's GAP too.
"""

from __future__ import annotations

import csv
import logging
import os

import numpy as np

from bench.common import entry, offline_beam_args, skipped

log = logging.getLogger(__name__)

NAME = "open_set"
TITLE = "Open-set recognition on real photos (Porto): one landmark held out of the database per round"
DESCRIPTION = __doc__.split("\n\n", 1)[1].replace("\n", " ").strip()
METHODS = ("hog", "hog-linear", "sift-bovw", "sift-bovw+sv", "sift-vlad", "sift-vlad-linear", "cnn-pretrained", "cnn",
           "cnn+delf", "delf+sv")
QUICK_METHODS = ("hog", "cnn-pretrained")
TFLITE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "weights",
                      "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite")


def rounds(rows: list[tuple[str, str, int]], seed: int = 0) -> dict[str, tuple[list, list]]:
    """{held-out landmark: (database rows, query rows)}; rows are (id, path, landmark id or None), the held-out
    landmark's photos as queries without a landmark id."""
    labels = sorted({r[2] for r in rows})
    out = {}
    for held in labels:
        rng = np.random.default_rng(seed)
        db, queries = [], []
        for label in labels:
            of = [r for r in rows if r[2] == label]
            if label == held:
                queries += [(i, p, None) for i, p, _ in of]
                continue
            cut = int(round(0.8 * len(of)))
            for j, k in enumerate(rng.permutation(len(of))):
                (db if j < cut else queries).append(of[k])
        out[held] = (sorted(db), sorted(queries))
    return out


def _write(path: str, rows: list) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("id", "path", "landmark_id"))
        w.writerows((i, p, "" if y is None else y) for i, p, y in rows)
    return path


def top1_reference(index_dir: str, query_ids: list[str], truth: dict[str, int | None]) -> dict:
    """GAP, accuracy and AUC of the plain top-1 rule over a method's index and query vectors (the folder beside
    the database features the index records)."""
    from index.sparse_index import load_any
    from pipeline import fs
    from pipeline.stages.lookup import read_queries, search
    from pipeline.stages.recognize import recorded_source
    from reports import metrics as M

    index = load_any(index_dir)
    source = recorded_source(index_dir)
    ids, xq, _ = read_queries(fs.join(os.path.dirname(source.rstrip("/")), "queries"))
    D, I = search(index, xq, 1)
    answer = dict(zip(ids, zip(index.labels_of(I)[:, 0].tolist(), D[:, 0].tolist(), strict=True), strict=True))
    pred = [answer[q][0] if q in answer and answer[q][0] >= 0 else None for q in query_ids]
    conf = [answer[q][1] if q in answer else 0.0 for q in query_ids]
    t = [truth[q] for q in query_ids]
    return {"gap": M.gap(pred, conf, t, query_ids), "accuracy": M.accuracy(pred, t),
            "auc": M.roc_auc([c if p is not None else 0.0 for p, c in zip(pred, conf, strict=True)],
                             [x is not None for x in t])}


def run(workdir: str, quick: bool) -> list[dict]:
    from bench.bench_extract import _porto_root, _porto_rows
    from pipeline import config as cfg
    from pipeline.run import methods as registry
    from pipeline.run.compare import compare
    from pipeline.run.demo import demo_config

    group = "Porto open set, mean over 5 rounds" + (" (quick: every 8th photo)" if quick else "")
    if not os.path.exists(os.path.join(_porto_root(), "labels.csv")):
        reason = "../shared/data/porto/labels.csv not found (the shared Porto photos are not on this machine)"
        log.warning("open_set: skipped: %s", reason)
        return [skipped(group, "every method", reason)]
    names = list(QUICK_METHODS if quick else METHODS)
    if not os.path.exists(TFLITE):  # cnn-pretrained needs it; the others start from random weights without it
        names.remove("cnn-pretrained")
    config = demo_config(TFLITE if os.path.exists(TFLITE) else "", [])  # the demo's MobileNet settings
    figures: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    per_round = {}
    with open(os.path.join(_porto_root(), "labels.csv"), newline="", encoding="utf-8") as f:
        landmark = sorted({r["label"] for r in csv.DictReader(f)})  # _porto_rows numbers them in this order
    for number, (db, queries) in rounds(_porto_rows(quick)).items():
        held = landmark[number]
        folder = os.path.join(workdir, "open-set", f"without-{held}")
        train = _write(os.path.join(folder, "train.csv"), db)
        query_path = _write(os.path.join(folder, "queries.csv"), queries)
        log.info("open_set: round without landmark %s: %d database images, %d queries (%d without a database "
                 "landmark)", held, len(db), len(queries), sum(y is None for *_, y in queries))
        out = os.path.join(folder, "run")
        metrics = compare(train, query_path, out, names, workers=2, beam_args=offline_beam_args(workdir),
                          config=config)
        truth = {i: y for i, _, y in queries}
        query_ids = [i for i, _, _ in queries]
        accounting = cfg.load_json(os.path.join(out, "accounting.json"))
        per_round[held] = {}
        for name in names:
            q = metrics["methods"][name]["quality"]
            if q["gap"] is None:  # metrics.json writes null for a figure it cannot compute, and says why
                raise RuntimeError(f"open_set: {name} without {held}: {q.get('note')}")
            ref = top1_reference(accounting[name]["index"], query_ids, truth)
            row = {"gap": q["gap"], "accuracy": q["accuracy"], "auc": q["auc"], "gap_all_answers": q["gap_all_answers"],
                   "top1_gap": ref["gap"], "top1_accuracy": ref["accuracy"], "top1_auc": ref["auc"]}
            per_round[held][name] = row
            for k, v in row.items():
                figures[name].setdefault(k, []).append(v)
            log.info("open_set: %s without %s: GAP %.3f (top-1 %.3f), accuracy %.3f, AUC %s", name, held, q["gap"],
                     ref["gap"], q["accuracy"], q["auc"])
    entries = []
    for name in names:
        f = {k: float(np.mean([x for x in v if x is not None])) if any(x is not None for x in v) else None
             for k, v in figures[name].items()}
        base = {"cnn+delf": "cnn"}.get(name, registry.METHODS[name].index_of if name.endswith("+sv") else "")
        ref = f"{name}: top-1 rule of its vectors: GAP"
        entries += [
            entry(group, ref, round(f["top1_gap"], 4), "GAP",
                  note="nearest database image's landmark, ranked by its similarity, every query answered",
                  rounds=figures[name]["top1_gap"]),
            entry(group, f"{name}: GAP", round(f["gap"], 4), "GAP", ref, rounds=figures[name]["gap"],
                  note="the answers as written: below the learned threshold, no landmark",
                  **({"unverified_base_gap": round(float(np.mean(figures[base]["gap"])), 4)}
                     if base in figures else {})),
            entry(group, f"{name}: GAP of all its answers", round(f["gap_all_answers"], 4), "GAP", ref,
                  rounds=figures[name]["gap_all_answers"],
                  note="the same confidence, no answer dropped by the threshold (metrics.json gap_all_answers)"),
            entry(group, f"{name}: top-1 rule of its vectors: accuracy", round(f["top1_accuracy"], 4), "accuracy",
                  rounds=figures[name]["top1_accuracy"]),
            entry(group, f"{name}: accuracy", round(f["accuracy"], 4), "accuracy",
                  f"{name}: top-1 rule of its vectors: accuracy", rounds=figures[name]["accuracy"],
                  note="with the learned no-landmark threshold"),
        ]
        if f.get("top1_auc") is not None and f.get("auc") is not None:
            entries += [entry(group, f"{name}: top-1 rule of its vectors: AUC", round(f["top1_auc"], 4), "AUC",
                              rounds=figures[name]["top1_auc"]),
                        entry(group, f"{name}: AUC", round(f["auc"], 4), "AUC",
                              f"{name}: top-1 rule of its vectors: AUC", rounds=figures[name]["auc"],
                              note="landmark vs no-landmark queries, by the confidence before the threshold")]
        if base in figures:
            entries.append(entry(group, f"{name}: GAP against its unverified base ({base})", round(f["gap"], 4),
                                 "GAP", f"{base}: GAP"))
    cfg.save_json(os.path.join(workdir, "open-set", "rounds.json"), per_round)
    return entries
