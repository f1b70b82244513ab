"""Batch search and recognition as a Beam job, for query sets too large for one process.

Each worker process loads the index once (``apache_beam.utils.shared.Shared``: every DoFn instance and thread
of the process uses the same loaded index) and searches the query-feature record batches it reads from
Parquet. Each batch is searched, voted (index/recognize.py) and written as two outputs:

    OUT/predictions.csv                              Google Landmark Recognition format (one file)
    OUT/neighbours-SSSSS-of-NNNNN.parquet            query_id, rank, id, score, landmark_id (sharded)
    OUT/confidences-SSSSS-of-NNNNN.parquet           query_id, landmark_id, confidence, kept: every answer
                                                     before the no-landmark threshold (sharded)
    OUT/recognize.json                               config, counts, timing, what tuning chose

Every query is accounted for: the job counts the prediction rows it wrote and fails if they differ from the
query rows it read. The local path (pipeline/stages/recognize.py) does the same in one process for small query sets.
"""

from __future__ import annotations

import logging

import apache_beam as beam
import faiss
import pyarrow as pa
from apache_beam.utils import shared

from index.build import available_memory
from index.faiss_index import VectorIndex
from index.recognize import VoteConfig, class_counts, vote
from index.regions import wrap
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.featuresets import features_kind, features_metadata, features_prefix
from pipeline.options import LOCAL_RUNNERS, resolve_workers
from pipeline.parquet_io import SHARD_TEMPLATE, count_rows, find_shards, shard_pattern
from pipeline.resources import limit_threads
from pipeline.schemas import vectors_of
from pipeline.stages import beamjob
from pipeline.stages.lookup import (
    check_same_features,
    confidences_schema,
    confidences_table,
    neighbours_schema,
    neighbours_table,
    nonlandmark_sims,
    search,
)
from pipeline.submission import format_prediction

log = logging.getLogger(__name__)


def use_beam(mode: str, features: str, beam_args: list[str], threshold: int) -> bool:
    """Whether a query set goes through the Beam job: ``mode`` on/off, or auto (a remote runner, or
    ``threshold``+ queries)."""
    if mode in ("on", "off"):
        return mode == "on"
    if _runner(beam_args) not in LOCAL_RUNNERS:
        return True
    kind = features_kind(features)
    if kind == "global" and features_metadata(features, kind).get("regions"):
        return False  # detected regions are gathered per query image in one process (see recognize_beam)
    return kind == "global" and count_rows(features_prefix(features, kind)) >= threshold


def _runner(beam_args: list[str]) -> str:
    """The --runner=NAME among Beam flags (DirectRunner when none)."""
    return next((a.split("=", 1)[1] for a in beam_args if a.startswith("--runner=")), "DirectRunner")


class _Loaded:
    """A weak-referenceable holder of one loaded index (what Shared keeps per process)."""

    def __init__(self, index):
        self.index = index
        self.counts = class_counts(index.labels)


class SearchAndVote(beam.DoFn):
    """pa.Table of query features (id, vector) -> ("predictions", csv line) and ("neighbours", pa.Table)."""

    def __init__(self, index_dir: str, k: int, params: str | None, vote_config: VoteConfig, neighbours: int,
                 handle: shared.Shared, threads: int = 0, predict: bool = True):
        self.predict = predict
        self.index_dir = index_dir
        self.k = k
        self.params = params
        self.vote_config = vote_config
        self.neighbours = neighbours
        self.handle = handle
        self.threads = threads
        self.loaded = None

    def setup(self):
        if self.threads:
            limit_threads(self.threads)
        index_dir = self.index_dir
        self.loaded = self.handle.acquire(lambda: _Loaded(wrap(VectorIndex.load(index_dir))))

    def process(self, table: pa.Table):
        if self.threads:  # OpenMP thread counts are per calling thread: set it on the one that searches
            faiss.omp_set_num_threads(self.threads)
        index = self.loaded.index
        query_ids = table.column("id").to_pylist()
        if not query_ids:
            return
        xq = vectors_of(table)
        D, I = search(index, xq, min(max(self.k, self.neighbours), index.ntotal), self.params)
        if self.predict:
            vc = self.vote_config
            sims = nonlandmark_sims(index, xq, D, I, vc) if vc.nonlandmark_weight > 0 else None
            raw_pred, raw_conf = vote(D, index.labels_of(I), vc, sims, self.loaded.counts, threshold=False)
            table = confidences_table(query_ids, raw_pred, raw_conf, vc.min_confidence, vc.rule)
            kept = table.column("kept").to_numpy()
            for q, p, c, k in zip(query_ids, raw_pred, raw_conf, kept, strict=True):
                yield beam.pvalue.TaggedOutput("predictions", format_prediction(q, int(p) if k else -1,
                                                                                float(c) if k else 0.0))
            yield beam.pvalue.TaggedOutput("confidences", table)
        else:  # neighbour lookup only: one line per query, to account for every query
            for q in query_ids:
                yield beam.pvalue.TaggedOutput("predictions", q)
        keep = min(self.neighbours, I.shape[1])
        yield beam.pvalue.TaggedOutput("neighbours", neighbours_table(query_ids, D[:, :keep], I[:, :keep], index))


def _fit_workers(workers: int, index_dir: str, beam_args: list[str]) -> int:
    """On this machine every DirectRunner worker process holds its own copy of the index: run no more of them
    than the available RAM holds (with room to spare)."""
    if _runner(beam_args) not in LOCAL_RUNNERS or workers <= 1:
        return workers
    size = sum(fs.size(p) for p in (fs.join(index_dir, "index.faiss"), fs.join(index_dir, "nonlandmarks", "index.faiss"))
               if fs.exists(p))
    fit = max(1, int(available_memory() * 0.6 // max(size, 1)))
    if fit < workers:
        log.info("recognize: %d worker processes instead of %d, each holding the %.1f GB index", fit, workers,
                 size / 1e9)
    return min(workers, fit)


def recognize_beam(index_dir: str, features: str, out: str, vote_config: VoteConfig, neighbours: int = 100,
                   search_params: str | None = None, workers: int = 0, beam_args: list[str] | None = None,
                   test_pipeline=None, predict: bool = True, tuning: dict | None = None) -> dict:
    """Search and vote every query of ``features`` as a Beam job (see the module docstring). Without
    ``predict`` (`cairn neighbours`), OUT/queries.txt lists the queries searched instead of predictions.
    ``tuning``: the record of the tuning that chose ``vote_config``, kept in OUT/recognize.json."""
    kind = features_kind(features)
    if kind != "global":
        raise CairnError(f"{features} holds {kind} features; the Beam search job takes dense vectors (FAISS "
                         "indices); use --beam off for BoVW")
    prefix = features_prefix(features, kind)
    queries = count_rows(prefix)
    index_meta = cfg.load_json(fs.join(index_dir, "index.json")) if fs.exists(fs.join(index_dir, "index.json")) else {}
    query_meta = features_metadata(features, kind)
    check_same_features(index_meta.get("features") or {}, query_meta, features)
    if query_meta.get("regions"):
        raise CairnError(f"{features} holds detected regions (several rows per query image), which the Beam search "
                         "job does not gather per image yet; use --beam off (a regional database index is fine "
                         "with whole-image queries)")
    workers = _fit_workers(resolve_workers(workers, queries), index_dir, beam_args or [])
    listing = "predictions.csv" if predict else "queries.txt"
    job = beamjob.start(out, beam_args, workers, test_pipeline=test_pipeline, clear=("neighbours-*", "confidences-*", f"{listing}*"))
    p, out = job.pipeline, job.out
    handle = shared.Shared()
    results = (p | "Read" >> beam.io.ReadFromParquetBatched(shard_pattern(prefix), columns=["id", "vector"])
               | "SearchAndVote" >> beam.ParDo(
                   SearchAndVote(index_dir, vote_config.k, search_params, vote_config, neighbours, handle,
                                 job.threads, predict)).with_outputs("predictions", "neighbours", "confidences"))
    _ = results.predictions | "WritePredictions" >> beam.io.WriteToText(
        fs.join(out, listing), shard_name_template="", header="id,landmarks" if predict else "id")
    _ = results.neighbours | "WriteNeighbours" >> beam.io.WriteToParquetBatched(
        fs.join(out, "neighbours"), neighbours_schema(), num_shards=max(1, len(find_shards(prefix))),
        shard_name_template=SHARD_TEMPLATE, file_name_suffix=".parquet", codec="zstd")
    if predict:  # every answer before the no-landmark threshold, as the local path's confidences.parquet
        _ = results.confidences | "WriteConfidences" >> beam.io.WriteToParquetBatched(
            fs.join(out, "confidences"), confidences_schema(vote_config.min_confidence, vote_config.rule),
            num_shards=max(1, len(find_shards(prefix))), shard_name_template=SHARD_TEMPLATE,
            file_name_suffix=".parquet", codec="zstd")
    seconds = job.run()
    lines = fs.read_text(fs.join(out, listing)).splitlines()[1:]
    predicted = sum(1 for line in lines if line.rsplit(",", 1)[-1].strip()) if predict else 0
    if len(lines) != queries:
        raise RuntimeError(f"recognize: {queries} queries read but {len(lines)} predictions written. This is a bug; "
                           "please report it")
    listed = count_rows(fs.join(out, "neighbours")) if fs.glob(shard_pattern(fs.join(out, "neighbours"))) else 0
    record = {
        "config": {"index": index_dir, "features": features, "vote": cfg.to_dict(vote_config),
                   "neighbours": neighbours, "search_params": search_params, "beam": True},
        "counts": {"queries": queries, "predicted": predicted, "neighbour_rows": listed},
        **({"tuning": tuning} if predict else {}),
        "runner": job.runner, "workers": workers,
        "seconds": round(seconds, 3),
        "queries_per_second": round(queries / seconds, 1) if seconds > 0 else None,
    }
    cfg.save_json(fs.join(out, "recognize.json" if predict else "neighbours.json"), record)
    log.info("recognize (Beam): %d queries, %d with a landmark prediction, in %.1f s", queries, predicted, seconds)
    return record
