"""Recognition of a query features folder against an index (`cairn recognize`, and every method of `cairn
compare`): search, optional spatial re-ranking, then a landmark and confidence per query from the neighbours
(index/recognize.py: the top-1 rule, votes, calibrated inliers) or from a classifier, tuned first on validation
queries made from the database (:func:`tune_on_database`, :func:`tune_classifier`), the no-landmark threshold
then fitted to the query set (:func:`apply_query_threshold`). Writes OUT/predictions.csv
(Google Landmark Recognition format), OUT/confidences.parquet (every answer before the no-landmark threshold),
OUT/neighbours.parquet and OUT/recognize.json. Query sets too large for one process go to
the Beam search job (pipeline/stages/search.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa

from features.sift import prepare_descriptors
from index.recognize import (
    NO_LANDMARK,
    Answers,
    TuneConfig,
    VoteConfig,
    choose_threshold,
    class_counts,
    id_keys,
    query_threshold,
    threshold_figures,
    tune,
    validation_neighbours,
    validation_split,
    vote,
)
from index.regions import RegionalIndex, group_queries, merge_rows
from index.rerank import spatial_rerank
from index.sparse_index import load_any
from models.classifiers import load_classifier
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.featuresets import check_recorded_shards, features_metadata, features_prefix
from pipeline.parquet_io import find_shards, read_file, read_shards, write_table
from pipeline.schemas import labels_of, same_features, vectors_of
from pipeline.stages import costs
from pipeline.stages.lookup import (
    BEAM_MIN_QUERIES,
    COSINE,
    RERANKED,
    check_same_features,
    confidences_table,
    group_max,
    neighbours_table,
    nonlandmark_sims,
    read_queries,
    read_rows,
    search,
)
from pipeline.stages.search import recognize_beam, use_beam
from pipeline.submission import write_submission

log = logging.getLogger(__name__)


def classify(classifier_path: str, xq: np.ndarray, min_confidence: float = 0.0,
             query_meta: dict | None = None, model=None) -> tuple[np.ndarray, np.ndarray]:
    """pred [Q] (-1 = none), conf [Q] from a trained classifier's top class and calibrated probability.

    ``query_meta``: the queries' features metadata, checked against what the classifier was trained on;
    ``model``: the classifier of ``classifier_path`` when the caller has loaded it already."""
    model = model if model is not None else load_classifier(classifier_path)
    trained = model.trained_on_
    if trained and query_meta and not same_features(trained, query_meta):
        raise CairnError(f"{classifier_path} was trained on {trained.get('method')} {trained.get('config')} "
                         f"features, but the queries are {query_meta.get('method')} {query_meta.get('config')}; "
                         "extract the queries like the classifier's training features, or retrain it")
    if xq.shape[1] != model.n_features_in_:
        raise CairnError(f"{classifier_path} was trained on {model.n_features_in_}-d descriptors, the queries are "
                         f"{xq.shape[1]}-d; train and extract with the same method")
    labels, probs = model.predict_top(xq, 1)
    pred, conf = labels[:, 0].astype(np.int64), probs[:, 0].astype(np.float32)
    none = (pred == NO_LANDMARK) | (conf < min_confidence) | ~(conf > 0)
    pred[none], conf[none] = NO_LANDMARK, 0.0
    return pred, conf


MAX_VALIDATION_DEPTH = 1024  # neighbours searched per validation query at most (unseen ones skip their class)


def clamp_to_database(vote_config: VoteConfig, neighbours: int, database: int) -> tuple[VoteConfig, int]:
    """(vote_config, neighbours) with k and the neighbours listed per query at most ``database`` (the index's
    images): a deeper search finds nothing more, and its padded [queries, k] arrays (and the vote's
    [queries, k, k]) would only take memory (``--k 100000`` asked tuning for 186 GiB). Logs what it clamps."""
    database = max(1, int(database))
    if vote_config.k > database:
        log.info("recognize: k=%d is more than the %d database images; voting with k=%d", vote_config.k, database,
                 database)
        vote_config = replace(vote_config, k=database)
    if neighbours > database:
        log.info("recognize: listing the %d database images per query (%d neighbours were asked)", database,
                 neighbours)
        neighbours = database
    return vote_config, neighbours


def tune_on_database(index, db_features: str, base: VoteConfig, tune_config: TuneConfig,
                     params: str | None = None, verify=None) -> tuple[VoteConfig, dict, Answers | None]:
    """Tune the confidence and the threshold on validation queries made from the database (index/recognize.py
    :func:`validation_split`, :func:`tune`). ``verify``: as :func:`recognize`'s; the validation queries are
    verified too (at most ``tune_config.verify_queries`` of them). Returns (config, record, the validation
    queries' answers, None when nothing could be held out)."""
    if verify is not None:  # every validation query costs top_k RANSACs: a smaller budget
        half = max(1, tune_config.verify_queries // 2)
        tune_config = replace(tune_config, landmark_queries=min(tune_config.landmark_queries, half),
                              unseen_queries=min(tune_config.unseen_queries, half))
    base, _ = clamp_to_database(base, 1, index.ntotal)
    split = validation_split(index.labels, tune_config, index.image_ids)
    if len(split.landmark) == 0:
        log.info("recognize: no class has %d+ database images to hold some out; recognition is not tuned",
                 tune_config.min_class_images)
        return base, {"skipped": f"no class with {tune_config.min_class_images}+ images"}, None
    held = split.held
    xv, owner = read_rows(db_features, [index.image_ids[r] for r in held], with_owner=True)
    k = max(base.k, verify[2].top_k if verify is not None else 0)
    ids, counts = class_counts(index.labels)
    unseen_labels = index.labels[split.unseen]
    largest = int(counts[np.isin(ids, unseen_labels)].max()) if len(split.unseen) else 0
    # an unseen-landmark query skips the held-out images and every image of its own landmark
    depth = min(k + min(len(held), 3 * k + 20) + largest, MAX_VALIDATION_DEPTH, index.ntotal)
    D, I = search(index, xv, depth, params)
    rows = held[owner]  # the held-out database row of each searched vector
    seen_D, seen_I, un_D, un_I, of_unseen = validation_neighbours(D, I, index.labels, rows, split, k)
    sims = nonlandmark_sims(index, xv, D, I, base, own=rows)  # as a real query's: every other image counts
    un_owner = np.searchsorted(split.unseen, rows[of_unseen])  # position among the unseen-landmark queries
    if len(owner) != len(held):  # regional features: one list per held-out image, the best of its regions
        seen_D, seen_I = merge_rows(owner, seen_D, seen_I, k)
        un_D, un_I = merge_rows(un_owner, un_D, un_I, k)
        sims = None if sims is None else group_max(sims, owner, len(held))
    D = np.concatenate([seen_D, un_D])
    I = np.concatenate([seen_I, un_I])
    if sims is not None:
        sims = np.concatenate([sims, sims[np.searchsorted(split.landmark, split.unseen)]])  # as their seen copy
    truth = np.concatenate([index.labels[split.landmark], np.full(len(split.nonlandmark) + len(split.unseen),
                                                                   NO_LANDMARK)])
    remaining = index.labels.copy()
    remaining[held] = NO_LANDMARK  # class sizes without the held-out images
    verified = None
    if verify is not None:
        query_ids = [index.image_ids[r] for r in np.concatenate([held, split.unseen])]
        D2, I2, inliers, _ = _verify(index, query_ids, D, I, (verify[0], verify[0], verify[2]))
        verified = (aligned_similarities(D, I, I2), index.labels_of(I2), inliers)
        D, I = D2, I2  # the vote rules score the re-ranked lists, as recognition does
    # one random order of the validation queries: equal confidences must not rank one kind of query first; it
    # follows the images' ids, so that an index built in another row order is tuned alike
    order = np.argsort(np.concatenate([id_keys([index.image_ids[r] for r in held], tune_config.seed, "order"),
                                       id_keys([index.image_ids[r] for r in split.unseen], tune_config.seed,
                                               "order-unseen")]), kind="stable")
    D, I, truth = D[order], I[order], truth[order]
    sims = None if sims is None else sims[order]
    verified = None if verified is None else tuple(a[order] for a in verified)
    short = int(np.sum(~np.isfinite(un_D[:, -1]))) if len(un_D) and un_D.shape[1] else 0
    if short:
        log.info("recognize: %d of %d unseen-landmark validation queries have fewer than %d neighbours outside their "
                 "landmark (searched %d deep)", short, len(un_D), k, depth)
    tuned, record, answers = tune(D, index.labels_of(I), truth, sims, base, tune_config, class_counts(remaining),
                                  verified)
    record.update(landmark_queries=int(len(split.landmark)), unseen_queries=int(len(split.unseen)),
                  nonlandmark_queries=int(len(split.nonlandmark)))
    return tuned, record, answers


def aligned_similarities(D: np.ndarray, I: np.ndarray, I2: np.ndarray) -> np.ndarray:
    """[Q, K] the similarities D (of the neighbours I) of the re-ordered neighbours I2 (each row of I2 a
    permutation of the same row of I; -inf where I2 is -1)."""
    Q, K = I.shape
    if Q == 0 or K == 0:
        return np.full(I2.shape, -np.inf, np.float32)
    span = int(max(I.max(), I2.max())) + 2  # one key range per row: row * span + (id + 1)
    rows = np.arange(Q)[:, None] * span
    keys = (rows + I + 1).ravel()
    order = np.argsort(keys, kind="stable")
    pos = order[np.clip(np.searchsorted(keys[order], (rows + I2 + 1).ravel()), 0, keys.size - 1)]
    out = D.ravel()[pos].reshape(I2.shape)
    return np.where(I2 >= 0, out, -np.inf).astype(np.float32)


def tune_classifier(model, db_features: str, tune_config: TuneConfig) -> tuple[float, dict]:
    """The no-landmark threshold of a classifier's calibrated probability, learned like the vote's: a copy of the
    classifier (same hyperparameters) is trained on the database without some held-out images and without
    every image of some held-out classes; its answers to the held-out images of seen classes (landmark
    queries), of the held-out classes (unseen-landmark queries) and to held-out known non-landmark images
    choose the threshold (index/recognize.py :func:`choose_threshold`). Returns (threshold, record)."""
    from sklearn.base import clone

    check_recorded_shards(db_features, "global")
    table, _ = read_shards(features_prefix(db_features, "global"))
    X, y = vectors_of(table), labels_of(table)
    split = validation_split(y, tune_config, table.column("id").to_pylist())
    ids = np.unique(y[split.landmark])
    if len(ids) < 3:
        return 0.0, {"skipped": f"{len(ids)} classes with {tune_config.min_class_images}+ images: a classifier "
                     "needs 3 to hold one out and still learn two"}
    rng = np.random.default_rng(tune_config.seed)
    unseen = np.sort(rng.permutation(ids)[:max(1, int(round(len(ids) * 0.2)))])  # a fifth of the classes
    unseen_rows = np.nonzero(np.isin(y, unseen))[0]
    unseen_rows = np.sort(rng.permutation(unseen_rows)[:max(1, tune_config.unseen_queries)])
    seen_rows = split.landmark[~np.isin(y[split.landmark], unseen)]
    query_rows = np.concatenate([seen_rows, unseen_rows, split.nonlandmark])
    train = np.ones(len(y), bool)
    train[query_rows] = False
    train[np.isin(y, unseen)] = False
    started = time.perf_counter()
    val_model = clone(model).fit(X[train], y[train])
    labels, probs = val_model.predict_top(X[query_rows], 1)
    pred, conf = labels[:, 0].astype(np.int64), probs[:, 0].astype(np.float32)
    pred[pred < 0], conf[pred < 0] = NO_LANDMARK, 0.0
    truth = np.concatenate([y[seen_rows], np.full(len(unseen_rows) + len(split.nonlandmark), NO_LANDMARK)])
    threshold, curve = choose_threshold(pred, conf, truth, tune_config)
    answers = Answers(pred, conf, truth)
    record = {"rule": "classifier", "queries": int(len(truth)), "landmark_queries": int(len(seen_rows)),
              "unseen_queries": int(len(unseen_rows)), "unseen_classes": int(len(unseen)),
              "nonlandmark_queries": int(len(split.nonlandmark)), "train_images": int(train.sum()),
              "untuned": threshold_figures(answers, 0.0, tune_config.nonlandmark_prior),
              "tuned": {"rule": "classifier", "min_confidence": threshold,
                        **threshold_figures(answers, threshold, tune_config.nonlandmark_prior)},
              "threshold_curve": curve, "train_seconds": round(time.perf_counter() - started, 3)}
    log.info("recognize: classifier threshold %.4f tuned on %d validation queries (%d of unseen classes): "
             "accuracy %.3f -> %.3f", threshold, len(truth), len(unseen_rows), record["untuned"]["accuracy"],
             record["tuned"]["accuracy"])
    return threshold, record


def recognize(index_dir: str, features: str, out: str, vote_config: VoteConfig = VoteConfig(),
              neighbours: int = 100, classifier: str | None = None, verify=None, tune_config: TuneConfig | None = None,
              db_features: str | None = None, search_params: str | None = None) -> dict:
    """Search, (re-rank,) decide.

    ``verify`` = (db local folder, query local folder, RerankConfig) or None. ``tune_config``: tune the vote on
    held-out database images first (needs ``db_features``, the features the index was built from).
    """
    index = load_any(index_dir)
    vote_config, neighbours = clamp_to_database(vote_config, neighbours, index.ntotal)
    query_ids, xq, meta = read_queries(features)
    check_same_features(index.features_metadata, meta, features)
    images, owner = group_queries(query_ids)
    regional = len(images) != len(query_ids)  # several region rows per query image (extract --detector)
    if regional and (classifier or verify is not None):
        raise CairnError(f"{features} holds detected regions (several rows per image); --classifier and "
                         "--verify-* take whole-image features: extract the queries without --detector")
    tuning, validation = None, None
    if tune_config is not None and tune_config.enabled and classifier:
        if not db_features:
            raise CairnError("tuning needs the database features the classifier was trained on (--tune-db FOLDER)")
        started = time.perf_counter()
        threshold, tuning = tune_classifier(load_classifier(classifier), db_features, tune_config)
        vote_config = replace(vote_config, min_confidence=threshold)
        tuning["seconds"] = round(time.perf_counter() - started, 3)
    elif tune_config is not None and tune_config.enabled:
        if not db_features:
            raise CairnError("tuning needs the database features the index was built from (--tune-db FOLDER)")
        started = time.perf_counter()
        vote_config, tuning, validation = tune_on_database(index, db_features, vote_config, tune_config,
                                                           search_params, verify)
        tuning["seconds"] = round(time.perf_counter() - started, 3)
    k = max(vote_config.k, neighbours, verify[2].top_k if verify else 0)
    started = time.perf_counter()
    D, I = search(index, xq, k, search_params, progress=len(query_ids) > 100_000)
    penalty = not classifier and vote_config.nonlandmark_weight > 0
    sims = None
    if regional:  # one neighbour list per query image: each database image at its best over the query's regions
        sims = nonlandmark_sims(index, xq, D, I, vote_config) if penalty else None
        D, I = merge_rows(owner, D, I, k)
        sims = None if sims is None else group_max(sims, owner, len(images))
    search_seconds = time.perf_counter() - started
    regions = len(query_ids)
    query_ids = images
    if penalty and not regional:  # from the similarities of the search, as tuning measures them
        sims = nonlandmark_sims(index, xq, D, I, vote_config)
    verify_seconds, inliers, verified_sims = 0.0, None, None
    if verify is not None:
        D0, I0 = D, I
        D, I, inliers, verify_seconds = _verify(index, query_ids, D, I, verify)
        verified_sims = aligned_similarities(D0, I0, I)
    started = time.perf_counter()
    classes = None
    if classifier:
        if not isinstance(xq, np.ndarray):
            raise CairnError("--classifier needs dense query descriptors (HoG, VLAD), not BoVW")
        model = load_classifier(classifier)
        classes = len(model.classes_)
        raw_pred, raw_conf = classify(classifier, xq, 0.0, meta, model=model)
        rule = "classifier"
    else:
        raw_pred, raw_conf = vote(verified_sims if vote_config.rule == "verified" else D, index.labels_of(I),
                                  vote_config, sims, class_counts(index.labels), inliers, threshold=False)
        rule = vote_config.rule
    vote_config = apply_query_threshold(vote_config, tuning, validation, raw_pred, raw_conf, tune_config)
    kept = (raw_pred >= 0) & (raw_conf >= vote_config.min_confidence)
    pred, conf = np.where(kept, raw_pred, NO_LANDMARK), np.where(kept, raw_conf, 0.0).astype(np.float32)
    decide_seconds = time.perf_counter() - started
    fs.makedirs(out)
    write_submission(fs.join(out, "predictions.csv"), query_ids, pred, conf)
    write_table(confidences_table(query_ids, raw_pred, raw_conf, vote_config.min_confidence, rule),
                fs.join(out, "confidences.parquet"))
    keep = min(neighbours, I.shape[1])
    write_table(neighbours_table(query_ids, D[:, :keep], I[:, :keep], index, RERANKED if verify else COSINE),
                fs.join(out, "neighbours.parquet"))
    record = {
        "config": {"index": index_dir, "features": features, "vote": cfg.to_dict(vote_config),
                   "neighbours": neighbours, "classifier": classifier, "search_params": search_params,
                   "tune": None if tune_config is None else cfg.to_dict(tune_config),
                   "verify": None if verify is None else {"db": verify[0], "queries": verify[1],
                                                          "rerank": cfg.to_dict(verify[2])}},
        "counts": {"queries": len(query_ids), "predicted": int((pred >= 0).sum()),
                   **({"query_regions": regions, "database_regions": getattr(index, "regions", index.ntotal)} if regional or
                      isinstance(index, RegionalIndex) else {})},
        "tuning": tuning,
        "search_seconds": round(search_seconds, 4),
        "verify_seconds": round(verify_seconds, 3),
        "decide_seconds": round(decide_seconds, 4),
        "queries_per_second": round(len(query_ids) / search_seconds, 1) if search_seconds > 0 else None,
    }
    cfg.save_json(fs.join(out, "recognize.json"), record)
    log.info("recognize: %d queries, %d with a landmark prediction; search %.3f s", len(query_ids),
             record["counts"]["predicted"], search_seconds)
    return {**record, "cost": recognize_cost(record, int(getattr(index, "regions", index.ntotal)), classes)}


def apply_query_threshold(vote_config: VoteConfig, tuning: dict | None, validation: Answers | None,
                          raw_pred: np.ndarray, raw_conf: np.ndarray, tune_config: TuneConfig | None) -> VoteConfig:
    """``vote_config`` with the no-landmark threshold fitted to the queries' answers before the threshold
    (index/recognize.py :func:`query_threshold`), when tuning ran and ``tune_config.threshold_from`` is
    "queries"; the validation threshold otherwise, or when there are too few queries. Records what it did in
    ``tuning`` (``query_threshold``; ``tuned`` then holds the threshold used and the validation figures at it)."""
    if tuning is None or tune_config is None or "tuned" not in tuning:
        return vote_config
    tuned = tuning["tuned"]
    tuned["threshold_from"] = "validation"
    if tune_config.threshold_from != "queries":
        return vote_config
    if tuning.get("rule") == "classifier":
        # the estimate needs validation landmark confidences distributed like the real queries'; a classifier's
        # come from a copy trained on less, whose probabilities are not. Porto without arrabida, hog-linear (true
        # landmark share 0.44): the copy without a fifth of the classes gave an estimate of 0.33, a copy of every
        # class without the held-out images 0.09 (75th percentile 0.99 on them, 0.90 on the real landmark
        # queries), and both thresholds lost GAP and accuracy against the validation threshold
        tuning["query_threshold"] = {"skipped": "a classifier's threshold is learned on validation queries only",
                                     "validation_threshold": vote_config.min_confidence}
        return vote_config
    if validation is None:  # tune_on_database gives its validation answers whenever it tuned
        return vote_config
    threshold, record = query_threshold(validation, raw_pred, raw_conf, tune_config)
    record["validation_threshold"] = vote_config.min_confidence
    tuning["query_threshold"] = record
    if threshold is None:
        log.info("recognize: the validation threshold %.4f is kept: %s", vote_config.min_confidence,
                 record["skipped"])
        return vote_config
    tuned.update(min_confidence=threshold, threshold_from="queries",
                 **threshold_figures(validation, threshold, tune_config.nonlandmark_prior))
    log.info("recognize: no-landmark threshold %.4f fitted to the %d queries (validation's: %.4f): about %.0f%% of "
             "them show a database landmark; estimated accuracy %.3f, GAP %.3f", threshold, record["queries"],
             vote_config.min_confidence, 100 * record["landmark_share"], record["estimated_accuracy"],
             record["estimated_gap"])
    return replace(vote_config, min_confidence=threshold)


def recognize_cost(record: dict, database: int, classes: int | None = None) -> dict:
    """A recognition's cost: per query, with its search (queries x database vectors), a classifier's scoring
    (queries x its ``classes``), the vote tuning (per held-out database image, one of each of up to 2,000
    classes) and the spatial verification (per query) as parts of their own."""
    queries = int(record["counts"]["queries"])
    tuning = record.get("tuning") or {}
    parts = [costs.part("search", "search", record.get("search_seconds", 0.0), queries * database,
                        [["queries", None], ["database", None]]),
             costs.part("verify", "spatial verification", record.get("verify_seconds", 0.0), queries,
                        [["queries", None]])]
    if tuning.get("seconds"):
        # the vote grid over the held-out images' neighbour lists: per held-out image (their own search of the
        # database is one query batch, small beside the grid)
        parts.append(costs.part("tune", "vote tuning", tuning["seconds"], int(tuning.get("queries", 0) or 0),
                                [["classes", 2000]]))
    if classes:  # the search above still runs (the neighbour lists); the labels come from the classifier
        parts.append(costs.part("classify", "classifier scoring", record.get("decide_seconds", 0.0),
                                queries * classes, [["queries", None], ["classes", None]]))
    return costs.cost("recognize", queries, [["queries", None]], parts=[p for p in parts if p["seconds"]])


def _verify(index, query_ids, D, I, verify):
    db_local, query_local, rerank_config = verify
    local_meta = features_metadata(db_local, "local")
    query_meta = features_metadata(query_local, "local")
    if not same_features(local_meta, query_meta):
        raise CairnError(f"--verify-queries {query_local} holds {query_meta.get('method')} "
                         f"{query_meta.get('config')} features but --verify-db {db_local} holds "
                         f"{local_meta.get('method')} {local_meta.get('config')}; extract both alike")
    started = time.perf_counter()
    D, I, inliers = spatial_rerank(query_ids, D, I, index.image_ids, features_prefix(query_local, "local"),
                                   features_prefix(db_local, "local"), rerank_config,
                                   prepare=lambda d: prepare_descriptors(d, local_meta),
                                   progress=len(query_ids) > 500)
    return D, I, inliers, time.perf_counter() - started


def threshold_beam_outputs(out: str, record: dict, vote_config: VoteConfig, validation: Answers | None,
                           tune_config: TuneConfig) -> dict:
    """The Beam search job's outputs with the threshold fitted to every query's answer (
    :func:`apply_query_threshold`, which needs them all; the job applied the validation threshold): its
    confidences-*.parquet shards are read back, and when the threshold moves, they, OUT/predictions.csv and
    OUT/recognize.json are written again (each file atomically; a crash in between leaves shards of two
    thresholds, which every reader refuses with "rerun the job", and the command fails). Returns the updated
    record."""
    tuning = record["tuning"]
    paths = find_shards(fs.join(out, "confidences"))
    tables = []
    for path in paths:
        with fs.FileSystems.open(path) as f:
            tables.append(read_file(f))
    table = pa.concat_tables(tables)  # find_shards raises when the job wrote none
    raw_pred = table.column("landmark_id").fill_null(NO_LANDMARK).to_numpy().astype(np.int64)
    raw_conf = table.column("confidence").to_numpy()
    new = apply_query_threshold(vote_config, tuning, validation, raw_pred, raw_conf, tune_config)
    if new.min_confidence != vote_config.min_confidence:
        for path, t in zip(paths, tables, strict=True):
            write_table(confidences_table(t.column("query_id").to_pylist(),
                                          t.column("landmark_id").fill_null(NO_LANDMARK).to_numpy(),
                                          t.column("confidence").to_numpy(), new.min_confidence, new.rule), path)
        kept = (raw_pred >= 0) & (raw_conf >= new.min_confidence)
        write_submission(fs.join(out, "predictions.csv"), table.column("query_id").to_pylist(),
                         np.where(kept, raw_pred, NO_LANDMARK), np.where(kept, raw_conf, 0.0))
        record["config"]["vote"] = cfg.to_dict(new)
        record["counts"]["predicted"] = int(kept.sum())
    cfg.save_json(fs.join(out, "recognize.json"), record)
    return record


def recorded_source(index_dir: str) -> str | None:
    """The database features folder `cairn index` recorded, when it still exists."""
    path = fs.join(index_dir, "index.json")
    if not fs.exists(path):
        return None
    source = (cfg.load_json(path).get("build") or {}).get("source")
    return source if source and fs.exists(source) else None


def recognize_queries(index_dir: str, features: str, out: str, vote_config: VoteConfig = VoteConfig(),
                      neighbours: int = 100, classifier: str | None = None, verify=None,
                      tune_config: TuneConfig | None = TuneConfig(), db_features: str | None = None,
                      search_params: str | None = None, beam: str = "auto", workers: int = 0,
                      beam_args: list[str] | None = None, test_pipeline=None) -> dict:
    """`cairn recognize`: :func:`recognize` in this process, or the Beam search job for large query sets
    (``beam`` auto: 200,000+ queries or a cluster runner; on; off), tuned first on the database features the
    index records (or ``db_features``)."""
    db_features = db_features or recorded_source(index_dir)
    if tune_config is not None and not db_features:
        log.info("recognize: the index does not record its features folder and --tune-db is not given; "
                 "recognition is not tuned")
        tune_config = None
    if use_beam(beam, features, list(beam_args or []), BEAM_MIN_QUERIES):
        tuning = None
        if verify or classifier:
            raise CairnError("--beam supports neighbour votes only; drop --verify-*/--classifier or use --beam off")
        record = fs.join(index_dir, "index.json")  # its count: the workers load the index itself
        if fs.exists(record):
            vote_config, neighbours = clamp_to_database(vote_config, neighbours, cfg.load_json(record)["count"])
        if tune_config is not None and tune_config.enabled:
            started = time.perf_counter()
            vote_config, tuning, validation = tune_on_database(load_any(index_dir), db_features, vote_config,
                                                               tune_config, search_params)
            tuning["seconds"] = round(time.perf_counter() - started, 3)
        record = recognize_beam(index_dir, features, out, vote_config, neighbours, search_params, workers=workers,
                                beam_args=beam_args, test_pipeline=test_pipeline, tuning=tuning)
        return threshold_beam_outputs(out, record, vote_config, validation, tune_config) if tuning else record
    return recognize(index_dir, features, out, vote_config, neighbours, classifier=classifier, verify=verify,
                     tune_config=tune_config, db_features=db_features, search_params=search_params)
