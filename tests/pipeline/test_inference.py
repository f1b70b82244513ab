"""The RunInference model handler with a fake model inside a Beam TestPipeline (pipeline/stages/inference.py)."""

from __future__ import annotations

import csv
import pickle

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
    assert handler.batch_elements_kwargs() == {"min_batch_size": 4, "max_batch_size": 4}  # full batches


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


def _rows_with_failures(tmp_path, tiny_synth) -> list[dict]:
    rows = [{"id": r["id"], "path": str(tiny_synth / r["path"]), "landmark_id": int(r["landmark_id"] or 0)}
            for r in csv.DictReader(open(tiny_synth / "train.csv"))]
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rows.insert(3, {"id": "missing", "path": str(tmp_path / "nope.jpg"), "landmark_id": 1})
    rows.insert(7, {"id": "corrupt", "path": str(tmp_path / "corrupt.jpg"), "landmark_id": 1})
    return rows


def _slow_resize(image):
    """resize_square to 32 px after a pause: the image just submitted is never ready when process() returns."""
    import time

    from features.cnn import resize_square

    time.sleep(0.05)
    return resize_square(image, 32)


def test_prepare_images_ahead_in_a_pool_hands_on_every_row_in_order(tmp_path, tiny_synth):
    """Issue 25: decoding in a thread pool ahead of inference hands on what one-at-a-time decoding does, in the
    same order, the last ones of a bundle from finish_bundle (as windowed values, as Beam requires there)."""
    from apache_beam.utils.windowed_value import WindowedValue

    from pipeline.stages.inference import DEAD, PrepareImages

    rows = _rows_with_failures(tmp_path, tiny_synth)

    def run(fn):
        fn.setup()
        fn.start_bundle()
        out = [o for row in rows for o in fn.process(row)]
        during = len(out)
        out += list(fn.finish_bundle())
        fn.teardown()
        unwrapped = []
        for o in out:
            if isinstance(o, beam.pvalue.TaggedOutput):
                value = o.value.value if isinstance(o.value, WindowedValue) else o.value
                unwrapped.append((o.tag, value.id, value.stage))
            else:
                value = o.value if isinstance(o, WindowedValue) else o
                unwrapped.append(("images", value[0][0], value[1].tobytes()))
        return unwrapped, during, out

    one_at_a_time, during, _ = run(PrepareImages(32, DecodeConfig()))
    assert during == len(rows)
    ahead, during, raw = run(PrepareImages(_slow_resize, DecodeConfig(), threads=3, prefetch=4))
    assert ahead == one_at_a_time
    assert [t[1] for t in ahead] == [r["id"] for r in rows]
    assert ("DEAD", "missing", "read") not in ahead and (DEAD, "missing", "read") in ahead
    assert (DEAD, "corrupt", "decode") in ahead
    assert during < len(rows) and all(isinstance(o.value if isinstance(o, beam.pvalue.TaggedOutput) else o,
                                                 WindowedValue) for o in raw[during:])


def test_prepare_images_ahead_in_a_beam_pipeline(tmp_path, tiny_synth):
    from pipeline.stages.inference import DEAD, PrepareImages

    rows = _rows_with_failures(tmp_path, tiny_synth)
    one = PrepareImages(32, DecodeConfig())
    expected = [one._prepare(r) for r in rows]
    images = [(k[0], v.tobytes()) for k, v in expected if k is not None]
    with BeamTestPipeline(argv=["--runner=DirectRunner"]) as p:
        prepared = p | beam.Create(rows) | beam.ParDo(PrepareImages(32, DecodeConfig(), threads=2, prefetch=3)
                                                      ).with_outputs(DEAD, main="images")
        assert_that(prepared.images | beam.Map(lambda kv: (kv[0][0], kv[1].tobytes())), equal_to(images),
                    label="images")
        assert_that(prepared[DEAD] | beam.Map(lambda d: (d.id, d.stage)),
                    equal_to([("missing", "read"), ("corrupt", "decode")]), label="dead")


LOADS = []


def counting_factory(params, threads):
    LOADS.append(params["model"])
    return FakeModel()


def test_shared_models_hold_every_role_until_released_and_reload_on_other_params():
    """A stage's detector and embedder (two roles, one fused stage) both stay loaded between stages of a run,
    whatever else the process acquires through Beam's Shared meanwhile; other params take the role's place."""
    import gc

    from apache_beam.utils.shared import Shared

    from pipeline.stages.inference import SharedModels

    loads = LOADS
    loads.clear()
    factory = counting_factory
    models = SharedModels()
    handlers = [EmbeddingModelHandler({"model": role}, factory=factory, shared=models.handle(role))
                for role in ("detector", "embed")]
    first = [id(h.load_model()) for h in handlers]  # the first stage ends: nothing of it holds the models
    Shared().acquire(lambda: FakeModel())  # displaces Beam's one kept-alive object, as RunInference's setup does
    gc.collect()
    again = [pickle.loads(pickle.dumps(h)).load_model() for h in handlers]  # as the next stage's workers do
    assert loads == ["detector", "embed"] and [id(m) for m in again] == first

    other = EmbeddingModelHandler({"model": "embed", "v": 2}, factory=factory, shared=models.handle("embed"))
    assert other.load_model() is not again[1] and loads[-1] == "embed" and len(loads) == 3
    models.release()
    assert handlers[0].load_model() is not again[0] and len(loads) == 4
    models.release()  # nothing of this test stays in the process
