"""Benchmark "porto": the classic methods on real photos, leave-one-out (`make porto`).

Data: ../shared/data/porto (484 photos of 5 Porto landmarks), read in place. Every photo is the query once
and the other 483 are the database: mean average precision at 100 (relevant = same landmark, the photo
itself excluded) and kNN accuracy (votes of the 10 nearest other photos, index/recognize.vote). Each method
runs through the same jobs as `cairn compare` (extract, train, encode, index as Beam jobs on DirectRunner);
vocabularies and PCA are learned on all 484 photos without labels, which a leave-one-out protocol over a
single collection allows (as the Oxford/Paris benchmarks learn theirs on the test collection).
The reference is chance: the expected figures of a random ranking.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from bench.common import entry, offline_beam_args, skipped

log = logging.getLogger(__name__)

NAME = "porto"
TITLE = "Real photos (Porto, 484 images, 5 landmarks): leave-one-out retrieval and kNN accuracy"
DESCRIPTION = (
    "Every photo of ../shared/data/porto queries the other 483. mAP@100: Google Landmark Retrieval's "
    "definition (reports/metrics.py) with the photo itself removed from its neighbours; kNN accuracy: the "
    "vote of the 10 nearest other photos (index/recognize.vote). Methods run through the jobs of "
    "`cairn compare` (pipeline/run/recipes.py) with their default parameters except where the row says; "
    "sift-bovw+sv re-ranks the top 20 by RANSAC (features/verify.py). Ratios are against chance "
    "(the expected mAP@100 of a random ranking, and the chance that a random other photo shows the same landmark). "
    "PCA-whitening is learned on the same 484 photos (labels unused); rows with other whitening dimensions show "
    "how much a small collection can afford. Bytes per image: the representation "
    "searched (dense float32, or the non-zeros of the sparse BoVW: 8 bytes each), plus the local features "
    "kept for verification for +sv. The classifier methods (hog-linear, sift-vlad-linear) are not retrieval "
    "methods: they get stratified 5-fold cross-validated top-1 accuracy with the default classifier config."
)
# (row label, method, --set overrides): the defaults, plus the PCA-whitening variants, because whitening learned
# on the 484 photos themselves is what a small collection can afford, and worth seeing against none
METHODS = (
    ("hog", "hog", []),
    ("hog, PCA-whitened to 64", "hog", ["hog.pca_dim=64", "hog.pca_min_images=0"]),
    ("sift-bovw", "sift-bovw", []),
    ("sift-bovw+sv", "sift-bovw+sv", []),
    ("sift-vlad (default: too few photos to whiten, raw 8192-d)", "sift-vlad", []),
    ("sift-vlad, PCA-whitened anyway (242-d, at most N/2)", "sift-vlad", ["vlad.pca_min_images=0"]),
    ("sift-vlad, PCA-whitened to 64", "sift-vlad", ["vlad.pca_dim=64", "vlad.pca_min_images=0"]),
)


def _porto_manifest(workdir: str, quick: bool) -> str | None:
    from bench.bench_extract import _porto_root, _porto_rows, _write_manifest

    if not os.path.exists(os.path.join(_porto_root(), "labels.csv")):
        return None
    return _write_manifest(os.path.join(workdir, "porto.csv"), _porto_rows(quick))


def _chance(labels: np.ndarray, k: int = 100) -> tuple[float, float]:
    """Expected mAP@k of a random ranking and accuracy of a random neighbour, leave-one-out.

    A query of a class of n photos has R = n - 1 relevant among M = N - 1 others. In a random ranking,
    E[rel(i)] = p = R / M and E[rel(i) rel(j)] = p (R - 1) / (M - 1) for i != j, so
    E[P(i) rel(i)] = (p + (i - 1) p (R - 1) / (M - 1)) / i, and E[AP@k] = sum_{i<=k} of that / min(R, k).
    """
    N = len(labels)
    M = N - 1
    _, counts = np.unique(labels, return_counts=True)
    ap, queries = 0.0, 0  # mAP averages over the queries that have a relevant photo (classes of 2+ photos)
    for n in counts:
        R = n - 1
        if R <= 0:
            continue
        p = R / M
        i = np.arange(1, min(k, M) + 1)
        ap += n * float(np.sum((p + (i - 1) * p * (R - 1) / max(1, M - 1)) / i)) / min(R, k)
        queries += n
    acc = float(np.sum((counts / N) * ((counts - 1) / M)))  # a random other photo has the same landmark
    return ap / max(1, queries), acc


def leave_one_out(index_dir: str, vectors_dir: str, rerank=None) -> dict:
    """LOO figures of one method from its built index (the database queries itself)."""
    from index.recognize import VoteConfig, vote
    from index.sparse_index import load_any
    from pipeline.stages.lookup import read_queries
    from reports.metrics import mean_average_precision_at_k

    index = load_any(index_dir)
    ids, xq, _ = read_queries(vectors_dir)
    row_of = {image_id: i for i, image_id in enumerate(index.image_ids)}
    D, I = index.search(xq, min(101, index.ntotal))
    if index.config.metric == "l2":  # squared distances of unit vectors -> cosine similarities, as recognize does
        D = 1.0 - D / 2.0
    self_rows = np.array([row_of[i] for i in ids])
    keep = I != self_rows[:, None]
    K = I.shape[1] - 1
    D = np.stack([d[k][:K] for d, k in zip(D, keep, strict=True)])
    I = np.stack([i[k][:K] for i, k in zip(I, keep, strict=True)])
    seconds = 0.0
    if rerank is not None:
        import time

        from index.rerank import spatial_rerank

        prefix, prepare, config = rerank
        start = time.perf_counter()
        D, I, _ = spatial_rerank(ids, D, I, index.image_ids, prefix, prefix, config, prepare=prepare)
        seconds = time.perf_counter() - start
    labels = index.labels
    q_labels = labels[self_rows]
    retrieved = [[index.image_ids[j] for j in row if j >= 0] for row in I]
    relevant = [{index.image_ids[j] for j in np.flatnonzero(labels == y) if j != s}
                for y, s in zip(q_labels, self_rows, strict=True)]
    pred, _ = vote(D, index.labels_of(I), VoteConfig(k=10))
    return {"map_at_100": mean_average_precision_at_k(retrieved, relevant, 100),
            "knn_accuracy": float(np.mean(pred == q_labels)), "p_at_1": float(np.mean(labels[I[:, 0]] == q_labels)),
            "verify_seconds": seconds, "labels": q_labels}


def run(workdir: str, quick: bool) -> list[dict]:
    from features.sift import prepare_descriptors
    from index.recognize import VoteConfig
    from pipeline import config as cfg
    from pipeline import fs
    from pipeline.featuresets import features_metadata, features_prefix
    from pipeline.images import DecodeConfig
    from pipeline.run import methods, recipes
    from pipeline.run.settings import parse_overrides

    os.makedirs(workdir, exist_ok=True)
    manifest = _porto_manifest(workdir, quick)
    group = "Porto leave-one-out"
    if manifest is None:
        reason = "../shared/data/porto/labels.csv not found (the shared Porto photos are not on this machine)"
        log.warning("porto: skipped: %s", reason)
        return [skipped(group, "every method", reason)]
    ctx = recipes.RunContext(manifest, manifest, os.path.join(workdir, "work"), DecodeConfig(), workers=2, threads=1,
                             beam_args=tuple(offline_beam_args(workdir)), vote=VoteConfig(), splits=("train",))
    entries: list[dict] = []
    chance = None
    group = f"Porto leave-one-out ({'quick subset' if quick else 'all photos'})"
    vectors: dict[str, str] = {}  # default-config method -> its database vectors, for the classifiers
    for name, method, overrides in METHODS:
        config = parse_overrides(overrides)
        base_name = methods.index_owner(method)
        log.info("porto: %s", name)
        base = methods.METHODS[base_name].build(config, ctx)
        if not overrides:
            vectors[method] = fs.join(base["vectors"], "train")
        rerank = None
        if method.endswith("+sv"):
            local = fs.join(base["local"], "train")
            meta = features_metadata(local, "local")
            rerank = (features_prefix(local, "local"), lambda d, m=meta: prepare_descriptors(d, m), config.sv)
        r = leave_one_out(base["index"], fs.join(base["vectors"], "train"), rerank)
        if chance is None:
            chance = _chance(r["labels"])
            entries.append(entry(group, "chance: mAP@100", round(chance[0], 4), "mAP@100"))
            entries.append(entry(group, "chance: kNN accuracy", round(chance[1], 4), "accuracy"))
        index_record = cfg.load_json(fs.join(base["index"], "index.json"))
        if index_record.get("kind") == "sparse-inverted-file":
            rep = 8 * index_record["nnz"] / max(1, index_record["count"])
        else:
            rep = 4 * index_record["dim"]
        if rerank is not None:
            local_bytes = sum(fs.size(p) for p in fs.glob(features_prefix(fs.join(base["local"], "train"), "local")
                                                           + "-*"))
            rep += local_bytes / index_record["count"]
        images = index_record["count"]
        extract_s = sum(rec["seconds"] for rec in base["extract"].values())
        entries.append(entry(group, f"{name}: mAP@100", round(r["map_at_100"], 4), "mAP@100",
                             "chance: mAP@100", dim=index_record["dim"], images=images, overrides=overrides))
        entries.append(entry(group, f"{name}: kNN accuracy", round(r["knn_accuracy"], 4), "accuracy",
                             "chance: kNN accuracy"))
        entries.append(entry(group, f"{name}: bytes per image", round(rep), "bytes", better="lower",
                             note="representation searched" + (" + local features for RANSAC" if rerank else ""),
                             extract_seconds=extract_s, train_seconds=base["train"].get("train_seconds", 0.0),
                             verify_seconds=r["verify_seconds"]))
        log.info("porto: %s mAP@100 %.3f, kNN accuracy %.3f", name, r["map_at_100"], r["knn_accuracy"])
    entries += _deep(ctx, group)
    entries += _delf(ctx, group, workdir, quick)
    for method in ("hog-linear", "sift-vlad-linear"):
        accuracy, seconds = cross_validated_accuracy(vectors[methods.index_owner(method)])
        entries.append(entry(group, f"{method}: 5-fold accuracy", round(accuracy, 4), "accuracy",
                             "chance: kNN accuracy", note="classifier (models/classifiers.py, default "
                             "classifier config), stratified 5-fold cross-validation", train_seconds=seconds))
        log.info("porto: %s 5-fold accuracy %.3f", method, accuracy)
    return entries


def cross_validated_accuracy(vectors_dir: str, folds: int = 5) -> tuple[float, float]:
    """Stratified k-fold top-1 accuracy of the default classifier on a folder's global descriptors (a
    classifier is not a retrieval method, so it gets cross-validation rather than leave-one-out retrieval)."""
    import time

    from sklearn.model_selection import StratifiedKFold

    from pipeline.featuresets import features_prefix
    from pipeline.parquet_io import read_shards
    from pipeline.run.settings import ClassifierConfig
    from pipeline.schemas import labels_of, vectors_of
    from pipeline.stages.train import make_classifier

    table, _ = read_shards(features_prefix(vectors_dir, "global"))
    X, y = vectors_of(table), labels_of(table)
    right, seconds = 0, 0.0
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=0).split(X, y):
        start = time.perf_counter()
        model = make_classifier(ClassifierConfig()).fit(X[train], y[train])
        seconds += time.perf_counter() - start
        right += int((model.predict_top(X[test], 1)[0][:, 0] == y[test]).sum())
    return right / len(y), seconds / folds


TFLITE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "weights",
                      "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite")


def _ranked_metrics(xq, yq, xb, yb, exclude_self: bool) -> tuple[float, float, float]:
    """(mAP@100, P@1, mAP over the full ranking) of plain cosine kNN in numpy, every query against the
    database, brute force. mAP@100 is Google Landmark Retrieval's (AP normalised by min(relevant, 100)); the
    full-ranking mAP is the textbook one (AP over every database image)."""
    from reports.metrics import mean_average_precision_at_k

    S = xq @ xb.T
    if exclude_self:
        np.fill_diagonal(S, -np.inf)
    order = np.argsort(-S, axis=1, kind="stable")
    if exclude_self:
        order = order[:, :-1]  # self is last (-inf)
    retrieved = [list(row[:100]) for row in order]
    relevant = [set(np.flatnonzero(yb == y)) - ({i} if exclude_self else set()) for i, y in enumerate(yq)]
    rel = yb[order] == yq[:, None]
    return mean_average_precision_at_k(retrieved, relevant, 100), float(np.mean(rel[:, 0])), _full_map(rel)


def _full_map(rel: np.ndarray) -> float:
    """Mean over queries of the average precision over a whole ranking; ``rel`` [Q, N] bool, relevant at rank."""
    precision = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
    return float(np.mean((precision * rel).sum(axis=1) / np.maximum(rel.sum(axis=1), 1)))


def _plain_tflite_embeddings(manifest: str) -> tuple[np.ndarray, np.ndarray]:
    """The reference embeddings, made without Cairn's pipeline: PIL opens each photo, converts it to RGB and
    resizes it whole to 224 x 224 (bilinear); the TFLite interpreter runs one image at a time."""
    import csv

    from PIL import Image

    from features.frozen import TFLiteEmbedder

    embedder = TFLiteEmbedder(TFLITE)
    rows = list(csv.DictReader(open(manifest)))
    base = os.path.dirname(manifest)
    xs = []
    for r in rows:
        with Image.open(os.path.join(base, r["path"])) as im:
            xs.append(embedder.embed(np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR))[None])[0])
    return np.stack(xs), np.array([int(r["landmark_id"]) for r in rows])


def _index_full_map(index_dir: str, xq: np.ndarray, ids: list[str], labels: np.ndarray) -> float:
    """Full-ranking leave-one-out mAP of every database image searched in the method's own FAISS index."""
    from index.sparse_index import load_any

    index = load_any(index_dir)
    row_of = {image_id: i for i, image_id in enumerate(index.image_ids)}
    _, I = index.search(xq, index.ntotal)  # every database image, so each row holds the query itself once
    self_rows = np.array([row_of[i] for i in ids])
    I = I[I != self_rows[:, None]].reshape(len(I), -1)
    return _full_map(index.labels[I] == labels[:, None])


def _delf(ctx, group: str, workdir: str, quick: bool) -> list[dict]:
    """cnn-pretrained's top 20 re-ranked by DELF matching + RANSAC (the cnn+delf method's re-ranking), leave-one-out.

    The DELF model must not have seen the Porto labels (every photo is a query), so its attention is trained on
    a synthetic landmark set, over the ImageNet MobileNet's conv_pw_11 features kept as they are (no descriptor
    fine-tuning); its 40-d PCA is learned on the Porto photos (unsupervised, as on any database)."""
    import dataclasses

    from features.backbones import BackboneConfig
    from models.delf import DelfTrainConfig, fit_pca, train_delf
    from pipeline import config as cfg
    from pipeline import fs
    from pipeline.featuresets import features_prefix
    from pipeline.manifest import read_manifest
    from pipeline.run import recipes
    from pipeline.run.settings import parse_overrides
    from pipeline.stages.extract import extract
    from pipeline.stages.synth import synth
    from pipeline.synthetic import SynthConfig

    if not os.path.exists(TFLITE):
        return [skipped(group, "cnn-pretrained + DELF re-ranking", f"{TFLITE} not found")]
    synthetic = os.path.join(workdir, "delf-synthetic")
    synth(synthetic, SynthConfig(seed=11, classes=16, views=12, min_views=6, queries_per_class=0,
                                 non_landmark_queries=0, non_landmark_train=0))
    method = parse_overrides([])
    train_config = DelfTrainConfig(backbone=BackboneConfig("mobilenet", weights=os.path.abspath(TFLITE)), epochs=0,
                                   attention_epochs=8 if quick else 20, pca_dim=0)
    folder = os.path.join(workdir, "delf-model")
    started = time.perf_counter()
    trained = train_delf(list(read_manifest(os.path.join(synthetic, "train.csv")).records()), folder, train_config)
    model = os.path.join(folder, "model.keras")
    extraction = method.delf.extraction(model)
    pca = fit_pca(model, list(read_manifest(ctx.train).records()), os.path.join(folder, "pca.npz"),
                  dataclasses.replace(train_config, pca_dim=40, pca_images=200), extraction, ctx.decode)
    train_seconds = time.perf_counter() - started
    params = {k: v for k, v in cfg.to_dict(method.delf.extraction(model, os.path.join(folder, "pca.npz"))).items()
              if k != "device"}
    record = extract(ctx.train, os.path.join(workdir, "delf-local"), "delf", params, workers=1,
                     beam_args=list(ctx.beam_args))
    config = parse_overrides([f"cnn_pretrained.model={os.path.abspath(TFLITE)}"])
    base = recipes.cnn_pretrained(config, ctx)
    prefix = features_prefix(os.path.join(workdir, "delf-local"), "local")
    plain = leave_one_out(base["index"], fs.join(base["vectors"], "train"))
    r = leave_one_out(base["index"], fs.join(base["vectors"], "train"),
                      (prefix, lambda d: np.asarray(d, np.float32), method.delf.sv))
    local_bytes = sum(fs.size(p) for p in fs.glob(prefix + "-*"))
    name = "cnn-pretrained + DELF re-ranking of the top 20 (cnn+delf)"
    ref = "cnn-pretrained (TFLite MobileNet v1, whole image at 224)"
    entries = [
        entry(group, f"{name}: mAP@100", round(r["map_at_100"], 4), "mAP@100", f"{ref}: mAP@100",
              note="DELF attention trained on synthetic landmarks over the ImageNet conv_pw_11 features; PCA 40-d "
              "learned on the Porto photos; 3 scales at 512 px, up to 500 features", without=round(
                  plain["map_at_100"], 4), delf_train_seconds=round(train_seconds, 1), pca=pca,
              attention_accuracy=(trained["history"].get("stage2", {}).get("accuracy") or [None])[-1]),
        entry(group, f"{name}: P@1", round(r["p_at_1"], 4), "accuracy", f"{ref}: P@1"),
        entry(group, f"{name}: kNN accuracy", round(r["knn_accuracy"], 4), "accuracy", f"{ref}: kNN accuracy"),
        entry(group, f"{name}: bytes per image", round(4 * 1024 + local_bytes / record["counts"]["outputs"]),
              "bytes", better="lower", note="the 1024-d embedding + the DELF features kept for verification",
              extract_seconds=record["seconds"], images_per_second=record["images_per_second"],
              verify_seconds=round(r["verify_seconds"], 2)),
    ]
    log.info("porto: cnn-pretrained + DELF mAP@100 %.3f (without %.3f), P@1 %.3f, kNN accuracy %.3f",
             r["map_at_100"], plain["map_at_100"], r["p_at_1"], r["knn_accuracy"])
    return entries


def _deep(ctx, group: str) -> list[dict]:
    """cnn-pretrained (the TFLite MobileNet) against plain cosine kNN over the same embeddings, and a head
    fine-tuned on 4/5 of the photos measured on the other fifth (5 folds)."""
    from sklearn.model_selection import StratifiedKFold

    from models.finetune import train_head_on_vectors
    from pipeline import fs
    from pipeline.featuresets import features_prefix
    from pipeline.parquet_io import read_shards
    from pipeline.run import recipes
    from pipeline.run.settings import parse_overrides
    from pipeline.schemas import labels_of, vectors_of

    if not os.path.exists(TFLITE):
        return [skipped(group, "cnn-pretrained", f"{TFLITE} not found")]
    config = parse_overrides([f"cnn_pretrained.model={os.path.abspath(TFLITE)}"])
    base = recipes.cnn_pretrained(config, ctx)
    r = leave_one_out(base["index"], fs.join(base["vectors"], "train"))
    table, _ = read_shards(features_prefix(fs.join(base["vectors"], "train"), "global"))
    X, y = vectors_of(table), labels_of(table)
    ours_full = _index_full_map(base["index"], X, table.column("id").to_pylist(), y)
    plain_map, plain_p1, plain_full = _ranked_metrics(*(2 * _plain_tflite_embeddings(ctx.train)), exclude_self=True)
    extract_s = sum(rec["seconds"] for rec in base["extract"].values())
    name = "cnn-pretrained (TFLite MobileNet v1, whole image at 224)"
    plain = "plain: PIL resize + TFLite, cosine kNN in numpy"
    entries = [
        entry(group, f"{plain}: mAP (full ranking)", round(plain_full, 4), "mAP",
              note="reference made without Cairn: PIL bilinear resize to 224, raw TFLite interpreter one image at "
              "a time, brute-force cosine ranking, self excluded"),
        entry(group, f"{plain}: mAP@100", round(plain_map, 4), "mAP@100"),
        entry(group, f"{plain}: P@1", round(plain_p1, 4), "accuracy"),
        entry(group, f"{name}: mAP (full ranking)", round(ours_full, 4), "mAP", f"{plain}: mAP (full ranking)",
              note="Cairn's Beam job (decode, area resize, RunInference) and FAISS index"),
        entry(group, f"{name}: mAP@100", round(r["map_at_100"], 4), "mAP@100", f"{plain}: mAP@100",
              dim=int(X.shape[1]), extract_seconds=extract_s,
              images_per_second=round(len(y) / extract_s, 2) if extract_s else None),
        entry(group, f"{name}: P@1", round(r["p_at_1"], 4), "accuracy", f"{plain}: P@1"),
        entry(group, f"{name}: kNN accuracy", round(r["knn_accuracy"], 4), "accuracy", "chance: kNN accuracy"),
        entry(group, f"{name}: bytes per image", 4 * int(X.shape[1]), "bytes", better="lower"),
    ]
    log.info("porto: cnn-pretrained mAP@100 %.3f, full mAP %.3f, P@1 %.3f (plain: %.3f, %.3f, %.3f)",
             r["map_at_100"], ours_full, r["p_at_1"], plain_map, plain_full, plain_p1)
    raw, tuned = [], []  # (mAP@100, P@1, full mAP) per fold
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(X, y):
        raw.append(_ranked_metrics(X[test], y[test], X[train], y[train], exclude_self=False))
        head = train_head_on_vectors(X[train], y[train], dim=256, seed=0)
        hb, hq = np.asarray(head(X[train])), np.asarray(head(X[test]))
        tuned.append(_ranked_metrics(hq, y[test], hb, y[train], exclude_self=False))
    raw_map, raw_p1, _ = np.mean(raw, axis=0)
    tuned_map, tuned_p1, _ = np.mean(tuned, axis=0)
    ref = "cnn-pretrained embeddings, held-out fold vs the other 4 folds: mAP@100"
    entries += [
        entry(group, ref, round(float(raw_map), 4), "mAP@100", note="5 stratified folds; queries = one fold, "
              "database = the other four"),
        entry(group, "cnn-pretrained embeddings, held-out fold vs the other 4 folds: P@1", round(float(raw_p1), 4),
              "accuracy"),
        entry(group, "+ head fine-tuned on the 4 folds (256-d, ArcFace): mAP@100", round(float(tuned_map), 4),
              "mAP@100", ref, note="models/finetune.train_head_on_vectors, trained on the database folds only"),
        entry(group, "+ head fine-tuned on the 4 folds (256-d, ArcFace): P@1", round(float(tuned_p1), 4),
              "accuracy", "cnn-pretrained embeddings, held-out fold vs the other 4 folds: P@1"),
    ]
    log.info("porto: 5-fold held-out mAP@100 raw %.3f, fine-tuned head %.3f", raw_map, tuned_map)
    return entries
