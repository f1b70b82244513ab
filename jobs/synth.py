"""cairn synth OUT: generate the synthetic landmark data set (deterministic by --seed).

Writes OUT/train.csv and OUT/queries.csv (id,path,landmark_id; empty landmark_id = no landmark),
OUT/boxes.csv (id,xmin,ymin,xmax,ymax,width,height of the landmark in every image that shows one),
OUT/images/... and OUT/synth.json. The same seed and flags give byte-identical files.
Sizes: the defaults make {default_images:,} images for the demo; --classes 1000 --views 20 --tail 0 makes
{large_images:,}.

With --bad-inputs it also writes OUT/train-bad.csv and OUT/queries-bad.csv: the same rows plus one record of
each of {kinds} kinds of broken or odd input per split (truncated, empty and non-image files, CMYK/YCCK JPEGs,
16-bit and palette PNGs, EXIF orientations 1-8, a decompression bomb, a missing file, odd paths, duplicate
ids, bad landmark ids, a BOM, CRLF and quoted commas), OUT/bad_inputs.csv saying what each one is and what a
job should make of it (used, or a dead letter at which stage), and OUT/bad/ with the files
(pipeline/badinput.py). Run `cairn compare` on those manifests to see how Cairn handles them.
"""

from __future__ import annotations

import dataclasses

from jobs import common
from pipeline.badinput import KINDS
from pipeline.errors import CairnError
from pipeline.stages.synth import synth
from pipeline.synthetic import SynthConfig, plan

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


def description() -> str:
    """The module docstring with the sizes it quotes computed from the generator, so that they cannot drift."""
    return __doc__.format(default_images=len(plan(SynthConfig())),
                          large_images=len(plan(SynthConfig(classes=1000, views=20, tail=0.0))), kinds=len(KINDS))


def build_parser():
    p = common.parser("cairn synth", description())
    p.add_argument("out", help="output folder")
    for f in dataclasses.fields(SynthConfig):
        number = common.finite_float if isinstance(f.default, float) else int
        p.add_argument(f"--{f.name.replace('_', '-')}", type=number, default=f.default,
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
    try:
        config = SynthConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)})
    except ValueError as e:  # name the flag, not the field
        raise CairnError(f"--{str(e).replace('_', '-')}") from None
    with common.writing(args.out, "synth", argv, flag="OUT folder"):
        return synth(args.out, config, args.workers, args.force, progress=not args.no_progress,
                     bad_inputs=args.bad_inputs)
