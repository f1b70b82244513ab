"""cairn recognize: landmark predictions and nearest database images for every query.

Reads the query descriptors written by `cairn extract` (or `cairn encode`), searches the index built by
`cairn index` (FAISS for dense vectors, an inverted file for BoVW), and decides each query's landmark by
neighbour votes (index/recognize.py), or with --classifier by a trained classifier (`cairn train --method
hog-linear`). With --verify-db/--verify-queries (local SIFT features of both sides) the top neighbours are
re-ranked by spatial verification before voting (index/rerank.py).

No landmark: unless --no-tune, the vote (sum or max, per-class normalisation, the penalty by similarity to the
known non-landmark database images, the threshold) is first tuned on held-out database images: one image of up
to 2,000 classes and half of the non-landmark images are searched against the rest (the database features are
the folder the index records, or --tune-db). The flags give the starting point and the values used without
tuning. Writes:
    OUT/predictions.csv     Google Landmark Recognition format: id,landmarks ("<landmark_id> <confidence>",
                            empty for no landmark)
    OUT/neighbours.parquet  query_id, rank, id, score, landmark_id: the top database images of every query
    OUT/recognize.json      the config, counts, timing and the tuning (what was tried, GAP before and after)
Large query sets (200,000+, --beam on, or a --runner other than DirectRunner) run as a Beam job that loads the
index once per worker process (pipeline/search.py) and writes OUT/neighbours-SSSSS-of-NNNNN.parquet shards.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from index.faiss_index import VectorIndex
from index.recognize import (
    NO_LANDMARK,
    TuneConfig,
    VoteConfig,
    class_counts,
    drop_held_out,
    nonlandmark_similarity,
    tune,
    validation_split,
    vote,
)
from index.regions import RegionalIndex, group_queries, merge_rows
from index.sparse_index import load_any
from jobs import common
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.parquet_io import read_file, read_shards, write_table
from pipeline.schemas import cairn_metadata, same_features, sparse_matrix_of, vectors_of
from pipeline.submission import write_submission

log = logging.getLogger(__name__)
NEIGHBOURS_SCHEMA = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("id", pa.string(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
    pa.field("landmark_id", pa.int64(), nullable=True),
])


def neighbours_table(query_ids: list[str], D: np.ndarray, I: np.ndarray, index) -> pa.Table:
    """Long table: one row per (query, rank) for the neighbours that exist (vectorised: no per-row Python)."""
    valid = I >= 0
    q_rows, ranks = np.nonzero(valid)
    ids = I[valid]
    labels = index.labels[ids]
    db_ids = index.id_array() if hasattr(index, "id_array") else pa.array(index.image_ids, pa.string())
    return pa.table({
        "query_id": pa.array(query_ids, pa.string()).take(pa.array(q_rows)),
        "rank": (ranks + 1).astype(np.int32),
        "id": db_ids.take(pa.array(ids)),
        "score": D[valid].astype(np.float32),
        "landmark_id": pa.array(labels, pa.int64(), mask=labels < 0),
    }, schema=NEIGHBOURS_SCHEMA)


def classify(classifier_path: str, xq: np.ndarray, min_confidence: float = 0.0,
             query_meta: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """pred [Q] (-1 = none), conf [Q] from a trained classifier's top class and calibrated probability.

    ``query_meta``: the queries' features metadata, checked against what the classifier was trained on."""
    from models.classifiers import load_classifier

    model = load_classifier(classifier_path)
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


def read_queries(features: str):
    """(ids, query vectors (dense [Q, D] or sparse CSR), metadata) of a query features folder."""
    from jobs.encode import features_kind
    from jobs.extract import features_prefix

    kind = features_kind(features)
    if kind == "local":
        raise CairnError(f"{features} holds local features; encode them first (`cairn encode`)")
    table, meta = read_shards(features_prefix(features, kind))
    xq = sparse_matrix_of(table, meta["dim"]) if kind == "sparse" else vectors_of(table)
    return table.column("id").to_pylist(), xq, meta


def check_same_features(db_meta: dict, meta: dict, features: str) -> None:
    """CairnError when the queries were extracted otherwise than the database the index holds."""
    if db_meta and meta and not same_features(db_meta, meta):
        raise CairnError(
            f"queries in {features} were extracted with {meta.get('method')} {meta.get('config')} but the index "
            f"holds {db_meta.get('method')} {db_meta.get('config')}; extract both with the same method and config"
        )


def search(index, xq, k: int, params: str | None = None, progress: bool = False):
    """D, I of any index kind, with D as similarities (L2 distances of unit vectors turned into cosines)."""
    k = min(k, max(1, index.ntotal))
    if isinstance(index, (VectorIndex, RegionalIndex)):
        D, I = index.search(xq, k, params=params, progress=progress)
        if index.config.metric == "l2":  # squared distances of unit vectors -> cosine similarities
            D = np.where(I >= 0, 1.0 - D / 2.0, -np.inf).astype(np.float32)
        return D, I
    if params:
        raise CairnError("--search-params applies to FAISS indices, not to the BoVW inverted file")
    return index.search(xq, k, progress=progress)


def nonlandmark_sims(index, xq, D: np.ndarray, I: np.ndarray, config: VoteConfig, held_out: np.ndarray | None = None,
                     ) -> np.ndarray | None:
    """[Q] mean similarity of each query to its ``config.nonlandmark_k`` nearest known non-landmark images.

    Exact from the index's own non-landmark index when it has one; otherwise from the non-landmark images among
    the neighbours in D, I (missing ones count as 0). None when the database has no non-landmark image.
    ``held_out``: main-index ids to leave out (validation).
    """
    nk = config.nonlandmark_k
    sub = getattr(index, "nonlandmarks", None)
    if sub is not None:
        extra = 0
        nl_held = np.empty(0, np.int64)
        if held_out is not None and len(held_out):
            row_of = {image_id: r for r, image_id in enumerate(sub.image_ids)}
            nl_held = np.array([row_of[index.image_ids[h]] for h in held_out if index.image_ids[h] in row_of],
                               np.int64)
            extra = min(len(nl_held), 4 * nk + 20)
        Dn, In = search(sub, xq, nk + extra)
        if len(nl_held):
            Dn, In = drop_held_out(Dn, In, nl_held, nk)
        return nonlandmark_similarity(Dn, nk)
    if not (index.labels < 0).any():
        return None
    D, I = D[:, :config.k], I[:, :config.k]  # the voting neighbours, as in tuning
    labels = index.labels_of(I)
    mask = (labels < 0) & (I >= 0)
    if held_out is not None and len(held_out):
        mask &= ~np.isin(I, held_out)
    Dm = np.where(mask, D, -np.inf)
    Dm = -np.sort(-Dm, axis=1)[:, :nk]
    return nonlandmark_similarity(Dm, nk)


def read_rows(features: str, wanted: list[str], with_owner: bool = False):
    """Vectors (dense [n, D] or sparse CSR) of the images ``wanted`` of a features folder, in that order. With
    ``with_owner``: (vectors of every row of those images, owner [rows]: each row's position in ``wanted``),
    for regional features (several rows per image)."""
    import pyarrow.compute as pc

    from jobs.encode import features_kind
    from jobs.extract import features_prefix
    from pipeline.parquet_io import find_shards

    kind = features_kind(features)
    tables, meta = [], None
    wanted_arr = pa.array(wanted, pa.string())
    for path in find_shards(features_prefix(features, kind)):
        with fs.FileSystems.open(path) as f:
            t = read_file(f)
        meta = meta or cairn_metadata(t.schema)
        tables.append(t.filter(pc.is_in(t.column("id"), value_set=wanted_arr)))
    table = pa.concat_tables(tables)
    found = table.column("id").to_pylist()
    rows_of: dict[str, list[int]] = {}
    for r, image_id in enumerate(found):
        rows_of.setdefault(image_id, []).append(r)
    missing = [w for w in wanted if w not in rows_of]
    if missing:
        raise CairnError(f"{features} lacks {len(missing)} database images of the index (e.g. {missing[0]}); "
                         "give the features the index was built from (--tune-db)")
    if with_owner:
        take = [(r, n) for n, w in enumerate(wanted) for r in rows_of[w]]
        owner = np.array([n for _, n in take], np.int64)
        table = table.take(pa.array([r for r, _ in take], pa.int64()))
    else:
        table = table.take(pa.array([rows_of[w][0] for w in wanted], pa.int64()))
    x = sparse_matrix_of(table, meta["dim"]) if kind == "sparse" else vectors_of(table)
    return (x, owner) if with_owner else x


def group_max(values: np.ndarray, owner: np.ndarray, groups: int) -> np.ndarray:
    """[groups] the largest of ``values`` [rows] per owner."""
    out = np.full(groups, -np.inf, np.float32)
    np.maximum.at(out, owner, np.asarray(values, np.float32))
    return out


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
    if classifier:
        if not isinstance(xq, np.ndarray):
            raise CairnError("--classifier needs dense query descriptors (HoG, VLAD), not BoVW")
        pred, conf = classify(classifier, xq, vote_config.min_confidence, meta)
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
    return record


def _verify(index, query_ids, D, I, verify):
    from features.sift import prepare_descriptors
    from index.rerank import spatial_rerank
    from jobs.encode import features_metadata
    from jobs.extract import features_prefix

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


def add_vote_args(p) -> None:
    """Recognition flags shared by `cairn recognize` and `cairn compare`."""
    d, t = VoteConfig(), TuneConfig()
    g = p.add_argument_group("recognition from neighbours")
    g.add_argument("--k", type=int, default=d.k, help=f"neighbours that vote (default {d.k})")
    g.add_argument("--min-confidence", type=float, default=d.min_confidence,
                   help="predict no landmark below this confidence (default 0; tuned when tuning)")
    g.add_argument("--aggregate", default=d.aggregate, choices=["sum", "max"],
                   help="a class's score: sum or max of its neighbours' similarities (default sum; tuned)")
    g.add_argument("--class-norm", type=float, default=d.class_norm,
                   help="divide a class's sum by min(its images, k) ** this, for the long tail (0..1, default 0; "
                        "tuned)")
    g.add_argument("--nonlandmark-weight", type=float, default=d.nonlandmark_weight,
                   help="confidence -= this x mean similarity to the nearest known non-landmark database images "
                        "(database rows without a landmark_id; default 0; tuned)")
    g.add_argument("--nonlandmark-k", type=int, default=d.nonlandmark_k,
                   help=f"non-landmark images averaged into that penalty (default {d.nonlandmark_k})")
    g.add_argument("--no-tune", action="store_true",
                   help="do not tune aggregate, class norm, penalty and threshold on held-out database images "
                        f"(tuning holds out one image of up to {t.landmark_queries:,} classes and "
                        f"{t.nonlandmark_share * 100:.0f}%% of the non-landmark images)")


def vote_args(args) -> tuple[VoteConfig, TuneConfig | None]:
    import math

    if not (math.isfinite(args.min_confidence) and 0 <= args.min_confidence <= 1):
        raise CairnError("--min-confidence must be a number between 0 and 1")
    for flag in ("k", "nonlandmark_k"):
        if getattr(args, flag) < 1:
            raise CairnError(f"--{flag.replace('_', '-')} must be >= 1")
    try:
        vc = VoteConfig(k=args.k, min_confidence=args.min_confidence, aggregate=args.aggregate,
                        class_norm=args.class_norm, nonlandmark_k=args.nonlandmark_k,
                        nonlandmark_weight=args.nonlandmark_weight)
    except ValueError as e:
        raise CairnError(f"recognition flags: {e}") from e
    return vc, None if args.no_tune else TuneConfig()


def add_query_args(p) -> None:
    """The flags `cairn recognize` and `cairn neighbours` share: index, queries, output, search, Beam."""
    p.add_argument("--index", required=True, help="index folder from `cairn index`")
    p.add_argument("--features", required=True, help="query folder from `cairn extract`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--search-params", default=None,
                   help="FAISS search parameters for this run, e.g. nprobe=128 or efSearch=256 "
                        "(default: those stored with the index)")
    p.add_argument("--beam", choices=["auto", "on", "off"], default="auto",
                   help="search as a Beam job that loads the index once per worker (auto: for "
                        f"{BEAM_MIN_QUERIES:,}+ queries or a --runner other than DirectRunner)")
    common.add_worker_args(p)


def build_parser():
    p = common.parser("cairn recognize", __doc__, beam=True)
    add_query_args(p)
    p.add_argument("--neighbours", type=int, default=100, help="database images listed per query (default 100)")
    p.add_argument("--classifier", help="classifier.npz from `cairn train` (hog-linear, sift-vlad-linear): decide "
                   "landmarks with it instead of neighbour votes; neighbours are still listed")
    p.add_argument("--tune-db", help="the database features the index was built from (default: the folder "
                   "recorded in the index), for tuning on held-out database images")
    add_vote_args(p)
    g = p.add_argument_group("spatial verification (sift-bovw+sv)")
    g.add_argument("--verify-db", help="local SIFT features of the database (`cairn extract --method sift`)")
    g.add_argument("--verify-queries", help="local SIFT features of the queries")
    g.add_argument("--verify-top-k", type=int, default=20, help="neighbours verified per query (default 20)")
    return p


BEAM_MIN_QUERIES = 200_000


def run(argv=None, test_pipeline=None) -> dict:
    args, beam_args = common.parse_beam_job(build_parser(), argv)
    if args.neighbours < 1:
        raise CairnError("--neighbours must be >= 1")
    vc, tc = vote_args(args)
    verify = None
    if bool(args.verify_db) != bool(args.verify_queries):
        raise CairnError("give both --verify-db and --verify-queries (local features of both sides), or neither")
    if args.verify_db:
        from features.verify import RerankConfig

        try:
            verify = (args.verify_db, args.verify_queries, RerankConfig(top_k=args.verify_top_k))
        except ValueError as e:
            raise CairnError(f"--verify-top-k: {e}") from e
    db_features = args.tune_db or _recorded_source(args.index)
    if tc is not None and not db_features:
        log.info("recognize: the index does not record its features folder and --tune-db is not given; "
                 "recognition is not tuned")
        tc = None
    from pipeline.search import use_beam

    if use_beam(args.beam, args.features, beam_args, BEAM_MIN_QUERIES):
        if verify or args.classifier:
            raise CairnError("--beam supports neighbour votes only; drop --verify-*/--classifier or use --beam off")
        from pipeline.search import recognize_beam

        if tc is not None:
            vc, _ = tune_on_database(load_any(args.index), db_features, vc, tc, args.search_params)
        return recognize_beam(args.index, args.features, args.out, vc, args.neighbours, args.search_params,
                              workers=args.workers, beam_args=beam_args, test_pipeline=test_pipeline)
    return recognize(args.index, args.features, args.out, vc, args.neighbours, classifier=args.classifier,
                     verify=verify, tune_config=tc, db_features=db_features, search_params=args.search_params)


def _recorded_source(index_dir: str) -> str | None:
    """The database features folder `cairn index` recorded, when it still exists."""
    path = fs.join(index_dir, "index.json")
    if not fs.exists(path):
        return None
    source = (cfg.load_json(path).get("build") or {}).get("source")
    return source if source and fs.exists(source) else None
