"""The neighbour lookup (`cairn neighbours`): the k most similar database images of every query, with scores;
in this process, or for large query sets as the Beam search job (pipeline/stages/search.py)."""

from __future__ import annotations

import csv
import io
import logging
import time

from index.recognize import VoteConfig
from index.regions import group_queries, merge_rows
from index.sparse_index import load_any
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.parquet_io import write_table
from pipeline.stages.lookup import (
    BEAM_MIN_QUERIES,
    check_same_features,
    neighbours_table,
    read_queries,
    search,
)
from pipeline.stages.search import recognize_beam, use_beam

log = logging.getLogger(__name__)


def neighbours(index_dir: str, features: str, out: str, k: int = 100, search_params: str | None = None,
               write_csv: bool = False) -> dict:
    """Top-k database images of every query, in one process."""
    index = load_any(index_dir)
    query_ids, xq, meta = read_queries(features)
    check_same_features(index.features_metadata, meta, features)
    if k > max(1, index.ntotal):  # a deeper search lists nothing more, in padded [queries, k] arrays
        log.info("neighbours: listing the %d database images per query (k=%d was asked)", index.ntotal, k)
        k = max(1, index.ntotal)
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


def find_neighbours(index_dir: str, features: str, out: str, k: int = 100, search_params: str | None = None,
                    write_csv: bool = False, beam: str = "auto", workers: int = 0, beam_args: list[str] | None = None,
                    test_pipeline=None) -> dict:
    """`cairn neighbours`: :func:`neighbours` in this process, or the Beam search job for large query sets
    (``beam`` auto: 200,000+ queries or a cluster runner; on; off)."""
    if k < 1:
        raise CairnError("--k must be >= 1")
    if use_beam(beam, features, list(beam_args or []), BEAM_MIN_QUERIES):
        if write_csv:
            raise CairnError("--csv is for small query sets; the Beam job writes Parquet shards")
        return recognize_beam(index_dir, features, out, VoteConfig(), k, search_params, workers=workers,
                              beam_args=beam_args, test_pipeline=test_pipeline, predict=False)
    return neighbours(index_dir, features, out, k, search_params, write_csv)
