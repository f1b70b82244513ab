"""Benchmark "detect": landmark detection on the Porto photos, and what its crops are worth to retrieval.

Data: ../shared/data/porto (484 photos, one annotated landmark box each), read in place.
  - The trained detector (models/detector.py: MobileNet v1 with the ImageNet TFLite weights, frozen; two
    anchor levels; 224 px; 8 epochs) is evaluated in 2 folds: trained on one half, it detects on the other, so
    that every photo is detected by a model that has not seen it. AP@0.5 (PASCAL VOC, reports/metrics.py) over
    every box it returns; mean IoU of the best returned box with the annotated one.
  - The training-free fallback (features/detect.ActivationDetector: the ImageNet MobileNet's activation map,
    thresholded into regions) is evaluated the same way, on all photos.
  - The whole image as the only box is the reference.
  - Retrieval: every photo embedded by the TFLite MobileNet (cnn-pretrained's extractor) from its whole image,
    from its annotated box, and from the top box of the detector and of the fallback; leave-one-out mAP over
    the full ranking and GLD mAP@100, plain cosine in numpy.
  - Speed: the detector's images/s in-process (batches of 16 prepared images).
  - The Beam job: `cairn extract --method cnn --detector` (DirectRunner, 1 worker; the TFLite MobileNet
    embeds, the detector's defaults pick up to 2 boxes above 0.3): each fold's photos with the other fold's
    detector, against the same job embedding whole images. Its regional output (full image + boxes, an image
    pair scored by its best region pair, as `cairn recognize` does) gets the same leave-one-out mAP.
"""

from __future__ import annotations

import csv
import logging
import os
import time

import numpy as np

from bench.common import entry, skipped

log = logging.getLogger(__name__)

NAME = "detect"
TITLE = "Landmark detection on the Porto photos: AP@0.5, mean IoU, and the retrieval mAP of the crops"
DESCRIPTION = __doc__.split("\n", 2)[2].strip()
PORTO = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "porto")
TFLITE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "weights",
                      "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite")


def _load(quick: bool):
    from pipeline.images import load_image

    rows = list(csv.DictReader(open(os.path.join(PORTO, "boxes.csv"))))
    if quick:
        rows = rows[::4]
    images, boxes, labels, paths = [], [], [], []
    for r in rows:
        paths.append(os.path.abspath(os.path.join(PORTO, r["image_path"])))
        img = load_image(os.path.join(PORTO, r["image_path"]))
        h, w = img.shape[:2]
        fx, fy = w / float(r["width"]), h / float(r["height"])
        boxes.append(np.array([[float(r["xmin"]) * fx, float(r["ymin"]) * fy, float(r["xmax"]) * fx,
                                float(r["ymax"]) * fy]], np.float32))
        images.append(img)
        labels.append(r["label"])
    names = sorted(set(labels))
    return images, boxes, np.array([names.index(lab) for lab in labels]), paths


def _crop(image: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    h, w = image.shape[:2]
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, max(x1, x0 + 8)), min(h, max(y1, y0 + 8))
    return image[y0:y1, x0:x1]


def run(workdir: str, quick: bool) -> list[dict]:
    from bench.bench_porto import _ranked_metrics
    from features.backbones import BackboneConfig
    from features.cnn import resize_square
    from features.detect import ActivationDetector, Detector
    from features.frozen import TFLiteEmbedder
    from models.detector import DetectorConfig, train_detector
    from reports.metrics import detection_ap, mean_iou

    group = f"Porto photos ({'quick subset' if quick else 'all 484'}), one annotated landmark box each"
    if not os.path.exists(os.path.join(PORTO, "boxes.csv")) or not os.path.exists(TFLITE):
        reason = "../shared/data/porto/boxes.csv or the shared TFLite MobileNet is absent"
        log.warning("detect: skipped: %s", reason)
        return [skipped(group, "detection", reason)]
    os.makedirs(workdir, exist_ok=True)
    images, boxes, labels, paths = _load(quick)
    n = len(images)
    gt = {str(i): boxes[i] for i in range(n)}
    backbone = BackboneConfig("mobilenet", weights=os.path.abspath(TFLITE))
    config = DetectorConfig(backbone=backbone, input_size=224, epochs=3 if quick else 8)
    folds = np.random.default_rng(0).permutation(n) % 2
    found: list[tuple[np.ndarray, np.ndarray]] = [None] * n  # type: ignore[list-item]
    train_s, detect_s = 0.0, 0.0
    for fold in (0, 1):
        train = np.flatnonzero(folds != fold)
        record = train_detector([images[i] for i in train], [boxes[i] for i in train],
                                os.path.join(workdir, f"detector-{fold}"), config)
        train_s += record["train_seconds"]
        det = Detector(os.path.join(workdir, f"detector-{fold}", "model.keras"), score_threshold=0.05)
        test = np.flatnonzero(folds == fold)
        start = time.perf_counter()
        for s in range(0, len(test), 16):
            chunk = test[s:s + 16]
            prepared = np.stack([det.prepare(images[i]) for i in chunk])
            for i, result in zip(chunk, det.detect_batch(prepared, [(images[i].shape[1], images[i].shape[0])
                                                                       for i in chunk]), strict=True):
                found[i] = result
        detect_s += time.perf_counter() - start
    fallback = ActivationDetector(backbone, size=320)
    start = time.perf_counter()
    proposals = [fallback.detect(img) for img in images]
    fallback_s = time.perf_counter() - start

    def dets(results):
        return [(str(i), float(s), b) for i, (bs, ss) in enumerate(results) for b, s in zip(bs, ss, strict=True)]

    whole = [(np.array([[0, 0, img.shape[1], img.shape[0]]], np.float32), np.ones(1, np.float32)) for img in images]
    entries = []
    ref_ap, ref_iou = "whole image as the box: AP@0.5", "whole image as the box: mean IoU"
    entries.append(entry(group, ref_ap, round(detection_ap(dets(whole), gt), 4), "AP"))
    entries.append(entry(group, ref_iou, round(mean_iou(dets(whole), gt), 4), "IoU"))
    for name, results in (("trained detector (2 folds)", found), ("training-free fallback (activations)",
                                                                   proposals)):
        entries.append(entry(group, f"{name}: AP@0.5", round(detection_ap(dets(results), gt), 4), "AP", ref_ap))
        entries.append(entry(group, f"{name}: mean IoU", round(mean_iou(dets(results), gt), 4), "IoU", ref_iou))
    entries.append(entry(group, "trained detector: images/s (in-process, batches of 16, 224 px)",
                         round(n / detect_s, 2), "images/s", train_seconds=round(train_s, 1)))
    entries.append(entry(group, "fallback: images/s (one image at a time, 320 px)", round(n / fallback_s, 2),
                         "images/s"))
    log.info("detect: AP@0.5 detector %.3f, fallback %.3f", entries[2]["value"], entries[4]["value"])

    embedder = TFLiteEmbedder(TFLITE)

    def embed(crops):
        return np.concatenate([embedder.embed(np.stack([resize_square(c, 224) for c in crops[s:s + 32]]))
                               for s in range(0, len(crops), 32)])

    def top(results, i):
        bs, _ = results[i]
        return bs[0] if len(bs) else whole[i][0][0]

    variants = {"whole images": list(images), "annotated box crops": [_crop(im, b[0]) for im, b in zip(images, boxes,
                                                                                                      strict=True)],
                "trained detector's top box crops": [_crop(images[i], top(found, i)) for i in range(n)],
                "fallback's top box crops": [_crop(images[i], top(proposals, i)) for i in range(n)]}
    ref = "retrieval from whole images: mAP (full ranking)"
    for name, crops in variants.items():
        x = embed(crops)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        map100, p1, full = _ranked_metrics(x, labels, x, labels, exclude_self=True)
        entries.append(entry(group, f"retrieval from {name}: mAP (full ranking)", round(full, 4), "mAP",
                             None if name == "whole images" else ref, map_at_100=round(map100, 4),
                             p_at_1=round(p1, 4)))
        log.info("detect: retrieval from %s: mAP %.3f, mAP@100 %.3f", name, full, map100)
    entries += _beam(workdir, group, paths, labels, folds)
    return entries


def _beam(workdir: str, group: str, paths: list[str], labels: np.ndarray, folds: np.ndarray) -> list[dict]:
    """The extraction Beam job with and without --detector: images/s, and the regional retrieval mAP."""
    from bench.bench_extract import _write_manifest
    from features.detect import DetectConfig
    from pipeline.featuresets import features_prefix
    from pipeline.parquet_io import read_shards
    from pipeline.schemas import vectors_of
    from pipeline.stages.extract import extract

    ids = [f"p{i:04d}" for i in range(len(paths))]
    params = {"model": os.path.abspath(TFLITE), "batch_size": 32}
    seconds, whole_seconds, regions = 0.0, 0.0, {}
    for fold in (0, 1):  # the same two jobs without and with the detector (two start-ups each)
        rows = [(ids[i], paths[i], int(labels[i])) for i in np.flatnonzero(folds == fold)]
        manifest = _write_manifest(os.path.join(workdir, "beam", f"fold{fold}.csv"), rows)
        whole_seconds += extract(manifest, os.path.join(workdir, "beam", f"whole-{fold}"), "cnn", params, workers=1,
                                 force=True)["seconds"]
        detect = DetectConfig(model=os.path.join(workdir, f"detector-{1 - fold}", "model.keras"))
        out = os.path.join(workdir, "beam", f"regions-{fold}")
        record = extract(manifest, out, "cnn", params, workers=1, force=True, detect=detect)
        seconds += record["seconds"]
        table, _ = read_shards(features_prefix(out), columns=["id", "region", "vector"])
        for image_id, region, v in zip(table.column("id").to_pylist(), table.column("region").to_pylist(),
                                       vectors_of(table), strict=True):
            regions.setdefault(image_id, []).append((region, v))
    n = len(ids)
    rate = round(n / seconds, 2)
    ref = "Beam job, whole images embedded: images/s"
    out = [entry(group, ref, round(n / whole_seconds, 2), "images/s"),
           entry(group, "Beam job with --detector (detect, crop full image + top boxes, embed each): images/s", rate,
                 "images/s", ref, regions_per_image=round(sum(len(v) for v in regions.values()) / n, 3))]
    # the same output scored twice: every region (the default), and the boxes alone where there are some
    # (what detect.full_image=false gives: an image without a box keeps its full image)
    for name, keep in (("full image + detector boxes", lambda rs: rs),
                       ("detector boxes only (full image where none)", lambda rs: [r for r in rs if r[0] > 0] or rs)):
        full = _regional_map({i: [v for _, v in keep(regions[i])] for i in ids}, ids, labels)
        out.append(entry(group, f"retrieval from the Beam job's regions ({name}, best region pair): mAP (full "
                                "ranking)", round(full, 4), "mAP", "retrieval from whole images: mAP (full ranking)"))
        log.info("detect: Beam job regions (%s): mAP %.3f", name, full)
    log.info("detect: Beam job %.2f images/s with the detector (%.2f without)", rate, n / whole_seconds)
    return out


def _regional_map(regions: dict[str, list[np.ndarray]], ids: list[str], labels: np.ndarray) -> float:
    """Leave-one-out mAP over the full ranking when an image pair scores the best of its region pairs."""
    from bench.bench_porto import _full_map

    n = len(ids)
    owner = np.concatenate([[k] * len(regions[i]) for k, i in enumerate(ids)])
    x = np.concatenate([np.stack(regions[i]) for i in ids])
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    S = x @ x.T
    best = np.full((n, n), -np.inf, np.float32)
    for a in range(n):
        np.maximum.at(best[a], owner, S[owner == a].max(axis=0))
    np.fill_diagonal(best, -np.inf)
    order = np.argsort(-best, axis=1, kind="stable")[:, :-1]
    return _full_map(labels[order] == labels[:, None])
