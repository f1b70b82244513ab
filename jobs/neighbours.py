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

from jobs import common
from pipeline.stages.neighbours import find_neighbours


def build_parser():
    p = common.parser("cairn neighbours", __doc__, beam=True)
    common.add_query_args(p)
    p.add_argument("--k", type=int, default=100, help="database images per query (default 100)")
    p.add_argument("--csv", action="store_true", help="also write OUT/neighbours.csv")
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, beam_args = common.parse_beam_job(build_parser(), argv)
    with common.writing(args.out, "neighbours", argv):
        record = find_neighbours(args.index, args.features, args.out, args.k, args.search_params, args.csv,
                                 beam=args.beam, workers=args.workers, beam_args=beam_args,
                                 test_pipeline=test_pipeline)
    print(f"neighbours: {record['counts']['queries']:,} queries searched; results in {args.out}")
    return record
