"""cnn-pretrained end to end through `cairn compare`, with PCA-whitening of the embeddings (pipeline/run/recipes.py
embeddings). The fine-tuned methods run in tests/jobs/test_cli.py's demo test."""

from __future__ import annotations

import json

import pytest

from features.backbones import BackboneConfig
from features.embedding import HeadConfig, build_embedding_model, model_metadata, save_embedding_model
from pipeline.run.compare import compare
from pipeline.run.settings import parse_overrides
from tests.conftest import side
from tests.jobs.test_compare import KEYS, flat


@pytest.mark.slow
def test_cnn_pretrained_with_pca_whitening(tmp_path, tiny_synth, caplog):
    import logging

    backbone, head = BackboneConfig("mobilenet_v2"), HeadConfig(dim=16)
    model = str(tmp_path / "frozen.keras")
    save_embedding_model(build_embedding_model(backbone, head), model, model_metadata(backbone, head, 48))
    config = parse_overrides([f"cnn_pretrained.model={model}", "cnn_pretrained.pca_dim=4",
                              "cnn_pretrained.pca_min_images=0"])
    out = tmp_path / "run"
    metrics = compare(str(tiny_synth / "train.csv"), str(tiny_synth / "queries.csv"), str(out),
                      ["cnn-pretrained"], config=config)
    m = flat(metrics["methods"]["cnn-pretrained"])
    assert KEYS == set(m) and m["dim"] == 4 and m["bytes_per_image"] == 16 and m["train_seconds"] >= 0
    assert (out / "work" / "cnn-pretrained" / "pca-model" / "encoder.npz").is_file()  # learned on the database
    extract = json.loads((side(out / "work" / "cnn-pretrained" / "embeddings" / "train") / "extract.json").read_text())
    assert extract["config"]["extractor"]["model"]["dim"] == 16 and extract["counts"]["outputs"] == 20
    # a rerun with the same config reuses the embeddings; another model file is a new config
    with caplog.at_level(logging.INFO):
        compare(str(tiny_synth / "train.csv"), str(tiny_synth / "queries.csv"), str(out), ["cnn-pretrained"],
                config=config)
    assert "reusing" in caplog.text
    save_embedding_model(build_embedding_model(backbone, HeadConfig(dim=8)), model,
                         model_metadata(backbone, HeadConfig(dim=8), 48))
    caplog.clear()
    again = compare(str(tiny_synth / "train.csv"), str(tiny_synth / "queries.csv"), str(out), ["cnn-pretrained"],
                    config=parse_overrides([f"cnn_pretrained.model={model}"]))
    assert again["methods"]["cnn-pretrained"]["cost"]["dim"] == 8
