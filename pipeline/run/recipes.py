"""The recipes: how each method's features, models and index are built by chaining the stages.

Every method is a chain of the individual stages (extract -> train -> encode -> index -> recognize), the same
ones the `cairn extract/train/encode/index/recognize` commands run, so what `cairn compare` does can be done step
by step; every stage reuses its outputs when its config is unchanged (SIFT features are extracted once and shared
by all SIFT methods). A recipe returns what it built (:func:`build_global` documents the record) and
:func:`run_method` recognises the queries with it.

Each stage is timed in the run's ledger (ledger.py) from the cost record the stage returns; a recipe passes
nothing but the stage's own parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from features.detect import DetectConfig
from index.faiss_index import IndexConfig
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.featuresets import features_prefix, shards_bytes
from pipeline.images import DecodeConfig
from pipeline.run import ledger, trainers
from pipeline.run.settings import MethodsConfig
from pipeline.stages.encode import encode
from pipeline.stages.extract import check_detector, extract, resolve_detector
from pipeline.stages.index import build_index
from pipeline.stages.inference import SharedModels
from pipeline.stages.recognize import recognize
from pipeline.stages.train import train_classifier, train_pca


@dataclass(frozen=True)
class RunContext:
    """What every method run shares: the data, the decoding, the parallelism, recognition."""

    train: str  # database manifest (absolute)
    queries: str  # query manifest (absolute)
    work: str  # OUT/work of the compare run
    decode: DecodeConfig  # image decoding and validation
    workers: int = 0  # DirectRunner worker processes (0 = automatic)
    threads: int = 0  # threads per worker (0 = automatic)
    beam_args: tuple[str, ...] = ()  # Beam flags passed through
    vote: object = None  # index.recognize.VoteConfig
    neighbours: int = 100  # database images listed per query
    force: bool = False  # recompute everything
    splits: tuple[str, ...] = ("train", "queries")  # ("train",): database only (leave-one-out evaluations)
    tune: object = None  # index.recognize.TuneConfig: tune the vote on held-out database images (None = off)
    index: IndexConfig | None = None  # the FAISS index of the dense methods (None = the default)
    boxes: str = ""  # landmark boxes of the database (and query) images: trains the +det methods' detector
    test_pipelines: Callable | None = None  # gives a new test pipeline for each Beam job (tests), else None


# ---------------------------------------------------------------------------------------------------------------
# building blocks: one stage, timed in the ledger from the cost it returns


class NoDatabaseImages(CairnError):
    """Every database image of a method's extraction is a dead letter: nothing to train on or index.
    ``records``: the extraction records written so far, by split (their counts and dead letters)."""

    def __init__(self, message: str, records: dict):
        super().__init__(message)
        self.records = records


def _stage(kind: str, key: str, fn: Callable[[], dict], images: str = "train", **info) -> dict:
    """Run ``fn`` (a stage body) as the ledger's stage ``kind`` under ``key``; ``images``: the run's quantity
    its input images are ("train" or "queries")."""
    with ledger.stage(kind, key, **info) as st:
        result = fn()
        ledger.record(st, result.get("cost") or {}, key, images)
    return result


def _pipeline(ctx: RunContext):
    """A new test pipeline for a Beam job of the run, or None (the job makes its own)."""
    return ctx.test_pipelines() if ctx.test_pipelines else None


def _train_options(ctx: RunContext) -> trainers.TrainOptions:
    """What the run gives `cairn train`'s trainers (pipeline/run/trainers.py), which its recipes share."""
    return trainers.TrainOptions(max(1, ctx.workers), ctx.beam_args, ctx.force, ctx.decode, ctx.boxes,
                                 ctx.test_pipelines)


def extract_both(ctx: RunContext, extractor: str, params: dict, folder: str,
                 detect: DetectConfig | None = None) -> dict:
    """Extract database and query features into WORK/folder/{train,queries}; returns their records."""
    manifests = {"train": ctx.train, "queries": ctx.queries}
    records = {}
    # the query extraction reuses the model the database's loaded, when in one process; released at the end
    with SharedModels() as models:
        for split in ctx.splits:
            out = fs.join(ctx.work, folder, split)
            records[split] = _stage("extract", out, lambda split=split, out=out: extract(
                manifests[split], out, method=extractor, params=params, decode=ctx.decode, workers=ctx.workers,
                threads=ctx.threads, beam_args=list(ctx.beam_args), force=ctx.force, detect=detect,
                test_pipeline=_pipeline(ctx), shared_models=models), images=split,
                name=f"extract {extractor}{'+det' if detect else ''}", split=split)
            counts = records[split]["counts"]
            if split == "train" and not counts["outputs"]:
                stages = ", ".join(f"{k} {v}" for k, v in sorted(counts["dead_by_stage"].items()))
                raise NoDatabaseImages(f"every database image ({counts['inputs']} manifest rows) is a dead letter of the "
                                       f"{extractor} extraction ({stages}): there is nothing to index", records)
    return records


def encode_both(ctx: RunContext, source: str, encoder: str, folder: str) -> dict:
    """Encode both splits of the features folder ``source`` with ``encoder`` into folder/{train,queries}."""
    records = {}
    for split in ctx.splits:
        out = fs.join(folder, split)
        records[split] = _stage("encode", out, lambda split=split, out=out: encode(
            fs.join(source, split), encoder, out, workers=ctx.workers, threads=ctx.threads,
            beam_args=list(ctx.beam_args), force=ctx.force, test_pipeline=_pipeline(ctx)), images=split,
            name=f"encode ({encoder.rsplit('/', 2)[-2]})", split=split)
    return records


def train_step(name: str, out: str, fn: Callable[[], dict]) -> dict:
    """A trainer run as a launcher stage; returns its train.json record."""
    fs.check_output_folder(out)
    return _stage("train", out, fn, name=name, output_grows=[])  # a model's size: fixed, unless its cost says


def build_index_step(ctx: RunContext, features: str, out: str) -> dict:
    return _stage("index", out, lambda: build_index(
        features, out, ctx.index or IndexConfig(), beam="auto", beam_args=list(ctx.beam_args), workers=ctx.workers,
        threads=ctx.threads, test_pipeline=_pipeline(ctx)), name="index build")


def sift_folder(sift) -> str:
    return f"local/sift-{cfg.fingerprint(sift)[:8]}"  # one folder per SIFT config, shared by every SIFT method


def _with_pca(ctx: RunContext, method: str, vectors: str, home: str, model: str, out: str, config,
              expected: dict | None, trained: dict) -> tuple[str, dict | None, dict]:
    """PCA-whitening (WORK/.../``model``) of the global descriptors in ``vectors`` into ``out`` when
    ``config.pca_dim`` asks for it: (the vectors to index, their encoding records, ``trained`` with the PCA's
    training time added)."""
    if config.pca_dim <= 0:
        return vectors, None, trained
    model, out = fs.join(home, model), fs.join(home, out)
    pca = train_step(f"PCA ({method})", model, lambda: train_pca(method, fs.join(vectors, "train"), model, config,
                                                                 expected, force=ctx.force))
    encoded = None
    if pca.get("trained", True):  # False: too few images to learn the PCA (logged)
        encoded = encode_both(ctx, vectors, fs.join(model, "encoder.npz"), out)
        vectors = out
    return vectors, encoded, {**trained, "train_seconds": float(trained.get("train_seconds", 0.0)) +
                              float(pca["train_seconds"])}


def build_global(ctx: RunContext, home: str, vectors: str, extracted: dict, encoded: dict | None, trained: dict,
                 local: str | None = None) -> dict:
    """The record every recipe returns once its vectors are indexed: {"vectors": folder with train/ and queries/,
    "index", "indexed" (the build's record), "extract", "encode" (records by split), "train" (the training
    record), "local": folder of local features for verification (or None)}."""
    indexed = build_index_step(ctx, fs.join(vectors, "train"), fs.join(home, "index"))
    return {"vectors": vectors, "index": fs.join(home, "index"), "indexed": indexed, "extract": extracted,
            "encode": encoded, "train": trained, "local": local}


# ---------------------------------------------------------------------------------------------------------------
# the recipes: (config, ctx) -> what build_global returns


def hog(config: MethodsConfig, ctx: RunContext) -> dict:
    """HoG (features/hog.py), optionally PCA-whitened, in WORK/hog."""
    home = fs.join(ctx.work, "hog")
    extracted = extract_both(ctx, "hog", cfg.to_dict(config.hog.hog), "hog")
    vectors, encoded, trained = _with_pca(ctx, "hog", fs.join(ctx.work, "hog"), home, "model", "pca", config.hog,
                                          cfg.to_dict(config.hog.hog), {"train_seconds": 0.0})
    return build_global(ctx, home, vectors, extracted, encoded, trained)


def _sift(method: str, section, trainer: Callable, config: MethodsConfig, ctx: RunContext) -> dict:
    """SIFT/RootSIFT -> a k-means vocabulary -> BoVW or VLAD vectors (``section``: config.bovw or config.vlad,
    ``trainer``: its vocabulary's, pipeline/run/trainers.py)."""
    home = fs.join(ctx.work, method)
    local = fs.join(ctx.work, sift_folder(section.sift))
    extracted = extract_both(ctx, "sift", cfg.to_dict(section.sift), sift_folder(section.sift))
    model = fs.join(home, "model")
    trained = train_step(f"vocabulary ({method})", model, lambda: trainer(fs.join(local, "train"), model, config,
                                                                         _train_options(ctx)))
    encoded = encode_both(ctx, local, fs.join(model, "encoder.npz"), fs.join(home, "vectors"))
    return build_global(ctx, home, fs.join(home, "vectors"), extracted, encoded, trained, local)


def sift_bovw(config: MethodsConfig, ctx: RunContext) -> dict:
    """RootSIFT bag of visual words with tf-idf over an inverted file, in WORK/sift-bovw."""
    return _sift("sift-bovw", config.bovw, trainers.sift_bovw, config, ctx)


def sift_vlad(config: MethodsConfig, ctx: RunContext) -> dict:
    """RootSIFT VLAD (intra-norm, power, L2) with PCA-whitening, in WORK/sift-vlad."""
    return _sift("sift-vlad", config.vlad, trainers.sift_vlad, config, ctx)


def fine_tuned(config: MethodsConfig, ctx: RunContext) -> dict:
    """The cnn network fine-tuned on the database (WORK/cnn/model: model.keras and untrained.keras)."""
    folder = fs.join(ctx.work, "cnn", "model")
    return train_step("fine-tune (cnn)", folder, lambda: trainers.cnn(ctx.train, folder, config, _train_options(ctx)))


def _fine_tuned_model(config: MethodsConfig, ctx: RunContext, file: str) -> tuple[object, dict, dict]:
    """(method config, cnn extraction params, training record) of the cnn network fine-tuned on the database
    (trained when needed): ``file`` model.keras (fine-tuned) or untrained.keras (its initial weights)."""
    trained = fine_tuned(config, ctx)
    mc = config.cnn
    params = {"model": fs.join(ctx.work, "cnn", "model", file), "scales": list(mc.scales), "batch_size": mc.batch_size}
    return mc, params, trained


def _frozen_model(config: MethodsConfig) -> tuple[object, dict, dict]:
    """(method config, cnn extraction params, training record) of cnn-pretrained's frozen model."""
    mc = config.cnn_pretrained
    if not mc.model:
        raise CairnError("cnn-pretrained needs a frozen model: --set cnn_pretrained.model=PATH, a .tflite file "
                         "(e.g. ../shared/weights/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite), a "
                         "SavedModel folder, a .keras export, or keras:resnet50 (downloads ImageNet weights)")
    model = mc.model if mc.model.startswith("keras:") else fs.absolute(mc.model)
    params = {"model": model, "scales": list(mc.scales), "batch_size": mc.batch_size, "input_size": mc.input_size,
              "preprocessing": mc.preprocessing}
    return mc, params, {"train_seconds": 0.0}


def embeddings(name: str, embedder: tuple[object, dict, dict], ctx: RunContext,
               detect: DetectConfig | None = None) -> dict:
    """Embeddings and index in WORK/<name> of the CNN ``embedder`` (method config, extraction params, training
    record: :func:`_fine_tuned_model`, :func:`_frozen_model`), optionally PCA-whitened; with ``detect``, the
    regions the detector finds are embedded (cnn+det, cnn-pretrained+det)."""
    home = fs.join(ctx.work, name)
    mc, params, trained = embedder
    extracted = extract_both(ctx, "cnn", params, fs.join(name, "embeddings"), detect)
    vectors, encoded, trained = _with_pca(ctx, name, fs.join(ctx.work, name, "embeddings"), home, "pca-model",
                                          "pca", mc, None, trained)
    return build_global(ctx, home, vectors, extracted, encoded, trained)


def cnn(config: MethodsConfig, ctx: RunContext) -> dict:
    """The network fine-tuned on the database (GeM + ArcFace), kNN over its embeddings."""
    return embeddings("cnn", _fine_tuned_model(config, ctx, "model.keras"), ctx)


def cnn_untrained(config: MethodsConfig, ctx: RunContext) -> dict:
    """The same network before fine-tuning: what the fine-tuning must beat."""
    untrained = _fine_tuned_model(config, ctx, "untrained.keras")
    return embeddings("cnn-untrained", (*untrained[:2], {"train_seconds": 0.0}), ctx)


def cnn_pretrained(config: MethodsConfig, ctx: RunContext) -> dict:
    """A frozen pretrained extractor (TFLite, SavedModel, .keras)."""
    return embeddings("cnn-pretrained", _frozen_model(config), ctx)


def detector(config: MethodsConfig, ctx: RunContext) -> tuple[DetectConfig, dict]:
    """(features.detect.DetectConfig with its model, training record): the detector named by
    detect.detect.model, or one trained on the database's boxes (--boxes) in WORK/detector."""
    dc = config.detect.detect
    if dc.model:
        detect = dataclasses.replace(dc, model=resolve_detector(dc.model))
        check_detector(detect)
        return detect, {"train_seconds": 0.0}
    if not ctx.boxes:
        raise CairnError("cnn+det and cnn-pretrained+det need a detector: --boxes FILE (landmark boxes of the "
                         "database images, to train one), or --set detect.detect.model=PATH (a trained .keras, an "
                         "Object Detection API SavedModel, or activation:WEIGHTS for the training-free fallback)")
    folder = fs.join(ctx.work, "detector")
    record = train_step("detector", folder, lambda: trainers.detector(ctx.train, folder, config, _train_options(ctx)))
    return dataclasses.replace(dc, model=fs.join(folder, "model.keras")), record


def _detected(name: str, embedder, config: MethodsConfig, ctx: RunContext, detect: DetectConfig,
              det_train: dict) -> dict:
    """A +det method: the embeddings of every region (the full image and the detector's top boxes) of both
    splits, indexed with their parent ids; the detector's training time counts as the method's."""
    base = embeddings(name, embedder, ctx, detect=detect)
    seconds = float(base["train"].get("train_seconds", 0.0)) + float(det_train.get("train_seconds", 0.0))
    return {**base, "train": {**base["train"], "train_seconds": seconds}, "detector": detect,
            "detector_train": det_train}


def cnn_det(config: MethodsConfig, ctx: RunContext) -> dict:
    """cnn on detected landmark regions (the detector trained or given first)."""
    detect, det_train = detector(config, ctx)
    return _detected("cnn+det", _fine_tuned_model(config, ctx, "model.keras"), config, ctx, detect, det_train)


def cnn_pretrained_det(config: MethodsConfig, ctx: RunContext) -> dict:
    """cnn-pretrained on detected landmark regions."""
    detect, det_train = detector(config, ctx)
    return _detected("cnn-pretrained+det", _frozen_model(config), config, ctx, detect, det_train)


def delf(config: MethodsConfig, ctx: RunContext) -> dict:
    """DELF trained on the database and extracted from both splits (WORK/delf/model, WORK/delf/local/{split});
    reused when built. Returns {"local", "extract", "train", "model"}."""
    folder = fs.join(ctx.work, "delf", "model")
    trained = train_step("DELF", folder, lambda: trainers.delf(ctx.train, folder, config, _train_options(ctx)))
    pca = fs.join(folder, "pca.npz") if config.delf.train.pca_dim else ""
    params = cfg.to_dict(config.delf.extraction(fs.join(folder, "model.keras"), pca))
    params = {k: v for k, v in params.items() if k != "device"}
    extracted = extract_both(ctx, "delf", params, "delf/local")
    return {"local": fs.join(ctx.work, "delf", "local"), "extract": extracted, "train": trained, "model": folder}


def delf_sv(config: MethodsConfig, ctx: RunContext) -> dict:
    """delf+sv's base: DELF features pooled by attention into global vectors (WORK/delf+sv/vectors) and their
    index, with the DELF local features for verification."""
    built = delf(config, ctx)
    home = fs.join(ctx.work, "delf+sv")
    encoded = encode_both(ctx, built["local"], fs.join(built["model"], "pool.npz"), fs.join(home, "vectors"))
    return build_global(ctx, home, fs.join(home, "vectors"), built["extract"], encoded, built["train"],
                        built["local"])


def cnn_delf(config: MethodsConfig, ctx: RunContext) -> dict:
    """cnn+delf's base: the fine-tuned cnn's embeddings and index, with DELF local features for re-ranking."""
    base = cnn(config, ctx)
    built = delf(config, ctx)
    seconds = float(base["train"].get("train_seconds", 0.0)) + float(built["train"].get("train_seconds", 0.0))
    return {**base, "local": built["local"], "extra_extract": built["extract"],
            "train": {**base["train"], "train_seconds": seconds}}


# ---------------------------------------------------------------------------------------------------------------
# a method end to end


def run_method(method, config: MethodsConfig, ctx: RunContext) -> dict:
    """Run ``method`` (its registry record, pipeline/run/methods.py) end to end; returns {"costs", "recognize"
    (folder), "dead_letters" {split: csv path}, "counts" {split: the extraction's record counts (inputs,
    outputs, dead_letters, dead_by_stage)}, "index" (the folder of the index the queries were searched in)}."""
    base = method.build(config, ctx)
    home = fs.join(ctx.work, method.name)
    classifier, verify, trained = None, None, base["train"]
    if method.classifier:
        out = fs.join(home, "classifier")
        trained = train_step(f"classifier ({method.name})", out, lambda: train_classifier(
            method.name, fs.join(base["vectors"], "train"), out, config.classifier, force=ctx.force))
        classifier = fs.join(out, "classifier.npz")
    if method.rerank:
        verify = (fs.join(base["local"], "train"), fs.join(base["local"], "queries"), method.rerank_config(config))
    out = fs.join(home, "recognize")
    rec = _stage("recognize", out, lambda: recognize(
        base["index"], fs.join(base["vectors"], "queries"), out, ctx.vote, ctx.neighbours, classifier=classifier,
        verify=verify, tune_config=ctx.tune, db_features=fs.join(base["vectors"], "train")),
        name="recognize (vote, I/O)")
    return {"costs": method_costs(method, base, trained, rec), "recognize": out,
            "dead_letters": {split: r["outputs"]["dead_letters"] for split, r in base["extract"].items()},
            "counts": {split: r["counts"] for split, r in base["extract"].items()}, "index": base["index"],
            "regions": {split: fs.join(base["vectors"], split) for split in base["extract"]}
            if "detector" in base else None}


def method_costs(method, base: dict, trained: dict, rec: dict) -> dict:
    """A method's costs.json: throughput, training and index times, sizes, the index as built, the vote used."""
    ex = base["extract"]
    images = sum(r["counts"]["outputs"] for r in ex.values())
    seconds = sum(r["seconds"] for r in ex.values()) + sum(r["seconds"] for r in (base["encode"] or {}).values())
    seconds += sum(r["seconds"] for r in base.get("extra_extract", {}).values())  # cnn+delf: DELF extraction
    indexed = base["indexed"]
    dim = int(indexed["dim"])
    if indexed["factory"] == "sparse-inverted-file":  # bytes of the stored non-zeros (int32 + float32)
        representation = round(8 * indexed["nnz"] / max(1, indexed["count"]))
    else:
        representation = dim * 4
    vector_bytes = sum(shards_bytes(features_prefix(fs.join(base["vectors"], s), k))
                       for s in ("train", "queries") for k in ("global", "sparse"))
    local_bytes = sum(shards_bytes(features_prefix(fs.join(base["local"], s), "local"))
                      for s in ("train", "queries")) if base["local"] else 0
    costs = {
        "images_per_second": round(images / seconds, 2) if seconds else None,
        "extract_seconds": round(seconds, 3),
        # a classifier method also pays for its descriptor's training (vocabulary, PCA)
        "train_seconds": round(float(trained.get("train_seconds", 0.0)) +
                               (float(base["train"].get("train_seconds", 0.0)) if trained is not base["train"]
                                else 0.0), 3),
        "index_seconds": round(indexed["seconds"], 4),
        "search_seconds": rec["search_seconds"],
        "verify_seconds": rec.get("verify_seconds", 0.0),
        "dim": dim,
        "bytes_per_image": representation,
        "feature_bytes_per_image": round(vector_bytes / images) if images else None,
        "index_bytes": indexed["index_bytes"],
        "dead_letters": sum(r["counts"]["dead_letters"] for r in (*ex.values(), *base.get("extra_extract", {}).values())),
        "index_factory": indexed["factory"],
        "vote": (rec.get("tuning") or {}).get("tuned") or rec["config"]["vote"],
        # what tuning chose and its validation figures (recognize.json keeps what it tried and the threshold curve)
        "tuning": {k: v for k, v in (rec.get("tuning") or {}).items() if k not in ("tried", "threshold_curve")}
        or None,
    }
    if base.get("detector") is not None:  # every region of a database image is a vector in the index
        train_images = ex["train"]["counts"]["outputs"] if "train" in ex else 0
        costs["regions_per_image"] = round(indexed["count"] / max(1, train_images), 3)
        costs["bytes_per_image"] = round(representation * indexed["count"] / max(1, train_images))
        costs["regional_features"] = {split: fs.join(base["vectors"], split) for split in ex}
        costs["detector"] = cfg.to_dict(base["detector"])
        costs["detector_train_seconds"] = float(base["detector_train"].get("train_seconds", 0.0))
    if method.rerank:  # the local features must be kept for verification
        costs["local_feature_bytes_per_image"] = round(local_bytes / images) if images else None
        costs["bytes_per_image"] += costs["local_feature_bytes_per_image"] or 0
    return costs
