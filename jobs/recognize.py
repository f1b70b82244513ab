"""cairn recognize: landmark predictions and nearest database images for every query.

Reads the query descriptors written by `cairn extract` (or `cairn encode`), searches the index built by
`cairn index` (FAISS for dense vectors, an inverted file for BoVW), and decides each query's landmark by
neighbour votes, or with --classifier by a trained classifier (`cairn train --method hog-linear`). With
--verify-db/--verify-queries (local SIFT features of both sides) the top neighbours are re-ranked by spatial
verification before voting (index/rerank.py). Writes:
    OUT/predictions.csv     Google Landmark Recognition format: id,landmarks ("<landmark_id> <confidence>",
                            empty for no landmark)
    OUT/neighbours.parquet  query_id, rank, id, score, landmark_id: the top database images of every query
    OUT/recognize.json      the config, counts and timing
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.faiss_index import VectorIndex
from index.recognize import NO_LANDMARK, VoteConfig, vote
from index.sparse_index import load_any
from jobs import common
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.parquet_io import read_shards
from pipeline.schemas import sparse_matrix_of, vectors_of
from pipeline.submission import write_submission

log = logging.getLogger(__name__)
NEIGHBOURS_SCHEMA = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("id", pa.string(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
    pa.field("landmark_id", pa.int64(), nullable=True),
])


def neighbours_table(query_ids: list[str], D: np.ndarray, I: np.ndarray, index: VectorIndex) -> pa.Table:
    """Long table: one row per (query, rank) for the neighbours that exist."""
    valid = I >= 0
    q_rows, ranks = np.nonzero(valid)
    ids = I[valid]
    labels = index.labels[ids]
    return pa.table({
        "query_id": [query_ids[q] for q in q_rows],
        "rank": (ranks + 1).astype(np.int32),
        "id": [index.image_ids[j] for j in ids],
        "score": D[valid].astype(np.float32),
        "landmark_id": pa.array(labels, pa.int64(), mask=labels < 0),
    }, schema=NEIGHBOURS_SCHEMA)


def classify(classifier_path: str, xq: np.ndarray, min_confidence: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """pred [Q] (-1 = none), conf [Q] from a trained classifier's top class and calibrated probability."""
    from models.classifiers import load_classifier

    model = load_classifier(classifier_path)
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


def recognize(index_dir: str, features: str, out: str, vote_config: VoteConfig = VoteConfig(),
              neighbours: int = 100, classifier: str | None = None, verify=None) -> dict:
    """Search, (re-rank,) decide; ``verify`` = (db local folder, query local folder, RerankConfig) or None."""
    index = load_any(index_dir)
    query_ids, xq, meta = read_queries(features)
    db_meta = index.features_metadata
    if db_meta and meta and (db_meta.get("method"), db_meta.get("config")) != (meta.get("method"), meta.get("config")):
        raise CairnError(
            f"queries in {features} were extracted with {meta.get('method')} {meta.get('config')} but the index "
            f"holds {db_meta.get('method')} {db_meta.get('config')}; extract both with the same method and config"
        )
    k = max(vote_config.k, neighbours, verify[2].top_k if verify else 0)
    started = time.perf_counter()
    D, I = index.search(xq, min(k, max(1, index.ntotal)))
    search_seconds = time.perf_counter() - started
    if index.config.metric == "l2":  # squared distances of unit vectors -> cosine similarities
        D = 1.0 - D / 2.0
    verify_seconds = 0.0
    if verify is not None:
        from features.sift import prepare_descriptors
        from index.rerank import spatial_rerank
        from jobs.encode import features_metadata
        from jobs.extract import features_prefix

        db_local, query_local, rerank_config = verify
        local_meta = features_metadata(db_local, "local")
        query_meta = features_metadata(query_local, "local")
        if (local_meta.get("method"), local_meta.get("config")) != (query_meta.get("method"), query_meta.get("config")):
            raise CairnError(f"--verify-queries {query_local} holds {query_meta.get('method')} "
                             f"{query_meta.get('config')} features but --verify-db {db_local} holds "
                             f"{local_meta.get('method')} {local_meta.get('config')}; extract both alike")
        started = time.perf_counter()
        D, I, _ = spatial_rerank(query_ids, D, I, index.image_ids, features_prefix(query_local, "local"),
                                 features_prefix(db_local, "local"), rerank_config,
                                 prepare=lambda d: prepare_descriptors(d, local_meta), progress=len(query_ids) > 500)
        verify_seconds = time.perf_counter() - started
    if classifier:
        if not isinstance(xq, np.ndarray):
            raise CairnError("--classifier needs dense query descriptors (HoG, VLAD), not BoVW")
        pred, conf = classify(classifier, xq, vote_config.min_confidence)
    else:
        pred, conf = vote(D, index.labels_of(I), vote_config)
    fs.makedirs(out)
    write_submission(fs.join(out, "predictions.csv"), query_ids, pred, conf)
    keep = min(neighbours, I.shape[1])
    pq.write_table(neighbours_table(query_ids, D[:, :keep], I[:, :keep], index), fs.join(out, "neighbours.parquet"))
    record = {
        "config": {"index": index_dir, "features": features, "vote": cfg.to_dict(vote_config),
                   "neighbours": neighbours, "classifier": classifier,
                   "verify": None if verify is None else {"db": verify[0], "queries": verify[1],
                                                          "rerank": cfg.to_dict(verify[2])}},
        "counts": {"queries": len(query_ids), "predicted": int((pred >= 0).sum())},
        "search_seconds": round(search_seconds, 4),
        "verify_seconds": round(verify_seconds, 3),
        "queries_per_second": round(len(query_ids) / search_seconds, 1) if search_seconds > 0 else None,
    }
    cfg.save_json(fs.join(out, "recognize.json"), record)
    log.info("recognize: %d queries, %d with a landmark prediction; search %.3f s", len(query_ids),
             record["counts"]["predicted"], search_seconds)
    return record


def build_parser():
    p = common.parser("cairn recognize", __doc__)
    p.add_argument("--index", required=True, help="index folder from `cairn index`")
    p.add_argument("--features", required=True, help="query folder from `cairn extract`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--k", type=int, default=VoteConfig.k, help=f"neighbours that vote (default {VoteConfig.k})")
    p.add_argument("--min-confidence", type=float, default=VoteConfig.min_confidence,
                   help="predict no landmark below this confidence (default 0: always predict)")
    p.add_argument("--neighbours", type=int, default=100, help="database images listed per query (default 100)")
    p.add_argument("--classifier", help="classifier.npz from `cairn train` (hog-linear, sift-vlad-linear): decide "
                   "landmarks with it instead of neighbour votes; neighbours are still listed")
    g = p.add_argument_group("spatial verification (sift-bovw+sv)")
    g.add_argument("--verify-db", help="local SIFT features of the database (`cairn extract --method sift`)")
    g.add_argument("--verify-queries", help="local SIFT features of the queries")
    g.add_argument("--verify-top-k", type=int, default=20, help="neighbours verified per query (default 20)")
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, _ = common.parse(build_parser(), argv)
    if args.neighbours < 1:
        raise CairnError("--neighbours must be >= 1")
    verify = None
    if bool(args.verify_db) != bool(args.verify_queries):
        raise CairnError("give both --verify-db and --verify-queries (local features of both sides), or neither")
    if args.verify_db:
        from features.verify import RerankConfig

        try:
            verify = (args.verify_db, args.verify_queries, RerankConfig(top_k=args.verify_top_k))
        except ValueError as e:
            raise CairnError(f"--verify-top-k: {e}") from e
    return recognize(args.index, args.features, args.out, common.vote_config(args), args.neighbours,
                     classifier=args.classifier, verify=verify)
