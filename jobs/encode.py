"""cairn encode: a Beam job that turns extracted features into a method's vectors with a trained encoder.

    local features (sift)  + bovw encoder  -> OUT/sparse-SSSSS-of-NNNNN.parquet    tf-idf bag of visual words
    local features (sift)  + vlad encoder  -> OUT/features-SSSSS-of-NNNNN.parquet  VLAD (+ PCA-whitening)
    global features (hog)  + pca encoder   -> OUT/features-SSSSS-of-NNNNN.parquet  PCA-whitened descriptors
Encoders are written by `cairn train`. OUT.cairn/encode.json holds the config, the counts, the timing and the shards
it wrote (bytes, rows, sha256); every input row gives exactly one output row (an image without keypoints gives
an empty or zero vector), which the job checks. A rerun with the same inputs and encoder reuses the outputs
once every shard's checksum matches its record; a shard missing, added, truncated or changed is encoded again.

"""

from __future__ import annotations

from jobs import common
from pipeline.stages.encode import encode


def build_parser():
    p = common.parser("cairn encode", __doc__, beam=True)
    p.add_argument("--features", required=True, help="folder written by `cairn extract` (local or global features)")
    p.add_argument("--encoder", required=True, help="encoder.npz written by `cairn train`")
    p.add_argument("--out", required=True, help="output folder")
    common.add_beam_job_args(p, decode=False)
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, beam_args = common.parse_beam_job(build_parser(), argv)
    with common.writing(args.out, "encode", argv):
        return encode(args.features, args.encoder, args.out, workers=args.workers, threads=args.threads_per_worker,
                      beam_args=beam_args, force=args.force, test_pipeline=test_pipeline)
