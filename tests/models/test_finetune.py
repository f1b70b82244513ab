"""Fine-tuning: the input pipeline's pieces, and a tiny end-to-end run with export and resume (models/data.py,
models/finetune.py, pipeline/stages/train.py, cairn train --method cnn)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from features.backbones import BackboneConfig
from features.embedding import HeadConfig, load_embedding_model
from models.data import (
    AugmentConfig,
    ImageCache,
    augment,
    balanced_sampler,
    build_cache,
    class_sampling_weights,
)
from models.finetune import FinetuneConfig, split_validation


def test_class_sampling_weights_hand_computed():
    labels = np.array([0, 0, 0, 0, 1])  # class 0: 4 images, class 1: 1 image
    p = class_sampling_weights(labels, 0.5)
    # image weight n_c ** -0.5: 0.5 for class 0's images, 1 for class 1's; class shares 2 : 1
    np.testing.assert_allclose(p, np.array([0.5, 0.5, 0.5, 0.5, 1.0]) / 3.0)
    np.testing.assert_allclose(class_sampling_weights(labels, 0.0), np.full(5, 0.2))  # by image
    np.testing.assert_allclose(class_sampling_weights(labels, 1.0)[labels == 1].sum(), 0.5)  # by class


def test_balanced_sampler_draws_the_tail_more_often():
    labels = np.array([0] * 90 + [1] * 10)
    draws = [label for _, (_, label) in zip(range(20_000), balanced_sampler(labels, 1.0, seed=0)(), strict=False)]
    share = np.mean(np.array(draws) == 1)
    assert 0.47 < share < 0.53  # observed 0.50; sampled by image it would be 0.10


def test_split_validation_keeps_a_training_image_of_every_class():
    labels = np.array([0] * 10 + [1] * 3 + [2])
    train, val = split_validation(labels, 0.3, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(14))
    assert set(labels[train]) == {0, 1, 2}  # class 2 (one image) never held out
    assert np.sum(labels[val] == 0) == 3 and np.sum(labels[val] == 1) == 1


def test_augment_gives_the_input_size_in_range():
    import tensorflow as tf

    image = tf.constant(np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8))
    out = augment(image, 48, AugmentConfig(flip=True)).numpy()
    assert out.shape == (48, 48, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255


def test_cache_turns_unreadable_images_into_dead_letters(tmp_path, tiny_synth):
    rows = [(r["id"], str(tiny_synth / r["path"]), 0) for r in csv.DictReader(open(tiny_synth / "train.csv"))][:3]
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    rows += [("bad", str(tmp_path / "bad.jpg"), 1), ("gone", str(tmp_path / "gone.jpg"), 1)]
    for mode in ("memory", "disk"):
        cache = build_cache(rows, 40, mode=mode, folder=str(tmp_path / "c"), threads=2, progress=False)
        assert isinstance(cache, ImageCache) and cache.ids == [r[0] for r in rows[:3]]
        assert {(d.id, d.stage) for d in cache.dead_letters} == {("bad", "decode"), ("gone", "read")}
        assert cache.images.shape == (3, 40, 40, 3) and np.asarray(cache.images[2]).std() > 0


def test_disk_cache_is_reused_only_for_the_same_images(tmp_path, tiny_synth, caplog):
    import logging

    rows = [(r["id"], str(tiny_synth / r["path"]), 0) for r in csv.DictReader(open(tiny_synth / "train.csv"))][:3]
    first = build_cache(rows, 32, mode="disk", folder=str(tmp_path), threads=1, progress=False)
    with caplog.at_level(logging.INFO):
        again = build_cache(rows, 32, mode="disk", folder=str(tmp_path), threads=1, progress=False)
    assert "reusing the decoded images" in caplog.text
    np.testing.assert_array_equal(np.asarray(first.images), np.asarray(again.images))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        other = build_cache(rows[:2], 32, mode="disk", folder=str(tmp_path), threads=1, progress=False)
    assert "reusing" not in caplog.text and other.images.shape[0] == 2


def test_checkpoints_of_another_run_are_discarded(tmp_path):
    from models.finetune import _checkpoints_for, _read_history

    (tmp_path / "history-stage1.csv").write_text("epoch,loss\n0,2.5\n1,2.0\n")
    (tmp_path / "history-stage2.csv").write_text("epoch,loss\n0,1.5\n")
    _checkpoints_for(str(tmp_path), {"config": 1})
    assert not (tmp_path / "history-stage1.csv").exists()  # made before any marker: not trusted
    (tmp_path / "history-stage1.csv").write_text("epoch,loss\n0,2.5\n1,2.0\n")
    (tmp_path / "history-stage2.csv").write_text("epoch,loss\n0,1.5\n")
    (tmp_path / "checkpoints" / "stage1.weights.h5").write_bytes(b"w")
    _checkpoints_for(str(tmp_path), {"config": 1})  # same run: kept (a resume)
    assert (tmp_path / "checkpoints" / "stage1.weights.h5").exists()
    assert _read_history(str(tmp_path)) == {"loss": [2.5, 2.0, 1.5]}
    _checkpoints_for(str(tmp_path), {"config": 2})  # another config: gone
    assert not (tmp_path / "checkpoints" / "stage1.weights.h5").exists()
    assert not (tmp_path / "history-stage2.csv").exists() and _read_history(str(tmp_path)) == {}


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="loss"):
        FinetuneConfig(loss="triplet")
    with pytest.raises(ValueError, match="balance"):
        FinetuneConfig(balance=2)
    with pytest.raises(ValueError, match="epochs"):
        FinetuneConfig(epochs=0, head_epochs=0)


TINY_FT = FinetuneConfig(backbone=BackboneConfig("mobilenet_v2"), head=HeadConfig(dim=16), input_size=48, epochs=1,
                         head_epochs=1, batch_size=8, validation_fraction=0.0, patience=0)


@pytest.mark.slow
def test_train_cnn_exports_models_and_resumes(tmp_path, tiny_synth, caplog):
    import dataclasses
    import logging

    from pipeline.parquet_io import read_shards
    from pipeline.run.settings import MethodsConfig
    from pipeline.run.trainers import train
    from pipeline.schemas import vectors_of
    from pipeline.stages.extract import extract

    config = dataclasses.replace(MethodsConfig(), cnn=dataclasses.replace(MethodsConfig().cnn, finetune=TINY_FT))
    out = tmp_path / "model"
    record = train("cnn", str(tiny_synth / "train.csv"), str(out), config)
    # the 4 known non-landmark images of the tiny set are not trained on
    assert record["classes"] == 4 and record["counts"] == {"inputs": 20, "used": 16, "unlabelled": 4,
                                                           "dead_letters": 0, "manifest_rejected": 0}
    assert record["epochs_run"] == 2 and record["mixed_precision"] is False and record["step_seconds"] > 0
    for name in ("model.keras", "untrained.keras", "train.json", "history-stage1.csv", "history-stage2.csv",
                 "dead_letters.csv", "checkpoints/stage1.weights.h5"):
        assert (out / name).exists(), name
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # TensorBoard
    model, meta = load_embedding_model(str(out / "model.keras"))
    assert meta["fine_tuned"] is True and meta["dim"] == 16 and meta["input_size"] == 48
    assert meta["classes"] == sorted({int(r["landmark_id"]) for r in csv.DictReader(open(tiny_synth / "train.csv"))
                                      if r["landmark_id"]})
    _, untrained = load_embedding_model(str(out / "untrained.keras"))
    assert untrained["fine_tuned"] is False

    # same config: reused; a run killed after stage 1 resumes from its checkpoint
    assert train("cnn", str(tiny_synth / "train.csv"), str(out), config)["artefact_sha256"] == \
        record["artefact_sha256"]
    (out / "train.json").unlink()
    with caplog.at_level(logging.INFO):
        train("cnn", str(tiny_synth / "train.csv"), str(out), config)
    assert "stage 1 already done" in caplog.text

    # the exported model through the Beam extraction job (RunInference)
    ex = extract(str(tiny_synth / "queries.csv"), str(tmp_path / "emb"), "cnn",
                 {"model": str(out / "model.keras"), "batch_size": 4})
    table, fmeta = read_shards(str(tmp_path / "emb" / "features"))
    assert ex["counts"]["outputs"] == table.num_rows == ex["counts"]["inputs"]
    xq = vectors_of(table)
    assert xq.shape == (table.num_rows, 16)
    np.testing.assert_allclose(np.linalg.norm(xq, axis=1), 1, rtol=1e-5)
    assert fmeta["method"] == "cnn" and fmeta["model"]["backbone"]["name"] == "mobilenet_v2"


def test_a_mixed_precision_model_is_exported_in_float32(tmp_path):
    from features.embedding import build_embedding_model
    from models.finetune import _dtype_policy, export

    config = FinetuneConfig(backbone=BackboneConfig("mobilenet_v2"), head=HeadConfig(dim=8), input_size=32)
    with _dtype_policy("mixed_float16"):
        mixed = build_embedding_model(config.backbone, config.head)
    assert mixed.get_layer("projection").compute_dtype == "float16"
    path = str(tmp_path / "model.keras")
    export(mixed, path, config, {"classes": [1, 2]})
    loaded, meta = load_embedding_model(path)
    assert loaded.get_layer("projection").compute_dtype == "float32" and meta["classes"] == [1, 2]
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(mixed(x)), atol=0.05)  # float16 vs float32


@pytest.mark.slow
def test_softmax_head_with_validation_and_early_stopping(tmp_path, tiny_synth):
    import dataclasses

    from models.finetune import finetune
    from pipeline.manifest import read_manifest

    config = dataclasses.replace(TINY_FT, loss="softmax", epochs=3, head_epochs=0, validation_fraction=0.5,
                                 patience=1, cache="disk")
    record = finetune(list(read_manifest(str(tiny_synth / "train.csv")).records()), str(tmp_path), config)
    assert record["validation_images"] == 8 and record["train_images"] == 8  # 2 of each class's 4 held out
    assert 1 <= record["epochs_run"] <= 3 and len(record["history"]["val_loss"]) == record["epochs_run"]
    _, meta = load_embedding_model(str(tmp_path / "model.keras"))
    assert meta["training"]["head"] == "softmax" and "val_loss" in meta["training"] and "loss" in meta["training"]


def test_tensorboard_shows_both_stages_on_one_axis_with_validation(tmp_path, tiny_synth):
    """Stage 2 used to start its own step axis at 0 in its own folder: TensorBoard drew the two stages on top of
    each other. Now one run per kind (train, validation) and one axis of epochs."""
    import dataclasses

    from models.finetune import finetune
    from pipeline.manifest import read_manifest
    from tests.conftest import tensorboard_scalars

    config = dataclasses.replace(TINY_FT, loss="softmax", head_epochs=1, epochs=2, validation_fraction=0.5,
                                 patience=0)
    finetune(list(read_manifest(str(tiny_synth / "train.csv")).records()), str(tmp_path), config)
    runs = tensorboard_scalars(tmp_path / "logs")
    assert sorted(runs) == ["train", "validation"]
    assert sorted(runs["train"]["epoch_loss"]) == [0, 1, 2]
    assert sorted(runs["validation"]["epoch_loss"]) == [0, 1, 2]


def test_disk_cache_is_decoded_again_when_an_image_changed_in_place(tmp_path, tiny_synth, caplog):
    """Issue 23 item 2: the decoded-image cache is keyed on each file's size and modification time too."""
    import logging
    import os
    import shutil

    rows = []
    for r in list(csv.DictReader(open(tiny_synth / "train.csv")))[:2]:
        shutil.copy(tiny_synth / r["path"], tmp_path / f"{r['id']}.jpg")
        rows.append((r["id"], str(tmp_path / f"{r['id']}.jpg"), 0))
    first = build_cache(rows, 32, mode="disk", folder=str(tmp_path / "c"), threads=1, progress=False)
    first = np.array(first.images)
    shutil.copy(rows[1][1], rows[0][1])
    os.utime(rows[0][1], ns=(0, os.stat(rows[0][1]).st_mtime_ns + 10**9))
    with caplog.at_level(logging.INFO):
        again = build_cache(rows, 32, mode="disk", folder=str(tmp_path / "c"), threads=1, progress=False)
    assert "reusing" not in caplog.text
    np.testing.assert_array_equal(np.asarray(again.images[0]), first[1])
