"""Benchmark "recognize_1m": 100,000 queries against a million-vector index, end to end with the cairn jobs.

The vectors are written as feature shards, as `cairn extract` would; then `cairn index` (auto factory: train on a
sample, add shard by shard, merge) and `cairn recognize` (tuning on held-out database images, search, votes,
predictions.csv and neighbours.parquet) run as a user would run them, once in one process and once as the Beam
job (the index loaded once per worker process). GAP is computed on the synthetic truth.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import time

import numpy as np

from bench.common import entry, time_runs

log = logging.getLogger(__name__)

NAME = "recognize_1m"
TITLE = "Recognition of 100,000 queries against a million-vector index, end to end"
DESCRIPTION = (
    "Data: `index.synthetic.VectorSet` as in the index benchmark: 1,000,000 database vectors (10% non-landmark) "
    "written as 8 global-feature Parquet shards, 100,000 queries (70% non-landmark, as in Google Landmark "
    "Recognition, where most queries show none) as 2 shards. Measured: `cairn index --factory auto` and "
    "`cairn recognize` (default: tuning on held-out database images, k=10 votes, 100 neighbours per query "
    "written to neighbours.parquet), in one process (`--beam off`) and as the Beam job (`--beam on`, "
    "DirectRunner, one worker process per core, the index loaded once per process). Reference: raw exact search "
    "(`faiss.IndexFlatIP`) of a 1,000-query sample, as queries/s. GAP over the 100,000 queries with and without "
    "the no-landmark handling (`--no-tune`: plain votes)."
)

SIZES_FULL = dict(nb=1_000_000, nq=100_000)
SIZES_QUICK = dict(nb=100_000, nq=10_000)


def _write(folder: str, x: np.ndarray, y: np.ndarray, shards: int, prefix: str) -> dict:
    """Write vectors as `cairn extract` would (global-feature shards); returns {image id: landmark id or None}."""
    from pipeline.parquet_io import write_table_shards
    from pipeline.schemas import global_features_schema, global_features_table

    ids = [f"{prefix}{i:07d}" for i in range(len(x))]
    labels = [None if v < 0 else int(v) for v in y]
    meta = {"method": "synthetic-vectors", "config": {"seed": 0}}
    table = global_features_table(ids, labels, x, global_features_schema(x.shape[1], meta))
    write_table_shards(table, os.path.join(folder, "features"), shards)
    return dict(zip(ids, labels, strict=True))


def _gap(path: str, truth: dict) -> float:
    from reports import metrics as M

    with open(path, newline="", encoding="utf-8") as f:
        rows = {r["id"]: r["landmarks"] for r in csv.DictReader(f)}
    ids = list(truth)
    pred = [int(rows[q].split()[0]) if rows.get(q) else None for q in ids]
    conf = [float(rows[q].split()[1]) if rows.get(q) else 0.0 for q in ids]
    return M.gap(pred, conf, [truth[q] for q in ids], ids)


def run(workdir: str, quick: bool) -> list[dict]:
    import faiss

    from bench.bench_index import DIM
    from index.synthetic import VectorSet, VectorSetConfig
    from jobs import index as index_job
    from jobs import recognize as recognize_job

    sizes = SIZES_QUICK if quick else SIZES_FULL
    nb, nq = sizes["nb"], sizes["nq"]
    threads = os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    vs = VectorSet(VectorSetConfig(dim=DIM))
    xb, yb = vs.draw(nb, seed=1, distractors=0.1, progress=True, desc="database vectors")
    xq, yq = vs.draw(nq, seed=3, distractors=0.7)
    db, queries = os.path.join(workdir, "db"), os.path.join(workdir, "queries")
    os.makedirs(db)
    os.makedirs(queries)
    _write(db, xb, yb, 8, "db")
    truth = _write(queries, xq, yq, 2, "q")

    exact_qps = _exact_qps(xb, xq[:1000])
    del xb, xq

    group = f"{nb:,} database vectors x {DIM}, {nq:,} queries, {threads} threads"
    ix = os.path.join(workdir, "index")
    started = time.perf_counter()
    built = index_job.run(["--features", db, "--out", ix])
    index_seconds = time.perf_counter() - started

    timings, gaps, records = {}, {}, {}
    for name, extra in (("local", ["--beam", "off"]), ("beam", ["--beam", "on", "--runner=DirectRunner"]),
                        ("untuned", ["--beam", "off", "--no-tune"])):
        out = os.path.join(workdir, f"recognize-{name}")
        started = time.perf_counter()
        records[name] = recognize_job.run(["--index", ix, "--features", queries, "--out", out, *extra])
        timings[name] = time.perf_counter() - started
        gaps[name] = _gap(os.path.join(out, "predictions.csv"), truth)
        log.info("recognize_1m: %s in %.1f s, GAP %.4f", name, timings[name], gaps[name])

    ref = "raw exact search (IndexFlatIP), 1,000-query sample"
    local = records["local"]
    tuning = local.get("tuning") or {}
    return [
        entry(group, ref, exact_qps, "queries/s"),
        entry(group, f"cairn index (auto: {built['factory']})", index_seconds, "s", better="lower",
              note=f"{built['index_bytes'] / nb:.0f} bytes/vector; {built['nonlandmarks']:,} non-landmark vectors "
                   "also indexed on their own", **{k: v for k, v in built.items() if k != "factory"}),
        entry(group, "cairn recognize, one process: end to end", timings["local"], "s", better="lower",
              note=f"tuning {tuning.get('seconds', 0):.1f} s, search {local['search_seconds']:.1f} s, votes "
                   f"{local['decide_seconds']:.1f} s, the rest reading queries and writing "
                   f"{nq * 100:,} neighbour rows", **{k: v for k, v in local.items() if k != "config"}),
        entry(group, "cairn recognize, one process: search", nq / local["search_seconds"], "queries/s", ref,
              note=f"search parameters {built['search_params']}"),
        entry(group, "cairn recognize --beam on: end to end", timings["beam"], "s",
              "cairn recognize, one process: end to end", better="lower",
              note=f"{records['beam']['workers']} worker processes, each loading the index once (tuning included)"),
        entry(group, "GAP with the no-landmark handling (tuned)", round(gaps["local"], 4), "GAP",
              "GAP of plain votes (--no-tune)", note=str({k: v for k, v in tuning.get("tuned", {}).items()})),
        entry(group, "GAP of plain votes (--no-tune)", round(gaps["untuned"], 4), "GAP"),
        _agreement(group, workdir),
    ]


def _exact_qps(xb: np.ndarray, sample: np.ndarray) -> float:
    import faiss

    exact = faiss.IndexFlatIP(xb.shape[1])
    exact.add(xb)
    exact.search(sample[:10], 10)
    return len(sample) / min(time_runs(lambda: exact.search(sample, 10), 2))


def _agreement(group: str, workdir: str) -> dict:
    """Share of queries whose Beam-job landmark equals the one-process one, and the largest confidence gap
    (fast-scan search may round differently for other batch sizes)."""
    def rows(name):
        with open(os.path.join(workdir, f"recognize-{name}", "predictions.csv"), newline="", encoding="utf-8") as f:
            return {r["id"]: r["landmarks"].split() for r in csv.DictReader(f)}

    local, beam = rows("local"), rows("beam")
    same = np.mean([(local[q][:1] == beam.get(q, ["?"])[:1]) for q in local])
    gaps = [abs(float(local[q][1]) - float(beam[q][1])) for q in local if local[q] and beam.get(q)
            and local[q][0] == beam[q][0]]
    return entry(group, "Beam job: queries with the same landmark as the one-process run", float(same), "share",
                 note=f"largest confidence difference {max(gaps, default=0):.2g}; {len(beam):,} of {len(local):,} "
                      "queries listed")
