"""cairn index: build a FAISS index over database descriptors written by `cairn extract` or `cairn encode`.

Reads FEATURES/features-*.parquet (dense vectors) one shard at a time: trains the index on a seeded sample,
adds every vector with a global int64 id shard by shard, merges the shards (with the inverted lists on disk
when an IVF index exceeds the memory budget), and writes OUT/index.faiss, OUT/trained.faiss (the trained empty
index), OUT/ids.parquet (faiss_id -> image id, landmark_id), OUT/index.json (factory as built, metric, dim,
count, search parameters, build times, the features' metadata, and the sha256 and size of every index file,
checked whenever the index is loaded: a damaged file is an error, never an answer) and OUT/nonlandmarks/ (an
index of the database images without a landmark, for recognition's no-landmark penalty). Sparse bag-of-visual-words features
(FEATURES/sparse-*.parquet) get an inverted file instead (index/sparse_index.py).

Factories (--factory): Flat (exact), IVF4096,Flat, IVF4096,PQ64, OPQ64_256,IVF4096,PQ64, HNSW32,Flat,
IVF4096,PQ128x4fs,Refine(PQ128) ... or auto (default): Flat up to 50,000 vectors, then an IVF with compressed
codes and a re-ranking stage sized to the memory budget; the README's "Indices" section has the measured
trade-offs. Sizes FAISS would accept and then abort on (HNSW0, HNSW1, PQ8x0, NSG2, ...) are refused first.
"""

from __future__ import annotations

import sys

from jobs import common
from pipeline.stages.index import build_index


def build_parser():
    p = common.parser("cairn index", __doc__, beam=True)
    p.add_argument("--features", required=True, help="folder written by `cairn extract` for the database images")
    p.add_argument("--out", required=True, help="index folder to write (local, or gs:// etc.: built in a local "
                   "temporary folder, then copied)")
    p.add_argument("--beam", default="auto", choices=["auto", "on", "off"],
                   help="add the vectors on Beam workers, one feature shard each, and merge here (on); all here "
                        "(off); auto (default): on workers with a cluster runner (--runner=DataflowRunner ...)")
    common.add_index_args(p)
    common.add_worker_args(p)
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, beam_args = common.parse_beam_job(build_parser(), argv)
    config = common.index_config(args)
    with common.writing(args.out, "index", argv):
        record = build_index(args.features, args.out, config, progress=sys.stderr.isatty(), beam=args.beam,
                             beam_args=beam_args, workers=args.workers, test_pipeline=test_pipeline,
                             threads=args.threads_per_worker)
    print(f"index: {record['count']:,} vectors of dim {record['dim']} as {record['factory']} "
          f"({record['index_bytes'] / 1e6:.1f} MB, {record['seconds']:.1f} s) in {args.out}")
    return record
