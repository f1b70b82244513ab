"""cairn train: learn what a method needs (vocabularies, PCA, classifiers, fine-tuned networks).

The methods built so far learn nothing: hog is a fixed descriptor and recognition is kNN over the index.
Trainable methods arrive with their issues (see `cairn compare --help`).
"""

from __future__ import annotations

from jobs import common, methods


def build_parser():
    p = common.parser("cairn train", __doc__ + "\nMethods:\n" + methods.describe())
    p.add_argument("--method", required=True, help="method to train")
    p.add_argument("--features", help="features folder from `cairn extract` (database images)")
    p.add_argument("--out", help="model folder to write")
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, _ = common.parse(build_parser(), argv)
    methods.check([args.method])
    print(f"{args.method}: nothing to train; it uses a fixed descriptor and kNN recognition over `cairn index`.")
    return {"method": args.method, "trained": False}
