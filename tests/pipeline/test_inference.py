"""The RunInference model handler with a fake model inside a Beam TestPipeline (pipeline/stages/inference.py)."""

from __future__ import annotations

import csv

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.images import DecodeConfig
from pipeline.stages.inference import EmbeddingModelHandler, EmbedImages


class FakeModel:
    """Mean colour of each image as a 3-d 'embedding'; fails on any batch holding an all-black image."""

    def embed(self, xb: np.ndarray) -> np.ndarray:
        assert xb.ndim == 4 and xb.shape[1:] == (32, 32, 3) and xb.dtype == np.uint8
        if np.any(xb.reshape(len(xb), -1).max(axis=1) == 0):
            raise RuntimeError("black image")
        return xb.reshape(len(xb), -1, 3).mean(axis=1).astype(np.float32)


def fake_factory(params, threads):
    assert params == {"model": "fake"}
    return FakeModel()


def test_handler_batches_and_returns_one_result_per_image():
    handler = EmbeddingModelHandler({"model": "fake"}, batch_size=4, factory=fake_factory)
    model = handler.load_model()
    batch = [np.full((32, 32, 3), v, np.uint8) for v in (10, 20, 30)]
    results = list(handler.run_inference(batch, model))
    assert [float(r.inference[0]) for r in results] == [10.0, 20.0, 30.0]
    assert handler.batch_elements_kwargs() == {"min_batch_size": 1, "max_batch_size": 4}


def test_embed_images_in_a_test_pipeline(tmp_path, tiny_synth):
    from PIL import Image

    rows = [{"id": r["id"], "path": str(tiny_synth / r["path"]), "landmark_id": int(r["landmark_id"])}
            for r in csv.DictReader(open(tiny_synth / "train.csv")) if r["landmark_id"]][:6]
    black = tmp_path / "black.png"
    Image.new("RGB", (40, 40)).save(black)
    rows += [{"id": "missing", "path": str(tmp_path / "nope.jpg"), "landmark_id": 1},
             {"id": "black", "path": str(black), "landmark_id": 2}]
    expected = {}
    for r in rows[:6]:
        import cv2

        from pipeline.images import load_image

        img = cv2.resize(load_image(r["path"]), (32, 32), interpolation=cv2.INTER_AREA)
        expected[r["id"]] = img.reshape(-1, 3).mean(axis=0)
    handler = EmbeddingModelHandler({"model": "fake"}, batch_size=1, factory=fake_factory)
    with BeamTestPipeline(argv=["--runner=DirectRunner"]) as p:
        features, dead = (p | beam.Create(rows) | EmbedImages(handler, 32, 3, DecodeConfig()))
        got = features | beam.Map(lambda row: (row["id"], row["landmark_id"], tuple(np.round(row["vector"], 3))))
        assert_that(got, equal_to([(k, rows[i]["landmark_id"], tuple(np.round(v, 3).astype(np.float32)))
                                   for i, (k, v) in enumerate(expected.items())]), label="features")
        assert_that(dead | beam.Map(lambda d: (d.id, d.stage)),
                    equal_to([("missing", "read"), ("black", "extract")]), label="dead")
