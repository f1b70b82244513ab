"""cairn synth OUT: generate the synthetic landmark data set (deterministic by --seed).

Writes OUT/train.csv and OUT/queries.csv (id,path,landmark_id; empty landmark_id = no landmark),
OUT/boxes.csv (id,xmin,ymin,xmax,ymax,width,height of the landmark in every image that shows one),
OUT/images/... and OUT/synth.json. The same seed and flags give byte-identical files.
Sizes: the defaults make 116 images for the demo; --classes 1000 --views 20 --tail 0 makes 23,024.

With --bad-inputs it also writes OUT/train-bad.csv and OUT/queries-bad.csv: the same rows plus one record of
each of 36 kinds of broken or odd input per split (truncated, empty and non-image files, CMYK/YCCK JPEGs,
16-bit and palette PNGs, EXIF orientations 1-8, a decompression bomb, a missing file, odd paths, duplicate
ids, bad landmark ids, a BOM, CRLF and quoted commas), OUT/bad_inputs.csv saying what each one is and what a
job should make of it (used, or a dead letter at which stage), and OUT/bad/ with the files
(pipeline/badinput.py). Run `cairn compare` on those manifests to see how Cairn handles them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

from jobs import common
from pipeline import config as cfg
from pipeline.errors import CairnError
from pipeline.synthetic import SynthConfig, generate

log = logging.getLogger(__name__)
_HELP = {
    "seed": "random seed; everything is derived from it",
    "classes": "landmark classes",
    "views": "database images of the most frequent class",
    "tail": "long-tail exponent: class of rank r gets views * r**-tail images (0 = uniform)",
    "min_views": "fewest database images of any class",
    "queries_per_class": "landmark queries per class",
    "non_landmark_queries": "queries with no database landmark",
    "non_landmark_train": "database images known to show no landmark (empty landmark_id)",
    "width": "image width in pixels",
    "height": "image height in pixels",
    "jpeg_quality_min": "lowest JPEG quality",
    "jpeg_quality_max": "highest JPEG quality",
}


def check(config: SynthConfig) -> None:
    """Raise CairnError for sizes the generator cannot make."""
    if min(config.classes, config.views, config.min_views) < 1:
        raise CairnError("--classes, --views and --min-views must be >= 1")
    if min(config.queries_per_class, config.non_landmark_queries, config.non_landmark_train) < 0 or config.tail < 0:
        raise CairnError("--queries-per-class, --non-landmark-queries, --non-landmark-train and --tail must be >= 0")
    if not (32 <= config.width <= 8192 and 32 <= config.height <= 8192):
        raise CairnError("--width and --height must be between 32 and 8192 pixels")
    if not 1 <= config.jpeg_quality_min <= config.jpeg_quality_max <= 100:
        raise CairnError("JPEG qualities must satisfy 1 <= --jpeg-quality-min <= --jpeg-quality-max <= 100")


def synth(out: str, config: SynthConfig, workers: int = 0, force: bool = False, progress: bool = True,
          bad_inputs: bool = False) -> dict:
    """Generate (or reuse) the set in ``out``; ``bad_inputs`` adds the bad-input manifests (pipeline/badinput.py)."""
    summary = _synth(out, config, workers, force, progress)
    if bad_inputs:
        from pipeline.badinput import KINDS, add_bad_inputs

        summary = {**summary, "bad_inputs": add_bad_inputs(out, seed=config.seed)}
        log.info("synth: %d kinds of bad input per split in %s and %s (what each is: %s)", len(KINDS),
                 summary["bad_inputs"]["train"], summary["bad_inputs"]["queries"], summary["bad_inputs"]["records"])
    return summary


def _synth(out: str, config: SynthConfig, workers: int, force: bool, progress: bool) -> dict:
    check(config)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CairnError(f"{out} is a file; give a folder for the synthetic data set")
    record = os.path.join(out, "synth.json")
    if not force and cfg.check_reusable(record, cfg.to_dict(config)):
        log.info("synth: %s already holds this data set (same config); --force regenerates", out)
        return cfg.load_json(record)
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.exists(record) and not force:
            raise CairnError(f"{out} is not empty and holds no synthetic data set; pick an empty folder or --force")
        shutil.rmtree(os.path.join(out, "images"), ignore_errors=True)
    summary = generate(out, config, workers=workers, progress=progress)
    c = summary["counts"]
    log.info("synth: %d train images over %d classes, %d queries (%d with a landmark) in %s", c["train"],
             config.classes, c["queries"], c["queries_with_landmark"], out)
    return summary


def build_parser():
    p = common.parser("cairn synth", __doc__)
    p.add_argument("out", help="output folder")
    for f in dataclasses.fields(SynthConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help=f"{_HELP[f.name]} (default {f.default})")
    p.add_argument("--workers", type=int, default=0, help="processes drawing images (default: one per core)")
    p.add_argument("--force", action="store_true", help="regenerate even if OUT holds the same data set")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--bad-inputs", action="store_true",
                   help="also write train-bad.csv and queries-bad.csv with every kind of broken or odd input mixed "
                        "in, and bad_inputs.csv saying what each is")
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, _ = common.parse(build_parser(), argv)
    config = SynthConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)})
    return synth(args.out, config, args.workers, args.force, progress=not args.no_progress,
                 bad_inputs=args.bad_inputs)
