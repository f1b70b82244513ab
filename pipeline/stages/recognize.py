"""Recognition of a query features folder against an index (`cairn recognize`, and every method of `cairn
compare`): search, optional spatial re-ranking, then a landmark and confidence per query from the neighbours'
votes (tuned on held-out database images) or from a classifier. Writes OUT/predictions.csv (Google Landmark
Recognition format), OUT/neighbours.parquet and OUT/recognize.json. Query sets too large for one process go to
the Beam search job (pipeline/stages/search.py).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from features.sift import prepare_descriptors
from index.recognize import (
    NO_LANDMARK,
    TuneConfig,
    VoteConfig,
    class_counts,
    drop_held_out,
    tune,
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
from pipeline.featuresets import features_metadata, features_prefix
from pipeline.parquet_io import write_table
from pipeline.schemas import same_features
from pipeline.stages import costs
from pipeline.stages.lookup import (
    BEAM_MIN_QUERIES,
    check_same_features,
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


def tune_on_database(index, db_features: str, base: VoteConfig, tune_config: TuneConfig,
                     params: str | None = None) -> tuple[VoteConfig, dict]:
    """Tune the vote on held-out database images (index/recognize.py :func:`tune`)."""
    lm_rows, nl_rows = validation_split(index.labels, tune_config)
    if len(lm_rows) == 0:
        log.info("recognize: no class has %d+ database images to hold one out; recognition is not tuned",
                 tune_config.min_class_images)
        return base, {"skipped": f"no class with {tune_config.min_class_images}+ images"}
    held = np.concatenate([lm_rows, nl_rows])
    xv, owner = read_rows(db_features, [index.image_ids[r] for r in held], with_owner=True)
    k = base.k
    D, I = search(index, xv, k + min(len(held), 3 * k + 20), params)
    D, I = drop_held_out(D, I, held, k)
    sims = nonlandmark_sims(index, xv, D, I, base, held_out=held)
    if len(owner) != len(held):  # regional features: one list per held-out image, the best of its regions
        D, I = merge_rows(owner, D, I, k)
        sims = None if sims is None else group_max(sims, owner, len(held))
    truth = np.concatenate([index.labels[lm_rows], np.full(len(nl_rows), NO_LANDMARK)])
    remaining = index.labels.copy()
    remaining[held] = NO_LANDMARK  # class sizes without the held-out images
    tuned, record = tune(D, index.labels_of(I), truth, sims, base, tune_config, class_counts(remaining))
    record["nonlandmark_queries"] = int(len(nl_rows))
    return tuned, record


def recognize(index_dir: str, features: str, out: str, vote_config: VoteConfig = VoteConfig(),
              neighbours: int = 100, classifier: str | None = None, verify=None, tune_config: TuneConfig | None = None,
              db_features: str | None = None, search_params: str | None = None) -> dict:
    """Search, (re-rank,) decide.

    ``verify`` = (db local folder, query local folder, RerankConfig) or None. ``tune_config``: tune the vote on
    held-out database images first (needs ``db_features``, the features the index was built from).
    """
    index = load_any(index_dir)
    query_ids, xq, meta = read_queries(features)
    check_same_features(index.features_metadata, meta, features)
    images, owner = group_queries(query_ids)
    regional = len(images) != len(query_ids)  # several region rows per query image (extract --detector)
    if regional and (classifier or verify is not None):
        raise CairnError(f"{features} holds detected regions (several rows per image); --classifier and "
                         "--verify-* take whole-image features: extract the queries without --detector")
    tuning = None
    if tune_config is not None and verify is not None:
        # verified neighbours are scored by inliers, not by the similarities tuning sees: nothing to transfer
        log.info("recognize: spatial verification re-scores the neighbours; the vote is not tuned")
        tune_config = None
    if tune_config is not None and tune_config.enabled and not classifier:
        if not db_features:
            raise CairnError("tuning needs the database features the index was built from (--tune-db FOLDER)")
        started = time.perf_counter()
        vote_config, tuning = tune_on_database(index, db_features, vote_config, tune_config, search_params)
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
    verify_seconds = 0.0
    if verify is not None:
        D, I, verify_seconds = _verify(index, query_ids, D, I, verify)
    if penalty and not regional:
        sims = nonlandmark_sims(index, xq, D, I, vote_config)
    started = time.perf_counter()
    classes = None
    if classifier:
        if not isinstance(xq, np.ndarray):
            raise CairnError("--classifier needs dense query descriptors (HoG, VLAD), not BoVW")
        model = load_classifier(classifier)
        classes = len(model.classes_)
        pred, conf = classify(classifier, xq, vote_config.min_confidence, meta, model=model)
    else:
        pred, conf = vote(D, index.labels_of(I), vote_config, sims, class_counts(index.labels))
    decide_seconds = time.perf_counter() - started
    fs.makedirs(out)
    write_submission(fs.join(out, "predictions.csv"), query_ids, pred, conf)
    keep = min(neighbours, I.shape[1])
    write_table(neighbours_table(query_ids, D[:, :keep], I[:, :keep], index), fs.join(out, "neighbours.parquet"))
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
    D, I, _ = spatial_rerank(query_ids, D, I, index.image_ids, features_prefix(query_local, "local"),
                             features_prefix(db_local, "local"), rerank_config,
                             prepare=lambda d: prepare_descriptors(d, local_meta), progress=len(query_ids) > 500)
    return D, I, time.perf_counter() - started


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
        if verify or classifier:
            raise CairnError("--beam supports neighbour votes only; drop --verify-*/--classifier or use --beam off")
        if tune_config is not None:
            vote_config, _ = tune_on_database(load_any(index_dir), db_features, vote_config, tune_config,
                                              search_params)
        return recognize_beam(index_dir, features, out, vote_config, neighbours, search_params, workers=workers,
                              beam_args=beam_args, test_pipeline=test_pipeline)
    return recognize(index_dir, features, out, vote_config, neighbours, classifier=classifier, verify=verify,
                     tune_config=tune_config, db_features=db_features, search_params=search_params)
