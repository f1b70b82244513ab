"""Benchmark "delf": DELF extraction throughput, batched Beam job vs one image at a time; storage; matching time.

Model: DELF on MobileNet v1 (conv_pw_11, 512-d; the ImageNet TFLite weights in ../shared/weights when present,
else random: speed does not depend on the weights), attention module, PCA to 40-d learned on the images; the
pyramid (0.7071, 1, 1.4142) at a long side of 512, up to 1000 features per image.
  - reference: the official code's way, one image and one scale at a time (DelfExtractor.extract per decoded
    image, the model called on a batch of one);
  - the same model batched in-process (extract_batch, 8 same-shaped images per model call), on decoded images;
  - the reference of the Beam job: the best loop a user would write by hand for the same work, reading and
    decoding the JPEGs in a pool of as many threads as the model has, ahead of extract_batch (8 per call);
  - `cairn extract --method delf` (Beam DirectRunner, one in-process worker, RunInference batches of 8), which
    also reads and decodes every JPEG (in a pool, ahead of the model); the job's wall time including start-up,
    and with the start-up estimated from a 16-image run and taken out; and the whole job, start-up included, on
    the images four times over (2,048 rows, each copy its own id) against the hand-written loop on the same list,
    and, from that run, the start-up-excluded estimate with N = 2,048;
  - bytes per image: the Parquet local-features files on disk per image, beside the float32 in-memory size;
  - matching + RANSAC per image pair (features/verify.py: FAISS exact matching with the ratio test, MAGSAC++
    homography), on pairs of the benchmark's images (same landmark and different landmarks).
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from bench.bench_embed import _images, copies_manifest, startup_excluded
from bench.common import entry, offline_beam_args, summary

log = logging.getLogger(__name__)

NAME = "delf"
TITLE = "DELF: batched Beam extraction vs one image at a time, bytes per image, matching + RANSAC per pair"
DESCRIPTION = __doc__.split("\n", 2)[2].strip()
WHOLE_COPIES = 4  # the whole-job figure runs on the 512 images 4 times over (2,048 rows), start-up included
TFLITE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "weights",
                      "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite")


def _model(workdir: str, manifest: str) -> tuple[str, str]:
    """An exported DELF model (untrained attention: speed only) and a PCA learned on its features."""
    import dataclasses

    import keras

    from features.backbones import BackboneConfig
    from features.delf import DelfConfig, DelfExtractor, build_delf_model, receptive_field, save_delf_model
    from features.pca import PCAWhitening
    from pipeline.images import load_image
    from pipeline.manifest import read_manifest

    keras.utils.set_random_seed(0)
    weights = os.path.abspath(TFLITE) if os.path.exists(TFLITE) else "none"
    model, app, layer = build_delf_model(BackboneConfig("mobilenet", weights=weights))
    rf = receptive_field(app, layer)
    path = os.path.join(workdir, "delf.keras")
    save_delf_model(model, path, {"dim": 512, "layer": layer, "receptive_field": [dataclasses.asdict(r) for r in rf],
                                  "input_size": 224, "backbone": {"name": "mobilenet", "weights": weights}})
    ex = DelfExtractor(DelfConfig(model=path))
    paths = read_manifest(manifest).paths[:16]
    X = np.concatenate([ex.extract(load_image(p)).descriptors for p in paths])
    pca = os.path.join(workdir, "pca.npz")
    PCAWhitening(dim=40, whiten=False).fit(X).save(pca)
    return path, pca


def handwritten(paths: list[str], extractor, threads: int, batch: int) -> int:
    """The hand-written reference: read + decode + prepare in a pool of ``threads`` threads, every image
    submitted at once (the pool decodes ahead while the model runs), ``extract_batch`` on ``batch`` images at a
    time; returns the number of features."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.images import load_image

    def prepare(path):
        image = load_image(path)
        return extractor.prepare(image), (image.shape[1], image.shape[0])

    found, buf = 0, []
    with ThreadPoolExecutor(threads) as pool:
        for item in pool.map(prepare, paths):
            buf.append(item)
            if len(buf) == batch:
                found += sum(len(f.descriptors) for f in extractor.extract_batch(*map(list, zip(*buf, strict=True))))
                buf = []
    if buf:
        found += sum(len(f.descriptors) for f in extractor.extract_batch(*map(list, zip(*buf, strict=True))))
    return found


def _whole_job(group: str, params: dict, rows, extractor, workdir: str, threads: int, copies: int,
               small: tuple[int, float]) -> list[dict]:
    """The whole job, start-up included, on ``copies`` times the images (each copy its own id; the same files)
    against the hand-written loop on the same list (its model already loaded); and from the same run, the
    start-up-excluded estimate against the ``small`` job (images, seconds)."""
    from pipeline.stages.extract import extract

    manifest, paths = copies_manifest(rows, copies, os.path.join(workdir, "data", "whole.csv"))
    start = time.perf_counter()
    handwritten(paths, extractor, threads, params["batch_size"])
    hand = time.perf_counter() - start
    ref = f"hand-written on {len(paths):,} images"
    start = time.perf_counter()
    record = extract(manifest, os.path.join(workdir, "beam-whole"), "delf", params, workers=1, threads=threads,
                     beam_args=offline_beam_args(workdir), force=True)
    job = time.perf_counter() - start
    log.info("delf: %d images, hand-written %.1f s, whole Beam job %.1f s", len(paths), hand, job)
    return [entry(group, ref, round(len(paths) / hand, 2), "images/s", images=len(paths), seconds=round(hand, 3),
                  note="model loaded beforehand"),
            entry(group, f"cairn extract --method delf on {len(paths):,} images, whole", round(len(paths) / job, 2),
                  "images/s", ref, note="the extract() call, start-up and model load included",
                  seconds=round(job, 3)),
            *startup_excluded(group, f"cairn extract --method delf on {len(paths):,} images, start-up excluded "
                              "(estimate)", record["counts"]["outputs"], record["seconds"], small, ref)]


def run(workdir: str, quick: bool) -> list[dict]:
    from features.delf import DelfConfig, DelfExtractor
    from features.verify import VerifyConfig, verify
    from pipeline.featuresets import features_prefix
    from pipeline.images import load_image
    from pipeline.manifest import read_manifest
    from pipeline.parquet_io import find_shards, read_shards
    from pipeline.resources import limit_threads
    from pipeline.stages.extract import extract

    threads = os.cpu_count() or 1
    limit_threads(threads)
    os.makedirs(workdir, exist_ok=True)
    n = 48 if quick else 512
    manifest = _images(os.path.join(workdir, "data"), n, seed=5)
    rows = read_manifest(manifest)
    small = os.path.join(workdir, "data", "small.csv")
    with open(manifest) as f, open(small, "w") as g:
        g.writelines(line for i, line in enumerate(f) if i <= 16)
    model, pca = _model(workdir, manifest)
    params = {"model": model, "pca": pca, "batch_size": 8}
    config = DelfConfig(**params)
    group = f"DELF MobileNet v1 conv_pw_11, 3 scales at 512 px, 640x480 JPEGs, {threads} threads"
    entries = []

    ex = DelfExtractor(config)
    images = [load_image(p) for p in rows.paths]
    ex.extract(images[0])  # warm-up (graph tracing)
    start = time.perf_counter()
    for img in images:
        ex.extract(img)
    one = len(images) / (time.perf_counter() - start)
    ref = "one image at a time (the official code's way)"
    entries.append(entry(group, ref, round(one, 2), "images/s", images=len(images),
                         note="decoded images in memory; model called per image and per scale"))
    prepared = [ex.prepare(img) for img in images]
    sizes = [(img.shape[1], img.shape[0]) for img in images]
    times = []
    for _ in range(1):
        start = time.perf_counter()
        ex.extract_batch(prepared, sizes)
        times.append(time.perf_counter() - start)
    batched = len(images) / min(times)
    entries.append(entry(group, "batched in-process (extract_batch, 8 per call)", round(batched, 2), "images/s", ref,
                         repeats=len(times), **summary(times), note="decoded and prepared images in memory"))
    log.info("delf: one at a time %.1f images/s, batched %.1f images/s", one, batched)
    del images, prepared
    hand = "hand-written: decode in a thread pool ahead of extract_batch (8 per call)"
    start = time.perf_counter()
    handwritten(rows.paths, ex, threads, config.batch_size)
    seconds = time.perf_counter() - start
    entries.append(entry(group, hand, round(len(rows.paths) / seconds, 2), "images/s", images=len(rows.paths),
                         seconds=round(seconds, 3), note="reads and decodes the JPEGs: the reference of the Beam job"))
    log.info("delf: hand-written %.1f images/s", len(rows.paths) / seconds)

    jobs = {}
    for label, m in (("small", small), ("all", manifest)):
        record = extract(m, os.path.join(workdir, f"beam-{label}"), "delf", params, workers=1, threads=threads,
                         beam_args=offline_beam_args(workdir), force=True)
        jobs[label] = (record["counts"]["outputs"], record["seconds"])
    (n_small, t_small), (n_all, t_all) = jobs["small"], jobs["all"]
    entries.append(entry(group, "cairn extract --method delf (Beam job, whole)", round(n_all / t_all, 2),
                         "images/s", hand, note="reads and decodes the JPEGs too; pipeline start and model load "
                         "included", job_seconds=t_all, images=n_all))
    entries += startup_excluded(group, "cairn extract --method delf, start-up excluded (estimate)", n_all, t_all,
                                (n_small, t_small), hand)
    log.info("delf: Beam job %.1f images/s (%d in %.1f s)", n_all / t_all, n_all, t_all)
    if not quick:
        entries += _whole_job(group, params, rows, ex, workdir, threads, WHOLE_COPIES, (n_small, t_small))

    out = os.path.join(workdir, "beam-all")
    prefix = features_prefix(out, "local")
    disk = sum(os.path.getsize(p) for p in find_shards(prefix))
    table, _ = read_shards(prefix, columns=["descriptors"])
    feats = sum(len(d) for d in table.column("descriptors").to_pylist())
    per_feature = 40 * 4 + 2 * 4 + 3 * 4  # descriptor, keypoint (x, y), scale, orientation, score
    entries.append(entry(group, "stored bytes per image (Parquet, zstd)", round(disk / n_all), "bytes",
                         better="lower", features_per_image=round(feats / n_all, 1),
                         note="local-features schema: 40-d float32 descriptors, keypoints, scales, scores"))
    entries.append(entry(group, "float32 bytes per image in memory", round(feats / n_all * per_feature), "bytes",
                         better="lower"))

    from features.local import local_features_from_table

    full, _ = read_shards(prefix)
    by_id = dict(zip(full.column("id").to_pylist(), local_features_from_table(full), strict=True))
    labels = dict(zip(rows.ids, rows.labels, strict=True))
    ids = list(by_id)
    rng = np.random.default_rng(0)
    pairs = [(ids[i], ids[j]) for i, j in rng.integers(0, len(ids), (60 if quick else 200, 2)) if i != j]
    vc = VerifyConfig()
    times, inliers = [], {True: [], False: []}
    for a, b in pairs:
        start = time.perf_counter()
        result = verify(by_id[a], by_id[b], vc)
        times.append(time.perf_counter() - start)
        inliers[labels[a] == labels[b]].append(result.inliers)
    entries.append(entry(group, "matching + RANSAC per image pair", round(1000 * float(np.median(times)), 3), "ms",
                         better="lower", pairs=len(times), mean_ms=round(1000 * float(np.mean(times)), 3),
                         median_inliers_same_landmark=float(np.median(inliers[True])) if inliers[True] else None,
                         median_inliers_other_landmark=float(np.median(inliers[False])) if inliers[False] else None,
                         note="exact FAISS matching with the ratio test + MAGSAC++ homography (features/verify.py)"))
    log.info("delf: %d pairs, median %.1f ms", len(times), 1000 * float(np.median(times)))
    return entries
