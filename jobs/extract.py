"""cairn extract: a Beam job from a manifest to descriptors in sharded Parquet, with dead letters.

Outputs: OUT holds only the feature shards, so that pandas, pyarrow.dataset, DuckDB and autofaiss read it as one
data set; what the job keeps about them is in the folder beside it, OUT.cairn (move or copy the two together):
    OUT/features-SSSSS-of-NNNNN.parquet         global descriptors (hog): id, landmark_id, vector
    OUT/local-SSSSS-of-NNNNN.parquet            local features (sift): keypoints, scales, orientations, scores,
                                                descriptors per image (schemas in pipeline/schemas.py)
    OUT.cairn/dead_letters.csv                  id,stage,reason,path for every record that could not be used
    OUT.cairn/manifest-SSSSS-of-NNNNN.parquet   the validated manifest the job read (id, path, landmark_id),
                                                with each image file's size and mtime_ns when the job started
    OUT.cairn/extract.json                      the resolved config, the record counts, the timing and start-up,
                                                and every file above with its bytes, rows and sha256 ("files")

With --detector (cnn), each image is decoded, its landmark boxes detected (batched), and the full image plus
the top boxes are cropped and embedded: features-*.parquet then has one row per region (region 0 = the full
image) with its box and score, under the parent image's id. `cairn index` indexes every region with its
parent id, and `cairn recognize` aggregates over regions (an image's similarity to another is the best of
their regions' similarities).

Every manifest row ends in exactly one of features or dead letters; the job checks this at the end and
fails if it does not hold. A rerun with the same config and manifest reuses the outputs only when every file
is the one OUT.cairn/extract.json records (its sha256 is checked) and every image has the size and modification time it
had (one stat per image; remote images: one listing per folder); otherwise it says why (which files, which
images) and extracts again. A different config replaces them. Commands that read a features folder refuse
shards its record does not list or whose size or Parquet footer differ from it.
"""

from __future__ import annotations

import dataclasses

from features.detect import DetectConfig
from features.registry import EXTRACTORS
from jobs import common
from pipeline import config as cfg
from pipeline.errors import CairnError
from pipeline.run import methods
from pipeline.stages.extract import ROWS_PER_SHARD, extract, resolve_detector


def build_parser():
    p = common.parser("cairn extract", __doc__, beam=True)
    p.add_argument("--manifest", required=True,
                   help="CSV (id,path,landmark_id), Parquet, or a class-per-folder image tree")
    p.add_argument("--out", required=True, help="output folder (local or any Beam filesystem)")
    p.add_argument("--method", default="hog", help=f"descriptor to extract: {', '.join(sorted(EXTRACTORS))}")
    p.add_argument("--param", action="append", default=[], metavar="FIELD=VALUE",
                   help="an extractor parameter, e.g. max_features=500 for sift or size=64 for hog (repeatable); "
                        "fields: " + "; ".join(f"{n}: " + ", ".join(f.name for f in dataclasses.fields(c))
                                              for n, (_, c) in sorted(EXTRACTORS.items())))
    d = DetectConfig()
    g = p.add_argument_group("landmark detection (cnn)")
    g.add_argument("--detector", default="",
                   help="crop landmark regions before embedding: a .keras from `cairn train --method detector`, an "
                        "Object Detection API SavedModel folder (refused if its graph holds any op but pure tensor "
                        "ops: no file, process or network ops), or activation:WEIGHTS (training-free fallback from a "
                        "MobileNet's activations; WEIGHTS a .tflite/.weights.h5 or imagenet). Writes one row per "
                        "region (the full image and the top boxes) with its box; recognition aggregates per image")
    g.add_argument("--detect", action="append", default=[], metavar="FIELD=VALUE",
                   help=f"a detection setting (repeatable): score_threshold={d.score_threshold}, "
                        f"max_boxes={d.max_boxes}, min_side={d.min_side}, margin={d.margin}, "
                        f"full_image={d.full_image}, iou_threshold={d.iou_threshold}, "
                        f"fallback_threshold={d.fallback_threshold}, batch_size={d.batch_size}")
    p.add_argument("--num-shards", type=int, default=0, metavar="N",
                   help=f"exactly N output shards, the features sent through a shuffle to the worker writing "
                        f"each (default 0: written by the workers that extract them, a shard per worker bundle "
                        f"and per {ROWS_PER_SHARD:,} rows, with no shuffle)")
    common.add_beam_job_args(p)
    return p


def extractor_params(method: str, items: list[str]) -> dict:
    """--param FIELD=VALUE items as the extractor's config fields, converted to their types."""
    if method not in EXTRACTORS:
        return {}
    config = cfg.apply_settings(EXTRACTORS[method][1](), items, "--param", "max_features=500")
    return {k: v for k, v in cfg.to_dict(config).items() if k in {i.partition("=")[0].strip() for i in items}}


def detect_config(model: str, items: list[str]) -> DetectConfig | None:
    """The features.detect.DetectConfig of --detector MODEL and --detect FIELD=VALUE items (None without MODEL)."""
    if not model:
        if items:
            raise CairnError("--detect FIELD=VALUE needs --detector MODEL")
        return None
    try:
        config = DetectConfig(model=resolve_detector(model))
    except ValueError as e:
        raise CairnError(f"--detector: {e}") from e
    return cfg.apply_settings(config, items, "--detect", "max_boxes=3")


def run(argv=None, test_pipeline=None) -> dict:
    args, beam_args = common.parse_beam_job(build_parser(), argv)
    if args.method not in EXTRACTORS:
        methods.check([args.method])  # an unknown name is told apart from a method that is no extractor
    params = extractor_params(args.method, args.param)
    decode, detect = common.decode_config(args), detect_config(args.detector, args.detect)
    with common.writing(args.out, "extract", argv):
        return extract(args.manifest, args.out, args.method, params, decode=decode, workers=args.workers,
                       threads=args.threads_per_worker, num_shards=args.num_shards, beam_args=beam_args,
                       force=args.force, test_pipeline=test_pipeline, detect=detect)
