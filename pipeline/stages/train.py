"""The trainers: what methods learn from the database, each a plain function with its config as a parameter.

    train_encoder      visual vocabulary (FAISS k-means on a Beam-sampled share of the SIFT descriptors) and the
                       BoVW (tf-idf) or VLAD (+ PCA-whitening) encoder; OUT/encoder.npz
    train_pca          PCA-whitening of global descriptors (hog, CNN embeddings); OUT/encoder.npz
    train_classifier   a calibrated softmax or nearest-class-mean classifier; OUT/classifier.npz
    train_cnn          CNN fine-tuning with GeM + ArcFace (models/finetune.py); OUT/model.keras, untrained.keras
    train_delf         DELF's two stages and PCA (models/delf.py); OUT/model.keras, pca.npz, pool.npz
    train_detector     the landmark detector (models/detector.py); OUT/model.keras

Every trainer writes OUT/train.json (the config, what it was trained on, the timings, the artefact's checksum),
reuses an artefact trained with the same config on the same data, and returns its record with its cost
(pipeline/stages/costs.py). Which method trains with which trainer is the method registry's business
(pipeline/run/methods.py).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import shutil
import time

import cv2
import numpy as np
from tqdm import tqdm

from features.cnn import file_sha256
from features.delf import AttentionPooling
from features.pca import PCAWhitening
from features.sift import prepare_descriptors
from features.vocabulary import BoVWEncoder, VLADEncoder, Vocabulary
from models.classifiers import NearestClassMean, SoftmaxClassifier
from models.delf import train_delf as fit_delf
from models.detector import train_detector as fit_detector
from models.finetune import _checkpoints_for, finetune
from pipeline import config as cfg
from pipeline import fs
from pipeline.boxes import read_boxes, scale_boxes
from pipeline.errors import CairnError, DeadLetter, dead_letters_csv
from pipeline.featuresets import (
    features_fingerprint,
    features_kind,
    features_metadata,
    features_prefix,
    tree_bytes,
)
from pipeline.images import DecodeConfig, ImageError, load_image
from pipeline.manifest import manifest_fingerprint, read_manifest
from pipeline.options import size_factor
from pipeline.parquet_io import read_shards
from pipeline.schemas import labels_of, vectors_of
from pipeline.stages import costs
from pipeline.stages.encode import iter_subset, read_sample, sample_descriptors

log = logging.getLogger(__name__)


def whitening_dim(requested: int, samples: int, what: str, min_per_dim: int = 0) -> int:
    """The PCA dimension to learn from ``samples`` images (0 = no PCA).

    A D-dimensional covariance is estimated well from about 10 D samples; whitened from fewer, the rare
    directions are noise blown up to unit variance, and retrieval gets worse than with the raw descriptor
    (measured on the 484 Porto photos: VLAD mAP@100 0.37 raw, 0.09 whitened to 242-d, 0.17 to 64-d). So with
    fewer than ``min_per_dim`` images per dimension there is no PCA. In any case PCA-whitening learned on N
    samples can whiten at most N - 1 directions, and whitening nearly all of them maps the training set onto a
    regular simplex (every pair equally far apart), so at most N / 2 dimensions are kept.

    Inside `pipeline.options.sized_as` (a `cairn plan` sample) the images-per-dimension rule is applied to the whole run's
    images, so that the sample learns its PCA (on what it has) when the whole run would.
    """
    if min_per_dim and samples * size_factor() < min_per_dim * requested:
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


def _requested(method: str, config, features: str) -> dict:
    """What a training run is keyed by: the method, its parameters, and the features it trains on."""
    return {"method": method, "method_config": cfg.to_dict(config), "features": fs.absolute(features),
            "features_fingerprint": features_fingerprint(features)}


_KEY_NAMES = {"images_stat": "the images (a size or modification time)", "features_fingerprint": "the features"}


def _reusable(out: str, requested: dict, artefact: str, force: bool) -> dict | None:
    """The stored record when OUT holds the artefact trained with ``requested`` (checked by its checksum);
    otherwise None, after removing the record so that a run killed before writing its own cannot leave an
    old record beside a new artefact."""
    path, target = fs.join(out, "train.json"), fs.join(out, artefact)
    if not force and cfg.check_reusable(path, requested) and fs.exists(target):
        record = cfg.load_json(path)
        if record.get("artefact_sha256") == cfg.file_fingerprint(target):
            log.info("train: reusing %s (same config and features; --force retrains)", out)
            return {**record, "cost": costs.reused()}
        log.warning("train: %s is not the artefact %s recorded (its checksum differs); training again", target, path)
    elif not force and fs.exists(path):
        with contextlib.suppress(ValueError, OSError, AttributeError):  # an unreadable record: nothing to say
            stored = cfg.load_json(path).get("config") or {}
            changed = sorted(_KEY_NAMES.get(k, k) for k in {*stored, *requested} if stored.get(k) != requested.get(k))
            log.info("train: training %s again: %s changed since it was trained", out, ", ".join(changed))
    if fs.exists(path):
        fs.delete([path])
    return None


def _trained_on(source: dict) -> dict:
    """What an artefact was trained on: its features' method and config (saved in the artefact and train.json)."""
    return {"method": source.get("method"), "config": source.get("config")}


def _save_record(out: str, artefact: str, record: dict) -> None:
    record["artefact_sha256"] = cfg.file_fingerprint(fs.join(out, artefact))
    cfg.save_json(fs.join(out, "train.json"), record)


def _open_on_features(method: str, features: str, kind: str, config, out: str, artefact: str, force: bool,
                      expected: dict | None = None) -> tuple[dict, dict, dict | None]:
    """The opening of every trainer on a features folder: (the features' metadata, what the run is keyed by,
    the stored record when OUT already holds the artefact trained so)."""
    source = _check_source(features, kind, method, expected)
    requested = _requested(method, config, features)
    return source, requested, _reusable(out, requested, artefact, force)


def _open_on_images(method: str, manifest: str, out: str, weights: str, where: str, decode: DecodeConfig,
                    force: bool, rows=None, **keyed) -> tuple[str, object, dict, dict | None]:
    """The opening of every trainer on the images of a manifest (cnn, delf, detector): (the manifest's absolute
    path, its rows (``rows``: read already), what the run is keyed by: ``keyed`` + the manifest, its content,
    the decoding and the initial weights by content, the stored record when OUT already holds the model trained
    so). A backbone's initial ``weights`` file must exist (``where`` names its setting); --force also drops the
    checkpoints (no resume)."""
    manifest = fs.absolute(manifest)
    rows = rows if rows is not None else read_manifest(manifest)
    if weights not in ("none", "imagenet") and not fs.exists(weights):
        raise CairnError(f"{where}: {weights} does not exist; give a .weights.h5 or .tflite file, 'imagenet' "
                         "(downloads) or 'none'")
    requested = {"method": method, **keyed, "manifest": manifest,
                 "manifest_sha256": manifest_fingerprint(manifest, rows), "decode": cfg.to_dict(decode),
                 # the images by size and modification time (one stat each), so that an image replaced in place
                 # retrains; what changed is logged (_reusable)
                 "images_stat": cfg.fingerprint(fs.stat_files(rows.paths)),
                 # the initial weights by content, so that a replaced weights file retrains
                 "weights_sha256": cfg.file_fingerprint(weights) if weights not in ("none", "imagenet") else None}
    reused = _reusable(out, requested, "model.keras", force)
    if reused is None and force and fs.exists(fs.join(out, "checkpoints")):
        shutil.rmtree(fs.join(out, "checkpoints"))  # --force: no resume either
    return manifest, rows, requested, reused


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
                  beam_args: list[str] | None = None, force: bool = False, test_pipeline=None) -> dict:
    """Vocabulary + BoVW (config: a pipeline.run.settings.BovwConfig) or VLAD (VladConfig) encoder from SIFT
    features, as ``config.encoder`` says; ``test_pipeline``: the descriptor sampling's Beam pipeline."""
    source, requested, reused = _open_on_features(method, features, "local", config, out, "encoder.npz", force,
                                                  cfg.to_dict(config.sift))
    if reused is not None:
        return reused
    fs.makedirs(out)
    voc = config.vocabulary
    bovw = config.encoder == "bovw"  # else VLAD
    subset = config.idf_sample if bovw else (config.pca_sample if config.pca_dim else 0)
    started = time.perf_counter()
    counts = sample_descriptors(features, fs.join(out, "sample"), voc.sample_size, subset, voc.seed, workers,
                                beam_args, test_pipeline)
    stored = read_sample(fs.join(out, "sample"))
    subset_images = counts["subset_images"]
    sample_seconds = time.perf_counter() - started
    if len(stored) < voc.k:
        raise CairnError(f"{method}: the database gave only {len(stored):,} descriptors, fewer than the "
                         f"{voc.k:,} visual words asked for; lower it (--set "
                         f"{config.encoder}.vocabulary.k=...) or use more images")
    desc = prepare_descriptors(stored, source)
    started = time.perf_counter()
    vocabulary = Vocabulary(k=voc.k, niter=voc.niter, sample_size=voc.sample_size, seed=voc.seed,
                            use_gpu=voc.use_gpu).fit(desc)
    kmeans_seconds = time.perf_counter() - started
    sets = (prepare_descriptors(f.descriptors, source) for f in iter_subset(fs.join(out, "sample")))  # streamed
    started = time.perf_counter()
    if bovw:
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
    # k-means learns from at most sample_size descriptors; the encoder from at most its image subset
    return {**record, "cost": costs.cost(
        "train", counts["descriptors"], [["images", None]], cap=voc.sample_size, output_bytes=tree_bytes(out),
        rename="k-means, {name}", parts=[
            costs.part("sample", "descriptor sampling", record["seconds"]["sample"], counts["images"], [["images", None]],
                       images=counts["images"], parallel=True),
            costs.part("train", "encoder fit, {name}", record["seconds"]["encoder"], counts["subset_images"],
                       [["images", None]],
                       key="encoder", cap=config.idf_sample if bovw else config.pca_sample)])}


def train_pca(method: str, features: str, out: str, config, expected: dict | None = None,
              force: bool = False) -> dict:
    """PCA-whitening of global descriptors (hog, cnn embeddings) learned on the database; OUT/encoder.npz.

    ``config`` has pca_dim, whiten and pca_min_images; ``expected`` is the extractor config the features must
    have been extracted with (None: not checked).
    """
    source, requested, reused = _open_on_features(method, features, "global", config, out, "encoder.npz", force,
                                                  expected)
    if reused is not None:
        return reused
    table, _ = read_shards(features_prefix(features, "global"), columns=["id", "vector"])  # in id order
    started = time.perf_counter()
    dim = whitening_dim(config.pca_dim, table.num_rows, method, config.pca_min_images)
    if dim == 0:
        return {"method": method, "trained": False, "train_seconds": 0.0, "pca": "too few images",
                "cost": costs.cost("train", 0, [["images", None]])}
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
    return {**record, "cost": costs.cost("train", 0, [["images", None]], output_bytes=tree_bytes(out))}


def train_cnn(manifest: str, out: str, config, decode: DecodeConfig = DecodeConfig(), force: bool = False) -> dict:
    """Fine-tune a CNN (config: models.finetune.FinetuneConfig) on the images of MANIFEST.

    Writes OUT/model.keras (fine-tuned), OUT/untrained.keras (the same network before training), checkpoints/,
    logs/ (TensorBoard), history-stage*.csv, dead_letters.csv (training images that could not be decoded) and
    train.json. A killed run resumes from its checkpoints when rerun with the same config and manifest.
    """
    manifest, rows, requested, reused = _open_on_images("cnn", manifest, out, config.backbone.weights,
                                                        "cnn.finetune.backbone.weights", decode, force,
                                                        method_config=cfg.to_dict(config))
    if reused is not None:
        return reused
    record = finetune(list(rows.records()), out, config, decode)
    dead = record.pop("dead_letters")
    fs.write_text(fs.join(out, "dead_letters.csv"), dead_letters_csv(dead))
    record["counts"]["manifest_rejected"] = len(rows.dead_letters)
    record.update({"config": requested, "method": "cnn"})
    _save_record(out, "model.keras", record)
    log.info("train cnn: %d images of %d landmarks, %d epochs in %.1f s (%.1f images/s per step); %s",
             record["counts"]["used"], record["classes"], record["epochs_run"], record["train_seconds"],
             record["train_images_per_second"] or 0, fs.join(out, "model.keras"))
    return {**record, "cost": _images_cost(record, out)}


def train_delf(manifest: str, out: str, config, decode: DecodeConfig = DecodeConfig(), force: bool = False) -> dict:
    """Train DELF (config: pipeline.run.settings.DelfMethodConfig) on the images of MANIFEST: OUT/model.keras (features +
    attention), OUT/pca.npz (the descriptors' PCA), OUT/pool.npz (attention pooling, for delf+sv), checkpoints/,
    history-stage*.csv, dead_letters.csv and train.json (models/delf.py)."""
    # what the model and its PCA depend on: the training config and the extraction the PCA learns from (not the
    # re-ranking or batch size, which change nothing here)
    extraction = cfg.to_dict(config.extraction(""))
    learned_from = {k: extraction[k] for k in ("scales", "max_side", "max_features", "score_threshold")}
    manifest, rows, requested, reused = _open_on_images("delf", manifest, out, config.train.backbone.weights,
                                                        "delf.train.backbone.weights", decode, force,
                                                        method_config=cfg.to_dict(config.train),
                                                        pca_extraction=learned_from)
    if reused is not None:
        return reused
    record = fit_delf(list(rows.records()), out, config.train, extract=config.extraction(""), decode=decode)
    dim = record["pca"]["dim"] if record["pca"] else int(record["dim"])
    AttentionPooling(dim).save(fs.join(out, "pool.npz"))
    dead = record.pop("dead_letters")
    fs.write_text(fs.join(out, "dead_letters.csv"), dead_letters_csv(dead))
    record["counts"]["manifest_rejected"] = len(rows.dead_letters)
    record.update({"config": requested, "method": "delf", "dim": dim})
    _save_record(out, "model.keras", record)
    log.info("train delf: %d images of %d landmarks in %.1f s (PCA: %s); %s", record["counts"]["used"],
             record["classes"], record["train_seconds"], record["pca"], fs.join(out, "model.keras"))
    cost = _images_cost(record, out)
    pca = record.get("pca") if isinstance(record.get("pca"), dict) else None
    if pca and pca.get("seconds"):  # its PCA learns from a capped sample of images
        cost["parts"] = [costs.part("train", "PCA, {name}", pca["seconds"], int(pca.get("images", 0)),
                                    [["images", None]], key="pca", cap=config.train.pca_images)]
    return {**record, "cost": cost}


def _images_cost(record: dict, out: str) -> dict:
    """The cost of a trainer on images (fine-tuning, DELF): per image used, every epoch over all of them."""
    return costs.cost("train", record.get("counts", {}).get("used", 0), [["images", None]],
                      images=int(record.get("images", 0) or 0), output_bytes=tree_bytes(out))


def train_detector(manifest: str, boxes: str, out: str, config, decode: DecodeConfig = DecodeConfig(),
                   force: bool = False) -> dict:
    """Train the landmark detector (config: pipeline.run.settings.DetectMethodConfig) on the images of MANIFEST that have
    boxes in BOXES (CSV by id or image_path, or PASCAL VOC XML; pipeline/boxes.py), and, with ``negatives``, on
    its non-landmark images as images without a box. Writes OUT/model.keras, OUT/history.csv, OUT/checkpoints/
    while training, OUT/dead_letters.csv (images that could not be decoded), OUT/unused_boxes.csv (box rows of no
    manifest image, or unusable ones, with the reason) and OUT/train.json."""
    tc = config.train
    rows = read_manifest(fs.absolute(manifest))
    box_set = read_boxes(boxes, rows)  # a missing or malformed box file is a one-line error before anything
    manifest, rows, requested, reused = _open_on_images(
        "detector", manifest, out, tc.backbone.weights, "detect.train.backbone.weights", decode, force, rows=rows,
        method_config=cfg.to_dict(tc), negatives=config.negatives, max_images=config.max_images,
        boxes=fs.absolute(boxes), boxes_sha256=file_sha256(fs.absolute(boxes))[:16])
    if reused is not None:
        return reused
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
    _checkpoints_for(out, requested)
    resuming = set(os.listdir(os.path.join(out, "checkpoints"))) - {"config.json"}
    if not resuming and os.path.exists(os.path.join(out, "history.csv")):  # a fresh run starts a fresh history
        os.remove(os.path.join(out, "history.csv"))
    record = fit_detector(images, targets, out, tc)
    record.update({"config": requested, "method": "detector",
                   "counts": {"manifest": len(rows.ids), "manifest_rejected": len(rows.dead_letters),
                              "with_boxes": positives, "negatives": len(images) - positives,
                              "boxes": int(sum(len(b) for b in targets)), "labelled_without_box": skipped,
                              "dead_letters": len(dead), "box_rows_unused": len(box_set.problems)}})
    _save_record(out, "model.keras", record)
    log.info("train detector: %d images with boxes, %d negatives, in %.1f s -> %s", positives,
             len(images) - positives, record["train_seconds"], os.path.join(out, "model.keras"))
    # it learns from at most max_images images, held decoded
    return {**record, "cost": costs.cost("train", int(record.get("images", 0) or 0), [["images", None]],
                                         cap=config.max_images, images=int(record.get("images", 0) or 0),
                                         output_bytes=tree_bytes(out))}


def make_classifier(config):
    """The classifier of a pipeline.run.settings.ClassifierConfig."""
    if config.kind == "softmax":
        return SoftmaxClassifier(epochs=config.epochs, batch_size=config.batch_size,
                                 validation_fraction=config.validation_fraction, seed=config.seed)
    if config.kind == "ncm":
        return NearestClassMean(validation_fraction=config.validation_fraction, seed=config.seed)
    raise CairnError(f"classifier.kind {config.kind!r} is unknown; use softmax or ncm")


def train_classifier(method: str, features: str, out: str, config, force: bool = False) -> dict:
    """A calibrated classifier (config: a pipeline.run.settings.ClassifierConfig) on the global descriptors in
    FEATURES; OUT/classifier.npz."""
    source, requested, reused = _open_on_features(method, features, "global", config, out, "classifier.npz", force)
    if reused is not None:
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
    return {**record, "cost": classifier_cost(record, config, tree_bytes(out))}


def classifier_cost(record: dict, config, output_bytes: int = 0) -> dict:
    """A classifier's cost. Softmax: SGD steps of batch x dim x classes, which `cairn plan` times at the target's
    classes (the probe) rather than extrapolating; nearest class mean: one pass over the images. What it stores
    grows with its classes."""
    softmax = config.kind == "softmax"
    images, classes = record.get("images", 0), record.get("classes", 1)
    extra = {"probe": {"kernel": "softmax-step", "dim": int(record["dim"]), "batch": config.batch_size,
                       "epochs": config.epochs, "validation_fraction": config.validation_fraction}} \
        if softmax and record.get("dim") else {}
    return costs.cost("train", images * (classes if softmax else 1),
                      [["images", None], ["classes", None]] if softmax else [["images", None]],
                      images=int(images or 0), output_bytes=output_bytes, output_grows=[["classes", None]], **extra)
