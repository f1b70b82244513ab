"""cairn train: learn what a method needs from the database features: vocabularies and encoders, PCA, classifiers.

    --method sift-bovw   FEATURES = local SIFT features (`cairn extract --method sift`). A Beam job samples
                         descriptors (a seeded share of every image's) and a subset of images; FAISS k-means
                         learns the vocabulary on the sample; document frequencies (idf) are counted on the
                         image subset. Writes OUT/encoder.npz (kind "bovw").
    --method sift-vlad   the same sampling; a small vocabulary, then PCA-whitening learned on the raw VLADs of
                         the image subset. Writes OUT/encoder.npz (kind "vlad").
    --method hog         FEATURES = HoG features; PCA-whitening when hog.pca_dim > 0 (OUT/encoder.npz, kind
                         "pca_whitening"); with pca_dim 0 there is nothing to learn.
    --method cnn         MANIFEST = the database manifest (--manifest): fine-tunes a Keras backbone with GeM,
                         a projection and ArcFace (models/finetune.py); writes OUT/model.keras and
                         OUT/untrained.keras (embedding models with their metadata), checkpoints/ (resume),
                         logs/ (TensorBoard) and history-stage*.csv.
    --method delf        MANIFEST = the database manifest: trains DELF in two stages (descriptors, then attention
                         with the backbone frozen; models/delf.py) and learns the 40-d PCA of its descriptors;
                         writes OUT/model.keras, OUT/pca.npz and OUT/pool.npz (for delf+sv).
    --method detector    MANIFEST = the database manifest and --boxes (a CSV by id or image_path, or PASCAL VOC
                         XML): trains the single-stage landmark detector (models/detector.py) with box-aware
                         augmentation, on the images with boxes and the non-landmark images as negatives;
                         writes OUT/model.keras (for `cairn extract --detector`), history.csv, checkpoints/.
    --method hog-linear, sift-vlad-linear
                         FEATURES = the method's global descriptors (HoG, or VLAD from `cairn encode`); a
                         calibrated linear softmax (or nearest-class-mean) classifier, OUT/classifier.npz.
Artefacts are Cairn's .npz format (features/artifacts.py: numpy arrays + a JSON header, no pickles); OUT/
train.json holds the config, what it was trained on and the timings. A rerun with the same config and the
same features reuses them.
"""

from __future__ import annotations

from jobs import common
from pipeline.errors import CairnError
from pipeline.run import methods, trainers
from pipeline.run.settings import parse_overrides


def build_parser():
    p = common.parser("cairn train", __doc__ + "\nMethods:\n" + methods.describe(), beam=True)
    p.add_argument("--method", required=True, help=f"method to train: {', '.join(methods.trainable())}")
    p.add_argument("--features", help="the database features folder (`cairn extract`/`encode`)")
    p.add_argument("--manifest", help="cnn, delf, detector: the database manifest (training reads the images)")
    p.add_argument("--boxes", default="", help="detector: landmark boxes of the manifest's images: a CSV "
                   "(id,xmin,ymin,xmax,ymax[,width,height], or image_path instead of id) or PASCAL VOC XML (a file "
                   "or a folder of them)")
    p.add_argument("--out", required=True, help="model folder to write")
    common.add_set_arg(p)
    common.add_beam_job_args(p)
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, beam_args = common.parse_beam_job(build_parser(), argv)
    on_images = methods.trains_on(args.method) == "images"
    source = args.manifest if on_images else args.features
    if not source:
        raise CairnError(f"--method {args.method} needs " + ("--manifest (the database images)" if on_images
                                                             else "--features (a features folder)"))
    config, decode = parse_overrides(args.set), common.decode_config(args)
    with common.writing(args.out, "train", argv):
        record = trainers.train(args.method, source, args.out, config, workers=max(1, args.workers),
                                beam_args=beam_args, force=args.force, decode=decode, boxes=args.boxes,
                                test_pipeline=(lambda: test_pipeline) if test_pipeline else None)
    if record.get("trained") is False:
        print(f"{args.method}: nothing to train with these parameters (hog.pca_dim=0: raw HoG + kNN).")
    else:
        print(f"{args.method}: trained in {record['train_seconds']:.1f} s -> {args.out}")
    return record
