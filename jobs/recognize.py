"""cairn recognize: landmark predictions and nearest database images for every query.

Reads the query descriptors written by `cairn extract` (or `cairn encode`), searches the index built by
`cairn index` (FAISS for dense vectors, an inverted file for BoVW), and decides each query's landmark by
neighbour votes (index/recognize.py), or with --classifier by a trained classifier (`cairn train --method
hog-linear`). With --verify-db/--verify-queries (local SIFT features of both sides) the top neighbours are
re-ranked by spatial verification before voting (index/rerank.py).

No landmark: unless --no-tune, the confidence (the plain top-1 rule, the votes, the margin to the best other
landmark, the penalty by similarity to the known non-landmark database images; for --verify-*, the calibrated
inlier count; for --classifier, its calibrated probability) and the threshold are first tuned on validation
queries made from the database: held-out landmark images (several per class when classes are few, up to 2,000),
the same images with their own landmark removed (a landmark the database does not have) and half of the known
non-landmark images (the database features are the folder the index records, or --tune-db). The no-landmark
threshold is then fitted to the query set (--threshold-from queries, the default): the validation's unseen
landmarks are the database's own, while a real one may look much more like the database's; so the share of
queries showing a database landmark is estimated from their confidences beside the validation landmark
queries', and the threshold maximises the GAP and accuracy estimated on the queries. The flags give the
starting point and the values used without tuning. Writes:
    OUT/predictions.csv     Google Landmark Recognition format: id,landmarks ("<landmark_id> <confidence>",
                            empty for no landmark)
    OUT/confidences.parquet query_id, landmark_id, confidence, kept: every query's best answer before the
                            no-landmark threshold
    OUT/neighbours.parquet  query_id, rank, id, score, landmark_id: the top database images of every query
    OUT/recognize.json      the config, counts, timing and the tuning (the validation split, what was tried and
                            chosen, the validation figures beside the top-1 rule's, the threshold curve)
Large query sets (200,000+, --beam on, or a --runner other than DirectRunner) run as a Beam job that loads the
index once per worker process (pipeline/stages/search.py) and writes OUT/neighbours-SSSSS-of-NNNNN.parquet shards.
"""

from __future__ import annotations

from features.verify import RerankConfig
from jobs import common
from pipeline.errors import CairnError
from pipeline.stages.recognize import recognize_queries


def build_parser():
    p = common.parser("cairn recognize", __doc__, beam=True)
    common.add_query_args(p)
    p.add_argument("--neighbours", type=int, default=100, help="database images listed per query (default 100)")
    p.add_argument("--classifier", help="classifier.npz from `cairn train` (hog-linear, sift-vlad-linear): decide "
                   "landmarks with it instead of neighbour votes; neighbours are still listed")
    p.add_argument("--tune-db", help="the database features the index was built from (default: the folder "
                   "recorded in the index), for tuning on held-out database images")
    common.add_vote_args(p)
    g = p.add_argument_group("spatial verification (sift-bovw+sv)")
    g.add_argument("--verify-db", help="local SIFT features of the database (`cairn extract --method sift`)")
    g.add_argument("--verify-queries", help="local SIFT features of the queries")
    g.add_argument("--verify-top-k", type=int, default=20, help="neighbours verified per query (default 20)")
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, beam_args = common.parse_beam_job(build_parser(), argv)
    if args.neighbours < 1:
        raise CairnError("--neighbours must be >= 1")
    vc, tc = common.vote_args(args)
    verify = None
    if bool(args.verify_db) != bool(args.verify_queries):
        raise CairnError("give both --verify-db and --verify-queries (local features of both sides), or neither")
    if args.verify_db:
        try:
            verify = (args.verify_db, args.verify_queries, RerankConfig(top_k=args.verify_top_k))
        except ValueError as e:
            raise CairnError(f"--verify-top-k: {e}") from e
    with common.writing(args.out, "recognize", argv):
        return recognize_queries(args.index, args.features, args.out, vc, args.neighbours,
                                 classifier=args.classifier, verify=verify, tune_config=tc, db_features=args.tune_db,
                                 search_params=args.search_params, beam=args.beam, workers=args.workers,
                                 beam_args=beam_args, test_pipeline=test_pipeline)
