"""Benchmark "embed": CNN embedding throughput in the Beam job vs the model called directly, and training steps.

Per backbone (ResNet50, MobileNetV2; GeM head, 224 px, random weights: speed does not depend on the weights):
  - reference: the exported model called directly on prepared batches of 32 (`model.predict_on_batch`), the
    images already decoded and resized, with the same thread count;
  - the same model through `cairn extract --method cnn` (Beam DirectRunner, one in-process worker, RunInference
    with batches of up to 32), which also reads, decodes and resizes every JPEG: the ratio is what the job
    costs over bare inference. Run on all images and on the first 32, so that the fixed start-up (pipeline,
    TensorFlow, model load) can be separated from the per-image cost;
  - a training step (batch 16, ArcFace head, backbone trainable) of models/finetune.py, median over steps
    after the first.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from bench.common import entry, offline_beam_args, summary

log = logging.getLogger(__name__)

NAME = "embed"
TITLE = "CNN embeddings: Beam RunInference job vs the model called directly; fine-tuning step time"
DESCRIPTION = __doc__.split("\n", 2)[2].strip()
BACKBONES = ("resnet50", "mobilenet_v2")
SIZE = 224
BATCH = 32


def _images(folder: str, n: int, seed: int = 3) -> str:
    """``n`` 640x480 JPEGs of a synthetic landmark set and a manifest of them."""
    from pipeline.stages.synth import synth
    from pipeline.synthetic import SynthConfig

    per_class = 8
    synth(folder, SynthConfig(seed=seed, classes=max(2, n // per_class), views=per_class, tail=0.0,
                              min_views=per_class, queries_per_class=1, non_landmark_queries=0, non_landmark_train=0,
                              width=640, height=480))
    return os.path.join(folder, "train.csv")


def run(workdir: str, quick: bool) -> list[dict]:
    import keras

    from features.backbones import BackboneConfig
    from features.cnn import resize_square
    from features.embedding import HeadConfig, build_embedding_model, model_metadata, save_embedding_model
    from models.finetune import FinetuneConfig, finetune
    from pipeline.images import load_image
    from pipeline.manifest import read_manifest
    from pipeline.resources import limit_threads
    from pipeline.stages.extract import extract

    threads = os.cpu_count() or 1
    limit_threads(threads)
    n = 96 if quick else 256
    manifest = _images(os.path.join(workdir, "data"), n)
    rows = read_manifest(manifest)
    small = os.path.join(workdir, "data", "small.csv")
    with open(manifest) as f, open(small, "w") as g:
        g.writelines(line for i, line in enumerate(f) if i <= 32)  # header + the first 32 images
    entries = []
    xb = np.stack([resize_square(load_image(p), SIZE) for p in rows.paths])  # what the job's Prepare step does
    for name in BACKBONES:
        group = f"{name} at {SIZE} px, {threads} threads"
        backbone, head = BackboneConfig(name), HeadConfig(dim=0)
        path = os.path.join(workdir, f"{name}.keras")
        save_embedding_model(build_embedding_model(backbone, head), path, model_metadata(backbone, head, SIZE))
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
        batches = [xb[i:i + BATCH].astype(np.float32) for i in range(0, len(xb), BATCH)]
        model.predict_on_batch(batches[0])  # warm-up (graph tracing)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            for b in batches:
                model.predict_on_batch(b)
            times.append(time.perf_counter() - start)
        direct = len(xb) / min(times)
        entries.append(entry(group, "model.predict_on_batch (prepared batches)", round(direct, 2), "images/s",
                             repeats=len(times), images=len(xb), **summary(times)))
        log.info("embed %s: direct %.1f images/s", name, direct)
        jobs = {}
        for label, m in (("small", small), ("all", manifest)):
            record = extract(m, os.path.join(workdir, f"beam-{name}-{label}"), "cnn",
                             {"model": path, "batch_size": BATCH}, workers=1, threads=threads,
                             beam_args=offline_beam_args(workdir), force=True)
            jobs[label] = (record["counts"]["outputs"], record["seconds"])
        (n_small, t_small), (n_all, t_all) = jobs["small"], jobs["all"]
        beam_rate = n_all / t_all
        ref = "model.predict_on_batch (prepared batches)"
        entries.append(entry(group, "cairn extract --method cnn (Beam job, whole)", round(beam_rate, 2), "images/s",
                             ref, note="reads, decodes and resizes 640x480 JPEGs; pipeline start and model load "
                             "included", job_seconds=t_all, images=n_all))
        if t_all > t_small:
            steady = (n_all - n_small) / (t_all - t_small)
            entries.append(entry(group, "cairn extract --method cnn, start-up excluded (estimate)", round(steady, 2),
                                 "images/s", ref, note=f"(N - {n_small}) / (T_N - T_{n_small}): the per-image "
                                 "cost once the pipeline runs", fixed_seconds=round(t_small - n_small / steady, 3)))
        log.info("embed %s: Beam job %.1f images/s (%d in %.1f s, %d in %.1f s)", name, beam_rate, n_all, t_all,
                 n_small, t_small)

        steps = 3 if quick else 5
        config = FinetuneConfig(backbone=backbone, head=HeadConfig(dim=512), input_size=SIZE, epochs=1,
                                head_epochs=0, steps_per_epoch=steps, batch_size=16, validation_fraction=0.0,
                                patience=0)
        trained = finetune(list(rows.records()), os.path.join(workdir, f"train-{name}"), config)
        entries.append(entry(group, "fine-tuning step (batch 16, ArcFace, backbone trainable)",
                             trained["step_seconds"], "s", better="lower", steps=steps,
                             images_per_second=trained["train_images_per_second"]))
        log.info("embed %s: training step %.2f s", name, trained["step_seconds"])
    return entries
