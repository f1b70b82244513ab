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

import logging
import time

import numpy as np

from jobs import classic, common, methods
from jobs.encode import (
    features_fingerprint,
    features_kind,
    features_metadata,
    iter_subset,
    read_sample,
    sample_descriptors,
)
from jobs.extract import features_prefix
from pipeline import config as cfg
from pipeline import fs, stages
from pipeline.errors import CairnError
from pipeline.images import DecodeConfig
from pipeline.parquet_io import read_shards
from pipeline.schemas import labels_of, vectors_of

log = logging.getLogger(__name__)


def whitening_dim(requested: int, samples: int, what: str, min_per_dim: int = 0) -> int:
    """The PCA dimension to learn from ``samples`` images (0 = no PCA).

    A D-dimensional covariance is estimated well from about 10 D samples; whitened from fewer, the rare
    directions are noise blown up to unit variance, and retrieval gets worse than with the raw descriptor
    (measured on the 484 Porto photos: VLAD mAP@100 0.37 raw, 0.09 whitened to 242-d, 0.17 to 64-d). So with
    fewer than ``min_per_dim`` images per dimension there is no PCA. In any case PCA-whitening learned on N
    samples can whiten at most N - 1 directions, and whitening nearly all of them maps the training set onto a
    regular simplex (every pair equally far apart), so at most N / 2 dimensions are kept.

    Inside `common.sized_as` (a `cairn plan` sample) the images-per-dimension rule is applied to the whole run's
    images, so that the sample learns its PCA (on what it has) when the whole run would.
    """
    if min_per_dim and samples * common.size_factor() < min_per_dim * requested:
        log.warning("train %s: %d images are too few to learn PCA-whitening to %d dimensions (%d per dimension "
                    "needed: pca_min_images); keeping the raw descriptor. Set pca_min_images=0 to whiten anyway",
                    what, samples, requested, min_per_dim)
        return 0
    cap = max(1, samples // 2)
    if requested > cap:
        log.warning("train %s: PCA-whitening to %d dimensions needs more than the %d images it learns from; "
                    "using %d (at most half the images)", what, requested, samples, cap)
        return cap
    return requested


TRAINABLE = ("sift-bovw", "sift-vlad", "hog", "hog-linear", "sift-vlad-linear", "cnn", "delf", "detector")


def _requested(method: str, config, features: str) -> dict:
    """What a training run is keyed by: the method, its parameters, and the features it trains on."""
    return {"method": method, "method_config": cfg.to_dict(config), "features": fs.absolute(features),
            "features_fingerprint": features_fingerprint(features)}


def _reusable(out: str, requested: dict, artefact: str, force: bool) -> dict | None:
    """The stored record when OUT holds the artefact trained with ``requested`` (checked by its checksum);
    otherwise None, after removing the record so that a run killed before writing its own cannot leave an
    old record beside a new artefact."""
    path, target = fs.join(out, "train.json"), fs.join(out, artefact)
    if not force and cfg.check_reusable(path, requested) and fs.exists(target):
        record = cfg.load_json(path)
        if record.get("artefact_sha256") == cfg.file_fingerprint(target):
            log.info("train: reusing %s (same config and features; --force retrains)", out)
            stages.mark_reused()
            return record
    if fs.exists(path):
        fs.delete([path])
    return None


def _trained_on(source: dict) -> dict:
    """What an artefact was trained on: its features' method and config (saved in the artefact and train.json)."""
    return {"method": source.get("method"), "config": source.get("config")}


def _save_record(out: str, artefact: str, record: dict) -> None:
    record["artefact_sha256"] = cfg.file_fingerprint(fs.join(out, artefact))
    cfg.save_json(fs.join(out, "train.json"), record)


def _check_source(features: str, kind: str, method: str, expected: dict | None = None) -> dict:
    found = features_kind(features)
    if found != kind:
        raise CairnError(f"{method} trains on {kind} features, but {features} holds {found} ones")
    meta = features_metadata(features, kind)
    if expected is not None and meta.get("config") != expected:
        raise CairnError(f"{features} was extracted with {meta.get('method')} {meta.get('config')}, but {method} is "
                         f"configured for {expected}; extract with the same parameters (or change --set)")
    return meta


def train_encoder(method: str, features: str, out: str, config, workers: int = 1,
                  beam_args: list[str] | None = None, force: bool = False) -> dict:
    """Vocabulary + BoVW (config: classic.BovwConfig) or VLAD (classic.VladConfig) encoder from SIFT features."""
    from features.sift import prepare_descriptors
    from features.vocabulary import BoVWEncoder, VLADEncoder, Vocabulary

    source = _check_source(features, "local", method, cfg.to_dict(config.sift))
    requested = _requested(method, config, features)
    if (reused := _reusable(out, requested, "encoder.npz", force)) is not None:
        return reused
    fs.makedirs(out)
    voc = config.vocabulary
    subset = config.idf_sample if method == "sift-bovw" else (config.pca_sample if config.pca_dim else 0)
    started = time.perf_counter()
    counts = sample_descriptors(features, fs.join(out, "sample"), voc.sample_size, subset, voc.seed, workers,
                                beam_args)
    stored = read_sample(fs.join(out, "sample"))
    subset_images = counts["subset_images"]
    sample_seconds = time.perf_counter() - started
    if len(stored) < voc.k:
        raise CairnError(f"{method}: the database gave only {len(stored):,} descriptors, fewer than the "
                         f"{voc.k:,} visual words asked for; lower it (--set "
                         f"{'bovw' if method == 'sift-bovw' else 'vlad'}.vocabulary.k=...) or use more images")
    desc = prepare_descriptors(stored, source)
    started = time.perf_counter()
    vocabulary = Vocabulary(k=voc.k, niter=voc.niter, sample_size=voc.sample_size, seed=voc.seed,
                            use_gpu=voc.use_gpu).fit(desc)
    kmeans_seconds = time.perf_counter() - started
    sets = (prepare_descriptors(f.descriptors, source) for f in iter_subset(fs.join(out, "sample")))  # streamed
    started = time.perf_counter()
    if method == "sift-bovw":
        encoder = BoVWEncoder(vocabulary, tfidf=True, burstiness=config.burstiness).fit(sets)
    else:
        if config.pca_dim and subset_images < 2:
            raise CairnError("sift-vlad: PCA-whitening needs at least 2 database images; set vlad.pca_dim=0")
        pca_dim = whitening_dim(config.pca_dim, min(subset_images, config.pca_sample), method,
                                config.pca_min_images) if config.pca_dim else 0
        encoder = VLADEncoder(vocabulary, intra_norm=True, power=config.power, pca_dim=pca_dim,
                              whiten=config.whiten, pca_sample=config.pca_sample, seed=voc.seed).fit(sets)
    encoder_seconds = time.perf_counter() - started
    encoder.save(fs.join(out, "encoder.npz"), {"trained_on": _trained_on(source)})
    fs.delete([fs.join(out, "sample")])  # the sample is scratch
    record = {"config": requested, "method": method, "features_metadata": _trained_on(source),
              "counts": counts, "dim": int(encoder.dim), "inertia": float(vocabulary.inertia_),
              "seconds": {"sample": round(sample_seconds, 3), "kmeans": round(kmeans_seconds, 3),
                          "encoder": round(encoder_seconds, 3)},
              "train_seconds": round(sample_seconds + kmeans_seconds + encoder_seconds, 3)}
    _save_record(out, "encoder.npz", record)
    log.info("train %s: %d words from %s descriptors of %d images (k-means %.1f s), encoder on %d images, dim %d",
             method, voc.k, f"{len(desc):,}", counts["images"], kmeans_seconds, subset_images, encoder.dim)
    return record


def train_pca(method: str, features: str, out: str, config, expected: dict | None = None,
              force: bool = False) -> dict:
    """PCA-whitening of global descriptors (hog, cnn embeddings) learned on the database; OUT/encoder.npz.

    ``config`` has pca_dim, whiten and pca_min_images; ``expected`` is the extractor config the features must
    have been extracted with (None: not checked).
    """
    from features.pca import PCAWhitening

    source = _check_source(features, "global", method, expected)
    requested = _requested(method, config, features)
    if (reused := _reusable(out, requested, "encoder.npz", force)) is not None:
        return reused
    table, _ = read_shards(features_prefix(features, "global"), columns=["vector"])
    started = time.perf_counter()
    dim = whitening_dim(config.pca_dim, table.num_rows, method, config.pca_min_images)
    if dim == 0:
        return {"method": method, "trained": False, "train_seconds": 0.0, "pca": "too few images"}
    pca = PCAWhitening(dim=dim, whiten=config.whiten)
    pca.fit(vectors_of(table))
    seconds = time.perf_counter() - started
    fs.makedirs(out)
    pca.save(fs.join(out, "encoder.npz"), {"trained_on": _trained_on(source)})
    record = {"config": requested, "method": method, "features_metadata": _trained_on(source),
              "dim": int(pca.dim_out), "train_seconds": round(seconds, 3)}
    _save_record(out, "encoder.npz", record)
    log.info("train %s: PCA-whitening %d -> %d on %d images in %.2f s", method, pca.n_features_in_, pca.dim_out,
             table.num_rows, seconds)
    return record


def train_cnn(manifest: str, out: str, config, decode: DecodeConfig = DecodeConfig(), force: bool = False) -> dict:
    """Fine-tune a CNN (config: models.finetune.FinetuneConfig) on the images of MANIFEST.

    Writes OUT/model.keras (fine-tuned), OUT/untrained.keras (the same network before training), checkpoints/,
    logs/ (TensorBoard), history-stage*.csv, dead_letters.csv (training images that could not be decoded) and
    train.json. A killed run resumes from its checkpoints when rerun with the same config and manifest.
    """
    from models.finetune import finetune
    from pipeline.errors import dead_letters_csv
    from pipeline.manifest import manifest_fingerprint, read_manifest

    manifest = fs.absolute(manifest)
    rows = read_manifest(manifest)
    weights = config.backbone.weights
    if weights not in ("none", "imagenet") and not fs.exists(weights):
        raise CairnError(f"cnn.finetune.backbone.weights: {weights} does not exist; give a .weights.h5 or .tflite "
                         "file, 'imagenet' (downloads) or 'none'")
    requested = {"method": "cnn", "method_config": cfg.to_dict(config), "manifest": manifest,
                 "manifest_sha256": manifest_fingerprint(manifest, rows), "decode": cfg.to_dict(decode),
                 # the initial weights by content, so that a replaced weights file retrains
                 "weights_sha256": cfg.file_fingerprint(weights) if weights not in ("none", "imagenet") else None}
    if (reused := _reusable(out, requested, "model.keras", force)) is not None:
        return reused
    if force and fs.exists(fs.join(out, "checkpoints")):
        import shutil

        shutil.rmtree(fs.join(out, "checkpoints"))  # --force: no resume either
    record = finetune(list(rows.records()), out, config, decode)
    dead = record.pop("dead_letters")
    fs.write_text(fs.join(out, "dead_letters.csv"), dead_letters_csv(dead))
    record["counts"]["manifest_rejected"] = len(rows.dead_letters)
    record.update({"config": requested, "method": "cnn"})
    _save_record(out, "model.keras", record)
    log.info("train cnn: %d images of %d landmarks, %d epochs in %.1f s (%.1f images/s per step); %s",
             record["counts"]["used"], record["classes"], record["epochs_run"], record["train_seconds"],
             record["train_images_per_second"] or 0, fs.join(out, "model.keras"))
    return record


def train_delf(manifest: str, out: str, config, decode: DecodeConfig = DecodeConfig(), force: bool = False) -> dict:
    """Train DELF (config: jobs.classic.DelfMethodConfig) on the images of MANIFEST: OUT/model.keras (features +
    attention), OUT/pca.npz (the descriptors' PCA), OUT/pool.npz (attention pooling, for delf+sv), checkpoints/,
    history-stage*.csv, dead_letters.csv and train.json (models/delf.py)."""
    from features.delf import AttentionPooling
    from models.delf import train_delf as train_model
    from pipeline.errors import dead_letters_csv
    from pipeline.manifest import manifest_fingerprint, read_manifest

    manifest = fs.absolute(manifest)
    rows = read_manifest(manifest)
    weights = config.train.backbone.weights
    if weights not in ("none", "imagenet") and not fs.exists(weights):
        raise CairnError(f"delf.train.backbone.weights: {weights} does not exist; give a .weights.h5 or .tflite "
                         "file, 'imagenet' (downloads) or 'none'")
    # what the model and its PCA depend on: the training config and the extraction the PCA learns from (not the
    # re-ranking or batch size, which change nothing here)
    extraction = cfg.to_dict(config.extraction(""))
    learned_from = {k: extraction[k] for k in ("scales", "max_side", "max_features", "score_threshold")}
    requested = {"method": "delf", "method_config": cfg.to_dict(config.train), "pca_extraction": learned_from,
                 "manifest": manifest,
                 "manifest_sha256": manifest_fingerprint(manifest, rows), "decode": cfg.to_dict(decode),
                 "weights_sha256": cfg.file_fingerprint(weights) if weights not in ("none", "imagenet") else None}
    if (reused := _reusable(out, requested, "model.keras", force)) is not None:
        return reused
    if force and fs.exists(fs.join(out, "checkpoints")):
        import shutil

        shutil.rmtree(fs.join(out, "checkpoints"))
    record = train_model(list(rows.records()), out, config.train, extract=config.extraction(""), decode=decode)
    dim = record["pca"]["dim"] if record["pca"] else int(record["dim"])
    AttentionPooling(dim).save(fs.join(out, "pool.npz"))
    dead = record.pop("dead_letters")
    fs.write_text(fs.join(out, "dead_letters.csv"), dead_letters_csv(dead))
    record["counts"]["manifest_rejected"] = len(rows.dead_letters)
    record.update({"config": requested, "method": "delf", "dim": dim})
    _save_record(out, "model.keras", record)
    log.info("train delf: %d images of %d landmarks in %.1f s (PCA: %s); %s", record["counts"]["used"],
             record["classes"], record["train_seconds"], record["pca"], fs.join(out, "model.keras"))
    return record


def train_detector(manifest: str, boxes: str, out: str, config, decode: DecodeConfig = DecodeConfig(),
                   force: bool = False) -> dict:
    """Train the landmark detector (config: jobs.classic.DetectMethodConfig) on the images of MANIFEST that have
    boxes in BOXES (CSV by id or image_path, or PASCAL VOC XML; pipeline/boxes.py), and, with ``negatives``, on
    its non-landmark images as images without a box. Writes OUT/model.keras, OUT/history.csv, OUT/checkpoints/
    while training, OUT/dead_letters.csv (images that could not be decoded), OUT/unused_boxes.csv (box rows of no
    manifest image, or unusable ones, with the reason) and OUT/train.json."""
    import csv
    import io
    import os

    from tqdm import tqdm

    from features.cnn import file_sha256
    from models.detector import train_detector as train_model
    from pipeline.boxes import read_boxes, scale_boxes
    from pipeline.errors import DeadLetter, dead_letters_csv
    from pipeline.images import ImageError, load_image
    from pipeline.manifest import manifest_fingerprint, read_manifest

    manifest = fs.absolute(manifest)
    rows = read_manifest(manifest)
    box_set = read_boxes(boxes, rows)
    tc = config.train
    weights = tc.backbone.weights
    if weights not in ("none", "imagenet") and not fs.exists(weights):
        raise CairnError(f"detect.train.backbone.weights: {weights} does not exist; give a .weights.h5 or .tflite "
                         "file, 'imagenet' (downloads) or 'none'")
    requested = {"method": "detector", "method_config": cfg.to_dict(tc), "negatives": config.negatives,
                 "max_images": config.max_images, "manifest": manifest,
                 "manifest_sha256": manifest_fingerprint(manifest, rows), "boxes": fs.absolute(boxes),
                 "boxes_sha256": file_sha256(fs.absolute(boxes))[:16], "decode": cfg.to_dict(decode),
                 "weights_sha256": cfg.file_fingerprint(weights) if weights not in ("none", "imagenet") else None}
    if (reused := _reusable(out, requested, "model.keras", force)) is not None:
        return reused
    if force and fs.exists(fs.join(out, "checkpoints")):
        import shutil

        shutil.rmtree(fs.join(out, "checkpoints"))
    chosen = [(i, p, y) for i, p, y in rows.records() if i in box_set.boxes or (config.negatives and y is None)]
    skipped = sum(1 for i, _, y in rows.records() if i not in box_set.boxes and y is not None)
    if len(chosen) > config.max_images:  # a seeded sample keeps memory bounded (images are held decoded)
        pick = np.sort(np.random.default_rng(tc.seed).choice(len(chosen), config.max_images, replace=False))
        chosen = [chosen[i] for i in pick]
    limit = int(tc.input_size * 1.5)  # crops of half the side or more are resized to input_size: little is lost
    images, targets, dead = [], [], []
    for image_id, path, _ in tqdm(chosen, desc="decode detector images", unit="img", disable=len(chosen) < 500):
        try:
            image = load_image(path, decode)
        except ImageError as e:
            dead.append(DeadLetter(image_id, e.stage, e.reason, path))
            continue
        except Exception as e:  # noqa: BLE001 - one bad file must not stop training
            dead.append(DeadLetter(image_id, "decode", f"{type(e).__name__}: {e}", path))
            continue
        h, w = image.shape[:2]
        b = box_set.for_image(image_id, w, h)
        scale = min(1.0, limit / max(h, w))
        if scale < 1:
            import cv2

            image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                               interpolation=cv2.INTER_AREA)
            b = scale_boxes(b, (w, h), (image.shape[1], image.shape[0]))
        images.append(image)
        targets.append(b)
    positives = sum(1 for b in targets if len(b))
    fs.makedirs(out)
    fs.write_text(fs.join(out, "dead_letters.csv"), dead_letters_csv(dead))
    # box rows of other images (a box file may cover the queries too) or unusable ones, with the reason
    unused = io.StringIO()
    csv.writer(unused, lineterminator="\n").writerows([("where", "reason"), *box_set.problems])
    fs.write_text(fs.join(out, "unused_boxes.csv"), unused.getvalue())
    if positives == 0:
        raise CairnError(f"no image of {manifest} with a box in {boxes} could be decoded; see "
                         f"{fs.join(out, 'dead_letters.csv')}")
    # checkpoints and history of a killed run of another config must not be resumed
    from models.finetune import _checkpoints_for

    _checkpoints_for(out, requested)
    resuming = set(os.listdir(os.path.join(out, "checkpoints"))) - {"config.json"}
    if not resuming and os.path.exists(os.path.join(out, "history.csv")):  # a fresh run starts a fresh history
        os.remove(os.path.join(out, "history.csv"))
    record = train_model(images, targets, out, tc)
    record.update({"config": requested, "method": "detector",
                   "counts": {"manifest": len(rows.ids), "manifest_rejected": len(rows.dead_letters),
                              "with_boxes": positives, "negatives": len(images) - positives,
                              "boxes": int(sum(len(b) for b in targets)), "labelled_without_box": skipped,
                              "dead_letters": len(dead), "box_rows_unused": len(box_set.problems)}})
    _save_record(out, "model.keras", record)
    log.info("train detector: %d images with boxes, %d negatives, in %.1f s -> %s", positives,
             len(images) - positives, record["train_seconds"], os.path.join(out, "model.keras"))
    return record


def make_classifier(config: classic.ClassifierConfig):
    from models.classifiers import NearestClassMean, SoftmaxClassifier

    if config.kind == "softmax":
        return SoftmaxClassifier(epochs=config.epochs, batch_size=config.batch_size,
                                 validation_fraction=config.validation_fraction, seed=config.seed)
    if config.kind == "ncm":
        return NearestClassMean(validation_fraction=config.validation_fraction, seed=config.seed)
    raise CairnError(f"classifier.kind {config.kind!r} is unknown; use softmax or ncm")


def train_classifier(method: str, features: str, out: str, config: classic.ClassifierConfig,
                     force: bool = False) -> dict:
    """A calibrated classifier on the global descriptors in FEATURES; OUT/classifier.npz."""
    source = _check_source(features, "global", method)
    requested = _requested(method, config, features)
    if (reused := _reusable(out, requested, "classifier.npz", force)) is not None:
        return reused
    table, _ = read_shards(features_prefix(features, "global"), columns=["id", "landmark_id", "vector"])
    X, y = vectors_of(table), labels_of(table)
    if len(np.unique(y)) < 2:
        raise CairnError(f"{features} holds {len(np.unique(y))} class(es); a classifier needs at least 2")
    started = time.perf_counter()
    try:
        model = make_classifier(config).fit(X, y)
    except ValueError as e:
        raise CairnError(f"{method}: {e}") from e
    seconds = time.perf_counter() - started
    fs.makedirs(out)
    model.save(fs.join(out, "classifier.npz"), {"trained_on": _trained_on(source)})
    record = {"config": requested, "method": method, "features_metadata": _trained_on(source),
              "classes": int(len(model.classes_)), "images": int(len(y)), "dim": int(X.shape[1]),
              "temperature": float(model.temperature_),
              "calibration": getattr(model, "calibration_", ""), "train_seconds": round(seconds, 3)}
    _save_record(out, "classifier.npz", record)
    log.info("train %s: %s on %d images x %d classes in %.1f s (temperature %.3f)", method, config.kind, len(y),
             len(model.classes_), seconds, model.temperature_)
    return record


def train(method: str, features: str, out: str, config: classic.MethodsConfig = classic.MethodsConfig(),
          workers: int = 1, beam_args: list[str] | None = None, force: bool = False,
          decode: DecodeConfig = DecodeConfig(), boxes: str = "") -> dict:
    """Dispatch on ``method``; returns the train.json record (or {"trained": False} when nothing is learned).

    ``features`` is the database features folder, or for ``cnn`` the database manifest (it trains on images).
    """
    if method == "delf":  # not a compare method of its own: cnn+delf and delf+sv use it
        fs.check_output_folder(out)
        return train_delf(features, out, config.delf, decode, force)
    if method == "detector":  # cnn+det and cnn-pretrained+det use it
        fs.check_output_folder(out)
        if not boxes:
            raise CairnError("--method detector needs --boxes: a CSV (id,xmin,ymin,xmax,ymax or image_path,...) or "
                             "PASCAL VOC XML annotations of the manifest's images")
        return train_detector(features, boxes, out, config.detect, decode, force)
    methods.check([method])
    fs.check_output_folder(out)
    if method == "cnn":
        return train_cnn(features, out, config.cnn.finetune, decode, force)
    if method == "sift-bovw":
        return train_encoder(method, features, out, config.bovw, workers, beam_args, force)
    if method == "sift-vlad":
        return train_encoder(method, features, out, config.vlad, workers, beam_args, force)
    if method == "hog":
        if config.hog.pca_dim <= 0:
            return {"method": method, "trained": False, "train_seconds": 0.0}
        return train_pca("hog", features, out, config.hog, cfg.to_dict(config.hog.hog), force)
    if method in ("hog-linear", "sift-vlad-linear"):
        return train_classifier(method, features, out, config.classifier, force)
    if method in ("cnn-untrained", "cnn-pretrained"):
        what = "the untrained.keras that `cairn train --method cnn` writes" if method == "cnn-untrained" \
            else "a frozen pretrained model (cnn_pretrained.model)"
        raise CairnError(f"{method} learns nothing: it embeds with {what}; trainable: {', '.join(TRAINABLE)}")
    raise CairnError(f"{method} learns nothing with `cairn train`: it uses another method's models "
                     f"({'sift-bovw' if method == 'sift-bovw+sv' else method}); trainable: {', '.join(TRAINABLE)}")


def add_set_arg(p) -> None:
    p.add_argument("--set", action="append", default=[], metavar="NAME.FIELD=VALUE",
                   help="change a method parameter, e.g. bovw.vocabulary.k=4096 (repeatable). Parameters and "
                        "defaults:\n  " + "\n  ".join(classic.describe_fields()))


def build_parser():
    p = common.parser("cairn train", __doc__ + "\nMethods:\n" + methods.describe(), beam=True)
    p.add_argument("--method", required=True, help=f"method to train: {', '.join(TRAINABLE)}")
    p.add_argument("--features", help="the database features folder (`cairn extract`/`encode`)")
    p.add_argument("--manifest", help="cnn, delf, detector: the database manifest (training reads the images)")
    p.add_argument("--boxes", default="", help="detector: landmark boxes of the manifest's images: a CSV "
                   "(id,xmin,ymin,xmax,ymax[,width,height], or image_path instead of id) or PASCAL VOC XML (a file "
                   "or a folder of them)")
    p.add_argument("--out", required=True, help="model folder to write")
    add_set_arg(p)
    common.add_beam_job_args(p)
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, beam_args = common.parse_beam_job(build_parser(), argv)
    on_images = args.method in ("cnn", "delf", "detector")
    source = args.manifest if on_images else args.features
    if not source:
        raise CairnError(f"--method {args.method} needs " + ("--manifest (the database images)" if on_images
                                                             else "--features (a features folder)"))
    record = train(args.method, source, args.out, classic.parse_overrides(args.set),
                   workers=max(1, args.workers), beam_args=beam_args, force=args.force,
                   decode=common.decode_config(args), boxes=args.boxes)
    if record.get("trained") is False:
        print(f"{args.method}: nothing to train with these parameters (hog.pca_dim=0: raw HoG + kNN).")
    else:
        print(f"{args.method}: trained in {record['train_seconds']:.1f} s -> {args.out}")
    return record
