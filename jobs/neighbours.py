"""cairn neighbours: the k most similar database images of every query, with their scores.

Reads the query descriptors written by `cairn extract` (or `cairn encode`) and searches the index built by
`cairn index`. Writes:
    OUT/neighbours.parquet   query_id, rank (1 = most similar), id, score (cosine similarity for FAISS indices,
                             tf-idf cosine for BoVW), landmark_id (empty for non-landmark database images)
    OUT/neighbours.csv       the same rows as CSV, to open in a spreadsheet (with --csv)
    OUT/neighbours.json      the config, counts and timing
Large query sets (200,000+, or --beam on, or a --runner other than DirectRunner) run as a Beam job that loads
the index once per worker and writes OUT/neighbours-SSSSS-of-NNNNN.parquet shards instead.
"""

from __future__ import annotations

import csv
import io
import logging
import time

from index.regions import group_queries, merge_rows
from index.sparse_index import load_any
from jobs import common
from jobs.recognize import (
    BEAM_MIN_QUERIES,
    add_query_args,
    check_same_features,
    neighbours_table,
    read_queries,
    search,
)
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.parquet_io import write_table

log = logging.getLogger(__name__)


def neighbours(index_dir: str, features: str, out: str, k: int = 100, search_params: str | None = None,
               write_csv: bool = False) -> dict:
    """Top-k database images of every query, in one process."""
    index = load_any(index_dir)
    query_ids, xq, meta = read_queries(features)
    check_same_features(index.features_metadata, meta, features)
    started = time.perf_counter()
    D, I = search(index, xq, k, search_params, progress=len(query_ids) > 100_000)
    images, owner = group_queries(query_ids)
    if len(images) != len(query_ids):  # detected regions: one list per query image, each at its best region
        D, I = merge_rows(owner, D, I, k)
        query_ids = images
    seconds = time.perf_counter() - started
    table = neighbours_table(query_ids, D, I, index)
    fs.makedirs(out)
    write_table(table, fs.join(out, "neighbours.parquet"))
    if write_csv:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(table.column_names)
        w.writerows(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))
        fs.write_text(fs.join(out, "neighbours.csv"), buf.getvalue())
    record = {"config": {"index": index_dir, "features": features, "k": k, "search_params": search_params},
              "counts": {"queries": len(query_ids), "neighbour_rows": table.num_rows},
              "search_seconds": round(seconds, 4),
              "queries_per_second": round(len(query_ids) / seconds, 1) if seconds > 0 else None}
    cfg.save_json(fs.join(out, "neighbours.json"), record)
    log.info("neighbours: %d queries, %d rows in %.3f s", len(query_ids), table.num_rows, seconds)
    return record


def build_parser():
    p = common.parser("cairn neighbours", __doc__, beam=True)
    add_query_args(p)
    p.add_argument("--k", type=int, default=100, help="database images per query (default 100)")
    p.add_argument("--csv", action="store_true", help="also write OUT/neighbours.csv")
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, beam_args = common.parse_beam_job(build_parser(), argv)
    if args.k < 1:
        raise CairnError("--k must be >= 1")
    from index.recognize import VoteConfig
    from pipeline.search import recognize_beam, use_beam

    if use_beam(args.beam, args.features, beam_args, BEAM_MIN_QUERIES):
        if args.csv:
            raise CairnError("--csv is for small query sets; the Beam job writes Parquet shards")
        record = recognize_beam(args.index, args.features, args.out, VoteConfig(), args.k, args.search_params,
                                workers=args.workers, beam_args=beam_args, test_pipeline=test_pipeline,
                                predict=False)
    else:
        record = neighbours(args.index, args.features, args.out, args.k, args.search_params, args.csv)
    print(f"neighbours: {record['counts']['queries']:,} queries searched; results in {args.out}")
    return record
