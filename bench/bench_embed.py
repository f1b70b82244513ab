"""Benchmark "embed": CNN embedding throughput in the Beam job vs hand-written loops, and training steps.

Per model (ResNet50 and MobileNetV2 with a GeM head at 224 px, random weights: speed does not depend on the
weights; and cnn-pretrained, the ImageNet MobileNet TFLite of ../shared/weights, when it is there), on 512
640x480 JPEGs:
  - reference: the best loop a user would write by hand for the same work: read + decode + resize in a pool of
    as many threads as the model has (``ThreadPoolExecutor.map``, every image submitted at once, so decoding
    runs ahead of the model), then the extractor's ``embed`` on batches of 32, model loaded beforehand;
  - the model alone on prepared batches (``embed``, images decoded and resized beforehand): the ceiling;
  - the same model through `cairn extract --method cnn` (Beam DirectRunner, one in-process worker, RunInference
    with batches of up to 32), which reads, decodes and resizes every JPEG ahead of the model in a pool
    (pipeline/stages/inference.py). Run on all images and on the first 32, so that the fixed start-up
    (pipeline, TensorFlow, model load) can be separated from the per-image cost. Its vectors are compared with
    the reference's (largest absolute difference). Each run is the best of 2 (the difference of two job times
    moves by a quarter between single runs on this machine);
  - the whole job, start-up and model load included, on 2,048 images (the 512 four times over, each its own id)
    against the hand-written loop on the same list (every model; ResNet50's takes about four minutes), and from
    the same run the start-up-excluded estimate with N = 2,048, four times the signal of the 512-image one;
  - a training step (batch 16, ArcFace head, backbone trainable) of models/finetune.py, median over steps
    after the first.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from bench.common import ROOT, entry, offline_beam_args, skipped, summary

log = logging.getLogger(__name__)

NAME = "embed"
TITLE = "CNN embeddings: Beam RunInference job vs the model called directly; fine-tuning step time"
DESCRIPTION = __doc__.split("\n", 2)[2].strip()
BACKBONES = ("resnet50", "mobilenet_v2")
SIZE = 224
BATCH = 32
WHOLE_COPIES = 4  # the whole-job figure runs on the 512 images 4 times over (2,048 rows), start-up included


def _images(folder: str, n: int, seed: int = 3) -> str:
    """``n`` 640x480 JPEGs of a synthetic landmark set and a manifest of them."""
    from pipeline.stages.synth import synth
    from pipeline.synthetic import SynthConfig

    per_class = 8
    synth(folder, SynthConfig(seed=seed, classes=max(2, n // per_class), views=per_class, tail=0.0,
                              min_views=per_class, queries_per_class=1, non_landmark_queries=0, non_landmark_train=0,
                              width=640, height=480))
    return os.path.join(folder, "train.csv")


def handwritten(paths: list[str], extractor, threads: int, batch: int = BATCH) -> np.ndarray:
    """The hand-written reference: decode + resize in a pool of ``threads`` threads, every image submitted at
    once (the pool decodes ahead while the model runs), the model on batches of ``batch``; [N, dim] vectors."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.images import load_image

    out, buf = [], []
    with ThreadPoolExecutor(threads) as pool:
        for image in pool.map(lambda p: extractor.prepare(load_image(p)), paths):
            buf.append(image)
            if len(buf) == batch:
                out.append(extractor.embed(np.stack(buf)))
                buf = []
    if buf:
        out.append(extractor.embed(np.stack(buf)))
    return np.concatenate(out)


def _job_vectors(folder: str, ids: list[str]) -> np.ndarray:
    from pipeline.parquet_io import read_shards
    from pipeline.schemas import vectors_of

    table, _ = read_shards(os.path.join(folder, "features"))
    row = {i: r for r, i in enumerate(table.column("id").to_pylist())}
    return vectors_of(table)[[row[i] for i in ids]]


def _model_entries(group: str, params: dict, rows, manifest: str, small: str, workdir: str, label: str,
                   threads: int, whole: int = 0) -> list[dict]:
    """The reference, the model alone, and the Beam job (whole and start-up excluded) for one model."""
    from features.cnn import CnnConfig, CnnExtractor
    from pipeline.images import load_image
    from pipeline.stages.extract import extract

    ref = "hand-written: decode + resize in a thread pool ahead of the model"
    extractor = CnnExtractor(CnnConfig(**params), threads=threads)
    extractor.embed(np.stack([extractor.prepare(load_image(rows.paths[0]))] * BATCH))  # warm-up (graph tracing)
    times, vectors = [], None
    for _ in range(2):
        start = time.perf_counter()
        vectors = handwritten(rows.paths, extractor, threads)
        times.append(time.perf_counter() - start)
    reference = len(rows.paths) / min(times)
    entries = [entry(group, ref, round(reference, 2), "images/s", repeats=len(times), images=len(rows.paths),
                     **summary(times))]
    xb = np.stack([extractor.prepare(load_image(p)) for p in rows.paths])
    batches = [xb[i:i + BATCH] for i in range(0, len(xb), BATCH)]
    times = []
    for _ in range(2):
        start = time.perf_counter()
        for b in batches:
            extractor.embed(b)
        times.append(time.perf_counter() - start)
    entries.append(entry(group, "the model alone on prepared batches (no decoding)", round(len(xb) / min(times), 2),
                         "images/s", ref, repeats=len(times), **summary(times)))
    log.info("embed %s: hand-written %.1f images/s, model alone %.1f", label, reference, len(xb) / min(times))
    jobs = {}
    for size, m in (("small", small), ("all", manifest), ("small", small), ("all", manifest)):  # best of 2 each
        out = os.path.join(workdir, f"beam-{label}-{size}")
        record = extract(m, out, "cnn", {**params, "batch_size": BATCH}, workers=1, threads=threads,
                         beam_args=offline_beam_args(workdir), force=True)
        if size not in jobs or record["seconds"] < jobs[size][1]:
            jobs[size] = (record["counts"]["outputs"], record["seconds"], out)
    (n_small, t_small, _), (n_all, t_all, out) = jobs["small"], jobs["all"]
    difference = float(np.abs(_job_vectors(out, list(rows.ids)) - vectors).max())
    entries.append(entry(group, "cairn extract --method cnn (Beam job, whole)", round(n_all / t_all, 2), "images/s",
                         ref, note="pipeline start and model load included", job_seconds=t_all, images=n_all,
                         max_abs_difference_from_reference=difference))
    entries += startup_excluded(group, "cairn extract --method cnn, start-up excluded (estimate)", n_all, t_all,
                                (n_small, t_small), ref)
    entries.append(entry(group, "largest difference of a vector component, job vs reference", f"{difference:.1e}",
                         "", better="", note="the job's vectors are the reference's"))
    log.info("embed %s: Beam job %.1f images/s (%d in %.1f s, %d in %.1f s); vectors differ by at most %.1e", label,
             n_all / t_all, n_all, t_all, n_small, t_small, difference)
    if whole:
        entries += _whole_job(group, params, rows, extractor, workdir, label, threads, whole, (n_small, t_small))
    return entries


def startup_excluded(group: str, what: str, n: int, seconds: float, small: tuple[int, float], ref: str) -> list[dict]:
    """The start-up-excluded estimate (N - n) / (T_N - T_n) of a job of ``n`` images in ``seconds`` against
    the small job ``small`` = (n, T_n) (job times from the records, both), as an entry against ``ref``."""
    n_small, t_small = small
    if seconds <= t_small:
        return []
    steady = (n - n_small) / (seconds - t_small)
    return [entry(group, what, round(steady, 2), "images/s", ref,
                  note=f"(N - {n_small}) / (T_N - T_{n_small}) with N = {n:,}: the per-image cost once the pipeline "
                  "runs", job_seconds=round(seconds, 3), fixed_seconds=round(t_small - n_small / steady, 3))]


def copies_manifest(rows, copies: int, path: str) -> tuple[str, list[str]]:
    """A manifest at ``path`` listing the manifest ``rows``' images ``copies`` times over, each copy its own id
    (ID-K); returns it and its image paths in order (the hand-written loop's list)."""
    with open(path, "w") as f:
        f.write("id,path,landmark_id\n")
        f.writelines(f"{i}-{k},{p},{'' if y is None else y}\n" for k in range(copies) for i, p, y in rows.records())
    return path, list(rows.paths) * copies


def _whole_job(group: str, params: dict, rows, extractor, workdir: str, label: str, threads: int,
               copies: int, small: tuple[int, float]) -> list[dict]:
    """The whole job, start-up included, on ``copies`` times the images (each copy its own ids; the same files)
    against the hand-written loop on the same list (its model already loaded); and from the same run, the
    start-up-excluded estimate against the ``small`` job (images, seconds)."""
    from pipeline.stages.extract import extract

    manifest, paths = copies_manifest(rows, copies, os.path.join(workdir, "data", "whole.csv"))
    start = time.perf_counter()
    handwritten(paths, extractor, threads)
    hand = time.perf_counter() - start
    ref = f"hand-written on {len(paths):,} images"
    start = time.perf_counter()
    record = extract(manifest, os.path.join(workdir, f"beam-{label}-whole"), "cnn", {**params, "batch_size": BATCH},
                     workers=1, threads=threads, beam_args=offline_beam_args(workdir), force=True)
    job = time.perf_counter() - start
    log.info("embed %s: %d images, hand-written %.1f s, whole Beam job %.1f s", label, len(paths), hand, job)
    return [entry(group, ref, round(len(paths) / hand, 2), "images/s", images=len(paths), seconds=round(hand, 3),
                  note="model loaded beforehand"),
            entry(group, f"cairn extract on {len(paths):,} images, whole", round(len(paths) / job, 2), "images/s", ref,
                  note="the extract() call, start-up and model load included", seconds=round(job, 3)),
            *startup_excluded(group, f"cairn extract on {len(paths):,} images, start-up excluded (estimate)",
                              record["counts"]["outputs"], record["seconds"], small, ref)]


def run(workdir: str, quick: bool) -> list[dict]:
    from features.backbones import BackboneConfig
    from features.embedding import HeadConfig, build_embedding_model, model_metadata, save_embedding_model
    from models.finetune import FinetuneConfig, finetune
    from pipeline.manifest import read_manifest
    from pipeline.resources import limit_threads

    threads = os.cpu_count() or 1
    limit_threads(threads)
    n = 96 if quick else 512
    manifest = _images(os.path.join(workdir, "data"), n)
    rows = read_manifest(manifest)
    small = os.path.join(workdir, "data", "small.csv")
    with open(manifest) as f, open(small, "w") as g:
        g.writelines(line for i, line in enumerate(f) if i <= 32)  # header + the first 32 images
    entries = []
    for name in BACKBONES:
        group = f"{name} at {SIZE} px, {threads} threads"
        backbone, head = BackboneConfig(name), HeadConfig(dim=0)
        path = os.path.join(workdir, f"{name}.keras")
        save_embedding_model(build_embedding_model(backbone, head), path, model_metadata(backbone, head, SIZE))
        entries += _model_entries(group, {"model": path}, rows, manifest, small, workdir, name, threads,
                                  0 if quick else WHOLE_COPIES)

        steps = 3 if quick else 5
        config = FinetuneConfig(backbone=backbone, head=HeadConfig(dim=512), input_size=SIZE, epochs=1,
                                head_epochs=0, steps_per_epoch=steps, batch_size=16, validation_fraction=0.0,
                                patience=0)
        trained = finetune(list(rows.records()), os.path.join(workdir, f"train-{name}"), config)
        entries.append(entry(group, "fine-tuning step (batch 16, ArcFace, backbone trainable)",
                             trained["step_seconds"], "s", better="lower", steps=steps,
                             images_per_second=trained["train_images_per_second"]))
        log.info("embed %s: training step %.2f s", name, trained["step_seconds"])
    tflite = os.path.join(ROOT, "..", "shared", "weights", "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite")
    group = f"cnn-pretrained (ImageNet MobileNet v1 TFLite) at 224 px, {threads} threads"
    if os.path.exists(tflite):
        entries += _model_entries(group, {"model": os.path.normpath(tflite)}, rows, manifest, small, workdir,
                                  "cnn-pretrained", threads, 0 if quick else WHOLE_COPIES)
    else:
        entries.append(skipped(group, "cnn-pretrained", f"{tflite} is not there (../shared is absent)"))
    return entries
