"""Batched CNN inference in Beam: a RunInference model handler for Cairn's embedding models.

    rows -> PrepareImages (decode + resize in a thread pool, ahead of inference; dead letters)
         -> ((id, landmark_id, path), [S, S, 3] uint8)
         -> RunInference(KeyedModelHandler(EmbeddingModelHandler)) -> ((id, landmark_id, path), PredictionResult)
         -> {"id", "landmark_id", "vector"} rows for the global-features Parquet schema

The handler follows Beam's split: ``load_model`` builds the extractor (features/cnn.py) once per worker, with
its thread limits, and ``run_inference(batch, model)`` is side-effect free: a list of prepared images in, one
PredictionResult per image out. Beam batches the elements (``batch_size`` per call). Beam's own TensorFlow
handlers need extra packages (tfx-bsl) and know nothing of TFLite or of Cairn's metadata, hence this one.
A batch whose inference raises becomes one dead letter per image (``with_exception_handling``).

Decoding overlaps inference: PrepareImages decodes and resizes in a pool of ``threads`` threads (JPEG decoding
and OpenCV resizing release the GIL), up to ``prefetch`` images ahead of the one it hands on, so that while
RunInference runs a batch (it runs in the same fused stage, on the same thread as PrepareImages' ``process``)
the pool prepares the next. Elements leave in the order they came; a bundle's last ones leave in
``finish_bundle``.
"""

from __future__ import annotations

import collections
import json
import threading
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from features.cnn import CnnConfig, CnnExtractor, resize_square
from features.delf import DelfConfig, DelfExtractor
from features.detect import DetectConfig, make_detector, regions_of
from features.local import local_features_table
from pipeline.errors import DeadLetter
from pipeline.images import DecodeConfig, ImageError, load_image
from pipeline.resources import limit_threads, quiet_native_start_up
from pipeline.stages.transforms import DEAD, NAMESPACE, at_bundle_end


def config_params(params: dict) -> dict:
    """Config fields that went through JSON (lists) back as the tuples the frozen dataclasses hold."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}


def _batch_error(error) -> str:
    """The message of a RunInference failure (Beam hands over the exception, or a tuple holding it)."""
    if isinstance(error, (tuple, list)) and len(error) > 1:
        error = error[1]
    return f"inference failed: {error}"[:500]


class SharedModels:
    """The models of a run's stages, loaded once per process for all the stages given this object: the launcher
    makes it (extract_both: one for a method's database and query extractions) and each stage's handlers take a
    handle from it per role (a string, which travels pickled with the stage to the workers). A stage that runs in
    a process where an earlier one loaded the same model (same handler, params and threads) for the same handle
    gets that model, already warmed up, instead of loading and tracing it again; a model with other params is
    loaded anew and takes the old one's place.

    The process holds the models itself (``_HELD``), by strong reference, until ``release()`` (the launcher's
    ``with`` block) or the worker process ends. Beam's ``apache_beam.utils.shared`` was not enough: it keeps
    only the last object acquired in the process alive, and RunInference acquires a fresh one of its own in
    every setup (its model status), so that whether the model outlived the first stage depended on when Python's
    cycle collector last ran. Worker processes started for one stage share nothing with the next."""

    def __init__(self):
        self.handles: dict[str, str] = {}

    def handle(self, role: str) -> str:
        if role not in self.handles:
            self.handles[role] = f"{role}-{uuid.uuid4().hex}"
        return self.handles[role]

    def release(self):
        """Drop the models this object's stages loaded in this process (other processes keep theirs until they
        end)."""
        with _HELD_LOCK:
            for handle in self.handles.values():
                _HELD.pop(handle, None)
                _LOADING.pop(handle, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# SharedModels handle -> (identity of the model, model); the lock per handle makes a second thread wait for the
# model the first is loading rather than load its own
_HELD: dict[str, tuple[str, object]] = {}
_HELD_LOCK = threading.Lock()
_LOADING: dict[str, threading.Lock] = {}


def _acquire(handle: str, identity: str, load):
    with _HELD_LOCK:
        lock = _LOADING.setdefault(handle, threading.Lock())
    with lock:
        with _HELD_LOCK:
            held = _HELD.get(handle)
        if held is not None and held[0] == identity:
            return held[1]
        with _HELD_LOCK:  # the old model goes before the new one loads
            _HELD.pop(handle, None)
        model = load()
        with _HELD_LOCK:
            _HELD[handle] = (identity, model)
        return model


class _BatchedHandler(ModelHandler):
    """What Cairn's handlers share: the params of the model object, its thread limits, the batch size, an optional
    ``factory(params, threads)`` (for tests) in place of the subclass's ``build()``, and an optional handle
    of a SharedModels through which the model is acquired."""

    namespace = "cairn"

    def __init__(self, params: dict, threads: int = 1, batch_size: int = 32, factory=None, shared: str | None = None):
        super().__init__()
        self.params = dict(params)
        self.threads = threads
        self.batch_size = batch_size
        self.factory = factory
        self.shared = shared

    def load_model(self):
        if self.shared is None:
            return self._load()
        identity = json.dumps([type(self).__name__, getattr(self.factory, "__qualname__", None), self.params,
                               self.threads], sort_keys=True, default=repr)
        return _acquire(self.shared, identity, self._load)

    def _load(self):
        limit_threads(self.threads)
        if self.factory is not None:
            return self.factory(self.params, self.threads)
        with quiet_native_start_up():
            import tensorflow  # noqa: F401 - imported first so that limit_threads can size its pools

            limit_threads(self.threads)
            return self.build()

    def batch_elements_kwargs(self):
        """Full batches: Beam's adaptive batching starts at one element and grows, and a model runs small batches
        at a fraction of its speed (a bundle's last batch may be smaller)."""
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return self.namespace


class EmbeddingModelHandler(_BatchedHandler):
    """[S, S, 3] uint8 prepared images -> PredictionResult(example=None, inference=[dim] float32).

    ``factory(params, threads)`` builds the model object (default: features.cnn.CnnExtractor); it must have
    ``embed([B, S, S, 3] uint8) -> [B, dim]``. The example is not kept in the result (it would carry every
    image through the rest of the pipeline).
    """

    namespace = "cairn_cnn"

    def build(self):
        return CnnExtractor(CnnConfig(**self.params), threads=self.threads)

    def run_inference(self, batch: Sequence[np.ndarray], model, inference_args=None) -> Iterable[PredictionResult]:
        vectors = model.embed(np.stack(batch))
        return [PredictionResult(None, v) for v in vectors]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(x.nbytes for x in batch)


def ahead_of(handler) -> dict:
    """PrepareImages' pool for the model ``handler`` it feeds: as many threads as the model has, two batches
    ahead."""
    return {"threads": max(1, handler.threads), "prefetch": 2 * handler.batch_size}


class PrepareImages(beam.DoFn):
    """{id, path, landmark_id} -> ((id, landmark_id, path), prepared image); failures -> dead letters.

    The prepared image is ``resize_square(image, size)`` when ``size`` is an int, ``size(image)`` when it is a
    (picklable) function; with ``with_size`` the value is (prepared image, (decoded width, height)).
    ``threads`` > 0: images are prepared in a pool of that many threads, up to ``prefetch`` ahead of the one
    handed on (0: one at a time in ``process``)."""

    def __init__(self, size, decode: DecodeConfig, with_size: bool = False, threads: int = 0, prefetch: int = 64):
        self.size = size
        self.decode = decode
        self.with_size = with_size
        self.threads = threads
        self.prefetch = prefetch
        self.failed = {stage: Metrics.counter(NAMESPACE, f"dead_{stage}") for stage in ("read", "decode")}
        self.pool = None
        self.pending = collections.deque()

    def setup(self):
        if self.threads > 0:
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cairn-decode")

    def teardown(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def start_bundle(self):
        self.pending = collections.deque()

    def _prepare(self, row: dict):
        """(key, value) of a row, or (None, (stage, reason)) when it cannot be read or decoded (no exception
        leaves: this runs in the pool)."""
        key = (row["id"], row["landmark_id"], row.get("path") or "")
        try:
            image = load_image(row["path"], self.decode)
        except ImageError as e:
            return None, (e.stage, e.reason)
        except Exception as e:  # noqa: BLE001 - never let one file stop the job
            return None, ("decode", f"{type(e).__name__}: {e}")
        prepared = resize_square(image, self.size) if isinstance(self.size, int) else self.size(image)
        return key, ((prepared, (image.shape[1], image.shape[0])) if self.with_size else prepared)

    def _output(self, row: dict, prepared):
        key, value = prepared
        if key is None:
            stage, reason = value
            self.failed[stage].inc()
            return beam.pvalue.TaggedOutput(DEAD, DeadLetter(row["id"], stage, reason, row.get("path") or ""))
        return key, value

    def process(self, row: dict):
        if self.pool is None:
            yield self._output(row, self._prepare(row))
            return
        self.pending.append((row, self.pool.submit(self._prepare, row)))
        # hand on every image that is ready, in order, and wait for the oldest beyond the prefetch depth
        while self.pending and (len(self.pending) > self.prefetch or self.pending[0][1].done()):
            first, future = self.pending.popleft()
            yield self._output(first, future.result())

    def finish_bundle(self):
        while self.pending:
            first, future = self.pending.popleft()
            yield at_bundle_end(self._output(first, future.result()))


class _ToRows(beam.DoFn):
    """((id, landmark_id, path), PredictionResult) -> feature row, or a dead letter for a bad vector."""

    def __init__(self, dim: int):
        self.dim = dim
        self.ok = Metrics.counter(NAMESPACE, "images_ok")
        self.bad = Metrics.counter(NAMESPACE, "dead_extract")

    def process(self, item):
        (image_id, label, path), result = item
        v = np.asarray(result.inference, dtype=np.float32)
        if v.shape != (self.dim,) or not np.all(np.isfinite(v)):
            self.bad.inc()
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter(image_id, "extract",
                                                            f"bad embedding (shape {v.shape} or non-finite)", path))
            return
        self.ok.inc()
        yield {"id": image_id, "landmark_id": label, "vector": v}


class LocalModelHandler(_BatchedHandler):
    """(prepared image, (width, height)) -> PredictionResult(example=None, inference=LocalFeatures), batched:
    ``load_model`` builds a batched local extractor (features/delf.py's DelfExtractor) once per worker, and
    ``run_inference`` hands it the whole batch (it runs same-shaped images through the model together)."""

    namespace = "cairn_local"

    def build(self):
        params = config_params(self.params)
        return DelfExtractor(DelfConfig(**params), threads=self.threads)

    def run_inference(self, batch, model, inference_args=None) -> Iterable[PredictionResult]:
        feats = model.extract_batch([b[0] for b in batch], [b[1] for b in batch])
        return [PredictionResult(None, f) for f in feats]

    def get_num_bytes(self, batch) -> int:
        return sum(b[0].nbytes for b in batch)


class _ToLocalRows(beam.DoFn):
    """((id, landmark_id, path), PredictionResult of LocalFeatures) -> a one-row local-features table."""

    def __init__(self, schema):
        self.schema = schema
        self.ok = Metrics.counter(NAMESPACE, "images_ok")
        self.bad = Metrics.counter(NAMESPACE, "dead_extract")

    def process(self, item):
        (image_id, label, path), result = item
        feats = result.inference
        if not np.all(np.isfinite(feats.descriptors)):
            self.bad.inc()
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter(image_id, "extract", "non-finite descriptors", path))
            return
        self.ok.inc()
        yield local_features_table([image_id], [label], [feats], self.schema)


def keep_image(image: np.ndarray) -> np.ndarray:
    """PrepareImages' preparation for detection: the decoded image itself (the detector resizes)."""
    return image


class DetectorModelHandler(_BatchedHandler):
    """Decoded images -> PredictionResult(example=the image, inference=(boxes [k, 4], scores [k])): builds the
    detector of a features.detect.DetectConfig once per worker; the image travels on in the result so that
    its regions can be cropped."""

    namespace = "cairn_detect"

    def build(self):
        params = config_params(self.params)
        return make_detector(DetectConfig(**params))

    def run_inference(self, batch, model, inference_args=None) -> Iterable[PredictionResult]:
        found = model.detect_images(list(batch))
        return [PredictionResult(image, result) for image, result in zip(batch, found, strict=True)]

    def get_num_bytes(self, batch) -> int:
        return sum(b.nbytes for b in batch)


class CropRegions(beam.DoFn):
    """((id, landmark_id, path), PredictionResult of a detection) -> one (region key, prepared crop) per region:
    the full image and the selected boxes (features.detect.regions_of). The region key is (id, landmark_id,
    path, region, box, score, width, height, regions of the image)."""

    def __init__(self, detect_params: dict, size: int):
        self.detect_params = detect_params
        self.size = size
        self.config = None
        self.regions = Metrics.counter(NAMESPACE, "regions")
        self.detected = Metrics.distribution(NAMESPACE, "boxes_per_image")

    def setup(self):
        params = config_params(self.detect_params)
        self.config = DetectConfig(**params)

    def process(self, item):
        (image_id, label, path), result = item
        image = result.example
        try:
            boxes, scores = result.inference
            regions = regions_of(image, boxes, scores, self.config)
        except Exception as e:  # noqa: BLE001 - one odd detection must not stop the job: the image's dead letter
            yield beam.pvalue.TaggedOutput(DEAD, (image_id, ("bad", f"cropping failed: {type(e).__name__}: {e}"[:500],
                                                             path, 1)))
            return
        h, w = image.shape[:2]
        self.regions.inc(len(regions))
        self.detected.update(sum(1 for r in regions if r[0] > 0))
        for number, box, score, crop in regions:
            key = (image_id, label, path, number, tuple(float(v) for v in box), float(score), w, h, len(regions))
            yield key, resize_square(crop, self.size)


class _ToRegionParts(beam.DoFn):
    """(region key, PredictionResult) -> (id, ("ok", row)) or (id, ("bad", reason, path))."""

    def __init__(self, dim: int):
        self.dim = dim

    def process(self, item):
        key, result = item
        image_id, label, path, number, box, score, w, h, count = key
        v = np.asarray(result.inference, dtype=np.float32)
        if v.shape != (self.dim,) or not np.all(np.isfinite(v)):
            yield image_id, ("bad", f"bad embedding of region {number} (shape {v.shape} or non-finite)", path, count)
            return
        yield image_id, ("ok", {"id": image_id, "landmark_id": label, "vector": v, "region": number,
                                "box": np.asarray(box, np.float32), "box_score": score, "width": w, "height": h},
                         path, count)


def _failed_regions(item):
    """A region batch RunInference could not process -> ("bad", reason) per region, keyed by image id."""
    batch, error = item
    reason = _batch_error(error)
    for key, _ in batch:
        yield key[0], ("bad", reason, key[2], key[8])


class AssembleRegions(beam.DoFn):
    """(id, [parts]) -> the image's region rows, all of them, or one dead letter: an image is never written with
    some of its regions missing."""

    def __init__(self):
        self.ok = Metrics.counter(NAMESPACE, "images_ok")
        self.bad = Metrics.counter(NAMESPACE, "dead_extract")

    def process(self, item):
        image_id, parts = item
        parts = list(parts)
        bad = [p for p in parts if p[0] == "bad"]
        expected = parts[0][3]
        if bad or len(parts) != expected:
            self.bad.inc()
            reason = bad[0][1] if bad else f"{len(parts)} of {expected} regions embedded"
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter(image_id, "extract", reason, parts[0][2]))
            return
        self.ok.inc()
        yield from sorted((p[1] for p in parts), key=lambda r: r["region"])


class DetectAndEmbed(beam.PTransform):
    """Manifest rows -> (regional feature rows, dead letters): decode, detect (batched RunInference), crop the
    full image and the top boxes, embed every crop (batched RunInference), then gather each image's regions."""

    def __init__(self, detect_handler, embed_handler, size: int, dim: int, decode: DecodeConfig, detect_params: dict):
        super().__init__()
        self.detect_handler = detect_handler
        self.embed_handler = embed_handler
        self.size = size
        self.dim = dim
        self.decode = decode
        self.detect_params = detect_params

    def expand(self, rows):
        prepared = rows | "Decode" >> beam.ParDo(PrepareImages(keep_image, self.decode,
                                                                **ahead_of(self.detect_handler))).with_outputs(
            DEAD, main="images")
        detected, det_other = prepared.images | "Detect" >> RunInference(
            KeyedModelHandler(self.detect_handler)).with_exception_handling()
        crops = detected | "Crop" >> beam.ParDo(CropRegions(self.detect_params, self.size)).with_outputs(
            DEAD, main="crops")
        embedded, emb_other = crops.crops | "Embed" >> RunInference(
            KeyedModelHandler(self.embed_handler)).with_exception_handling()
        parts = (embedded | "ToParts" >> beam.ParDo(_ToRegionParts(self.dim)),
                 emb_other.failed_inferences | "FailedRegions" >> beam.FlatMap(_failed_regions), crops[DEAD])
        assembled = (parts | "AllParts" >> beam.Flatten() | "ByImage" >> beam.GroupByKey()
                     | "Assemble" >> beam.ParDo(AssembleRegions()).with_outputs(DEAD, main="rows"))
        failed = det_other.failed_inferences | "FailedDetections" >> beam.FlatMap(_failed_batch)
        dead = (prepared[DEAD], failed, assembled[DEAD]) | "Dead" >> beam.Flatten()
        return assembled.rows, dead


FAILED_BATCH_IMAGES = Metrics.counter(NAMESPACE, "dead_extract")


def _failed_batch(item) -> list[DeadLetter]:
    """A batch RunInference could not process -> one dead letter per image in it."""
    batch, error = item
    FAILED_BATCH_IMAGES.inc(len(batch))
    reason = _batch_error(error)
    return [DeadLetter(key[0], "extract", reason, key[2]) for key, _ in batch]


class EmbedImages(beam.PTransform):
    """Manifest rows -> (feature rows, dead letters): decode, prepare, batched inference. With ``local_schema``
    the handler is a LocalModelHandler and the rows are one-row local-features tables in that schema."""

    def __init__(self, handler, size, dim: int, decode: DecodeConfig, local_schema=None):
        super().__init__()
        self.handler = handler
        self.size = size
        self.dim = dim
        self.decode = decode
        self.local_schema = local_schema

    def expand(self, rows):
        local = self.local_schema is not None
        prepared = rows | "Prepare" >> beam.ParDo(PrepareImages(self.size, self.decode, with_size=local,
                                                                **ahead_of(self.handler))).with_outputs(
            DEAD, main="images")
        main, other = prepared.images | "Embed" >> RunInference(
            KeyedModelHandler(self.handler)).with_exception_handling()
        to_rows = _ToLocalRows(self.local_schema) if local else _ToRows(self.dim)
        results = main | "ToRows" >> beam.ParDo(to_rows).with_outputs(DEAD, main="rows")
        failed = other.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_batch)
        dead = (prepared[DEAD], results[DEAD], failed) | "Dead" >> beam.Flatten()
        return results.rows, dead
