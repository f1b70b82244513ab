"""cairn recognize: landmark predictions and nearest database images for every query.

Reads the query descriptors written by `cairn extract`, searches the index built by `cairn index`, and writes:
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
from index.recognize import VoteConfig, vote
from jobs import common
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.parquet_io import read_shards
from pipeline.schemas import vectors_of
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


def recognize(index_dir: str, features: str, out: str, vote_config: VoteConfig = VoteConfig(),
              neighbours: int = 100) -> dict:
    index = VectorIndex.load(index_dir)
    table, meta = read_shards(fs.join(features, "features"))
    db_meta = index.features_metadata
    if db_meta and meta and (db_meta.get("method"), db_meta.get("config")) != (meta.get("method"), meta.get("config")):
        raise CairnError(
            f"queries in {features} were extracted with {meta.get('method')} {meta.get('config')} but the index "
            f"holds {db_meta.get('method')} {db_meta.get('config')}; extract both with the same method and config"
        )
    xq = vectors_of(table)
    query_ids = table.column("id").to_pylist()
    k = max(vote_config.k, neighbours)
    started = time.perf_counter()
    D, I = index.search(xq, min(k, max(1, index.ntotal)))
    search_seconds = time.perf_counter() - started
    if index.config.metric == "l2":  # squared distances of unit vectors -> cosine similarities
        D = 1.0 - D / 2.0
    pred, conf = vote(D, index.labels_of(I), vote_config)
    fs.makedirs(out)
    write_submission(fs.join(out, "predictions.csv"), query_ids, pred, conf)
    keep = min(neighbours, I.shape[1])
    pq.write_table(neighbours_table(query_ids, D[:, :keep], I[:, :keep], index), fs.join(out, "neighbours.parquet"))
    record = {
        "config": {"index": index_dir, "features": features, "vote": cfg.to_dict(vote_config),
                   "neighbours": neighbours},
        "counts": {"queries": len(query_ids), "predicted": int((pred >= 0).sum())},
        "search_seconds": round(search_seconds, 4),
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
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, _ = common.parse(build_parser(), argv)
    if args.neighbours < 1:
        raise CairnError("--neighbours must be >= 1")
    return recognize(args.index, args.features, args.out, common.vote_config(args), args.neighbours)
