"""The extraction job: manifest -> descriptors in sharded Parquet (pipeline/featuresets.py), with dead letters.

Decoding and the extractor run on Beam workers (DoFns in transforms.py; RunInference model handlers in
inference.py for the CNN, DELF and the detector, which crops regions before embedding). Every manifest row ends
in exactly one of the features or the dead letters, which :func:`reconcile` checks before the record is written;
outputs made with the same config and manifest are reused. What OUT holds is in `cairn extract --help`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import apache_beam as beam

from features.backbones import BackboneConfig
from features.detect import ACTIVATION, FORMAT, VERSION, detector_metadata
from features.keras_io import read_metadata
from features.model_ops import check_saved_model
from features.registry import EXTRACTORS, make_extractor
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError, parse_dead_letters
from pipeline.featuresets import (
    features_prefix,
    record_files,
    shard_globs,
    side_folder,
    side_path,
    some_names,
    tree_bytes,
    verify_files,
)
from pipeline.images import DecodeConfig
from pipeline.manifest import changed_images, manifest_fingerprint, read_manifest
from pipeline.parquet_io import SHARD_TEMPLATE, find_shards, read_shards, shard_pattern, write_table_shards
from pipeline.schemas import global_features_schema
from pipeline.stages import beamjob, costs, progress
from pipeline.stages.inference import (
    DetectAndEmbed,
    DetectorModelHandler,
    EmbeddingModelHandler,
    EmbedImages,
    LocalModelHandler,
    SharedModels,
)
from pipeline.stages.shards import WriteShards
from pipeline.stages.transforms import (
    DEAD,
    EXTRACT_BATCH,
    DecodeAndExtract,
    Rebatch,
    RowsToTables,
    WriteDeadLetters,
    row_chunks,
)

log = logging.getLogger(__name__)
ROWS_PER_SHARD = 20_000


@dataclass(frozen=True)
class ExtractConfig:
    """What an extraction run computes; outputs are reused only when this is equal."""

    manifest: str  # the manifest, as an absolute path (relative image paths resolve against its folder)
    manifest_sha256: str  # fingerprint of the manifest's content
    method: str  # descriptor name (features/registry.py)
    extractor: dict = field(default_factory=dict)  # the extractor's metadata: dim, config, preprocessing
    decode: DecodeConfig = DecodeConfig()  # image decoding and validation
    detect: dict | None = None  # --detector: the detector's config and model fingerprint (None: whole images)


def outputs(out: str, kind: str = "global") -> dict[str, str]:
    return {
        "features": features_prefix(out, kind),
        "manifest": side_path(out, "manifest"),
        "dead_letters": side_path(out, "dead_letters.csv"),
        "record": side_path(out, "extract.json"),
    }


def output_files(out: str) -> list[str]:
    """Glob patterns of the files an extraction into OUT writes beside its record: every feature kind's shards in
    OUT, the manifest shards and the dead letters in OUT.cairn (the record lists them with their checksums:
    featuresets.record_files)."""
    side = fs.escape(side_folder(out))
    return [*shard_globs(out), fs.join(side, "manifest-*"), fs.join(side, "dead_letters.csv")]


# where the side files were before they moved to OUT.cairn: in OUT, in the way of Parquet data set readers
LEGACY_FILES = ("manifest-*", "dead_letters.csv", "extract.json")


def _old_outputs(out: str) -> list[str]:
    """Glob patterns of a previous extraction's outputs (every feature kind, the manifest shards, the dead
    letters, the record, and the side files of the layout that kept them in OUT)."""
    return [*output_files(out), fs.join(fs.escape(side_folder(out)), "extract.json"),
            *(fs.join(fs.escape(out), name) for name in LEGACY_FILES)]


def extract(manifest_path: str, out: str, method: str = "hog", params: dict | None = None,
            decode: DecodeConfig = DecodeConfig(), workers: int = 0, threads: int = 0, num_shards: int = 0,
            beam_args: list[str] | None = None, force: bool = False, test_pipeline=None, detect=None,
            show_progress: bool | None = None, shared_models: SharedModels | None = None) -> dict:
    """Run the extraction job; returns the record written to OUT.cairn/extract.json.

    ``workers`` 0 picks DirectRunner worker processes automatically; ``threads`` 0 gives each cores / workers.
    ``detect`` (features.detect.DetectConfig): embed the full image and each detected landmark region, one row
    per region (cnn only). ``show_progress``: a bar of the images read on stderr (None: on a terminal with a
    local runner; pipeline/stages/progress.py). ``shared_models`` (inference.SharedModels): the models are
    acquired through it, so that another extraction given the same object reuses them in the same process.
    """
    if method not in EXTRACTORS:
        raise CairnError(f"method {method!r} is not an extractor (a method that needs its own pipeline); "
                         f"extractors: {', '.join(sorted(EXTRACTORS))}; use `cairn compare --methods {method}`")
    fs.check_output_folder(out)
    if not 0 <= num_shards <= 100_000:
        raise CairnError("--num-shards must be between 0 (automatic) and 100000")
    try:
        extractor = make_extractor(method, params)  # validates params early, in the launching process
    except (ValueError, OSError) as e:  # a bad parameter, a model file that is not there
        raise CairnError(f"{method}: {e}") from e
    kind = getattr(extractor, "kind", "global")
    detected = None
    if detect is not None:
        if kind != "global" or not getattr(extractor, "batched", False):
            raise CairnError(f"--detector crops regions for embedding extractors (cnn), not for {method}")
        check_detector(detect)
        detected = detector_metadata(detect)
    manifest_path = fs.absolute(manifest_path)
    manifest = read_manifest(manifest_path)
    paths = outputs(out, kind)
    fingerprint = manifest_fingerprint(manifest_path, manifest)
    config = cfg.to_dict(ExtractConfig(manifest_path, fingerprint, method, extractor.metadata(), decode, detected))
    if not force and test_pipeline is None and cfg.check_reusable(paths["record"], config) and _complete(paths):
        record = cfg.load_json(paths["record"])
        problem = _not_reusable(out, record, paths)
        if not problem:
            log.info("extract: reusing %s (same config, manifest and images; --force recomputes)", out)
            return {**record, "cost": costs.reused()}
        log.warning("extract: cannot reuse %s: %s; extracting again", out, problem)
    fixed_shards = num_shards  # 0: the features' shards follow the work (stages/shards.py)
    num_shards = min(num_shards or math.ceil(len(manifest) / ROWS_PER_SHARD), max(1, len(manifest)))
    job = beamjob.start(out, beam_args, workers, threads, images=len(manifest), test_pipeline=test_pipeline,
                        clear_globs=_old_outputs(out))
    p, workers, threads, runner = job.pipeline, job.workers, job.threads, job.runner
    out = job.out  # a dry run writes its manifest shards to a temporary folder instead
    paths = outputs(out, kind)
    if len(manifest):
        # with each image's size and modification time before any is read: a file changed during the run or after
        # it differs from its record at the next run, which then extracts again (_not_reusable)
        write_table_shards(manifest.to_table_with_stats(), paths["manifest"], num_shards=num_shards)
    if kind == "local":
        schema = extractor.schema()
    else:
        meta = {**extractor.metadata(), **({"regions": detected} if detected else {})}
        schema = global_features_schema(extractor.dim, meta, regional=detected is not None)
    log.info("extract: %d images (%d rejected by the manifest) with %s on %s (%d worker%s, %d thread%s each)",
             len(manifest), len(manifest.dead_letters), method, runner, workers, "s"[: workers > 1],
             threads, "s"[: threads > 1])
    show_progress = progress.wanted(runner) if show_progress is None else show_progress
    counts_folder = progress.folder(show_progress and test_pipeline is None and len(manifest) > 0)
    # the model paths take a row per image (RunInference batches them); HoG and SIFT take chunks of EXTRACT_BATCH
    # rows from the read on, so that the shuffle and every step after it pay Beam's per-element cost per chunk;
    # a small manifest on several workers gets smaller chunks, at least four per worker to spread
    per_image = detected is not None or getattr(extractor, "batched", False)
    chunk = max(1, min(EXTRACT_BATCH, math.ceil(len(manifest) / (4 * workers))))

    def shared(role: str):
        return shared_models.handle(role) if shared_models is not None else None

    if not len(manifest):
        rows = p | "NoRows" >> beam.Create([])
    elif per_image:
        rows = p | "ReadManifest" >> beam.io.ReadFromParquet(shard_pattern(paths["manifest"]))
    else:
        rows = (p
                | "ReadManifest" >> beam.io.ReadFromParquetBatched(shard_pattern(paths["manifest"]))
                | "Chunk" >> beam.FlatMap(row_chunks, chunk))
    if len(manifest):
        rows = rows | "Spread" >> beam.Reshuffle()
        if counts_folder is not None:
            rows = rows | "Progress" >> progress.counted(counts_folder, per_element=1 if per_image else len)
    if detected is not None:  # detect, crop the regions, embed each, gather them per image
        handlers = (DetectorModelHandler(cfg.to_dict(detect), threads, detect.batch_size,
                                         shared=shared("detector")),
                    EmbeddingModelHandler(params or {}, threads, extractor.config.batch_size, shared=shared("embed")))
        features, dead = rows | "DetectAndEmbed" >> DetectAndEmbed(*handlers, extractor.prepare_size, extractor.dim,
                                                                   decode, cfg.to_dict(detect))
    elif getattr(extractor, "batched", False) and kind == "local":  # DELF: pyramid + attention, batched by shape
        handler = LocalModelHandler(params or {}, threads, extractor.config.batch_size, shared=shared("local"))
        features, dead = rows | "Embed" >> EmbedImages(handler, extractor.prepare_function(), extractor.dim, decode,
                                                       local_schema=schema)
    elif getattr(extractor, "batched", False):  # CNN: decode + resize, then batched inference with RunInference
        handler = EmbeddingModelHandler(params or {}, threads, extractor.config.batch_size, shared=shared("embed"))
        features, dead = rows | "Embed" >> EmbedImages(handler, extractor.prepare_size, extractor.dim, decode)
    else:  # decode + extract in the worker, a chunk of images per call, one Arrow table per chunk
        results = (rows
                   | "DecodeAndExtract" >> beam.ParDo(DecodeAndExtract(method, params or {}, decode, threads, schema))
                   .with_outputs(DEAD, main="features"))
        features, dead = results.features, results[DEAD]
    if per_image and kind == "global":  # dict rows: into Arrow tables with the vectors stacked (the sink would
        features = features | "ToTables" >> RowsToTables(schema)  # convert each vector alone)
    if fixed_shards:  # exactly that many: every table through Beam's shuffle to the worker writing its shard
        features = features | "Rebatch" >> Rebatch()  # row groups of about 64 MiB
        _ = features | "WriteFeatures" >> beam.io.WriteToParquetBatched(
            paths["features"], schema, num_shards=num_shards,
            shard_name_template=SHARD_TEMPLATE, file_name_suffix=".parquet", codec="zstd",
        )
    else:  # written where they are made, a shard per bundle and per ROWS_PER_SHARD rows, 64 MiB row groups
        _ = features | "WriteFeatures" >> WriteShards(paths["features"], schema, ROWS_PER_SHARD)
    manifest_dead = p | "ManifestDeadLetters" >> beam.Create(manifest.dead_letters)
    _ = (dead, manifest_dead) | "AllDead" >> beam.Flatten() | "WriteDead" >> WriteDeadLetters(
        paths["dead_letters"])
    with progress.watch(counts_folder, len(manifest), "extract"):
        seconds = job.run()

    counts = reconcile(manifest.total_rows, paths, regional=detected is not None)
    record = {
        "config": config,
        "counts": counts,
        "runner": runner,
        "workers": workers,
        "threads_per_worker": threads,
        "seconds": round(seconds, 3),
        "images_per_second": round(counts["outputs"] / seconds, 2) if seconds > 0 else None,
        "startup": job.startup,
        "dim": extractor.dim,
        "kind": kind,
        "regional": detected is not None,
        "label_names": {str(k): v for k, v in sorted(manifest.label_names.items())},
        "outputs": {k: v for k, v in paths.items() if k != "record"},
        "files": record_files(output_files(out)),
    }
    cfg.save_json(paths["record"], record)
    record = {**record, "cost": costs.beam_cost("extract", record, tree_bytes(out) + tree_bytes(side_folder(out)))}
    log.info("extract: %d inputs = %d features + %d dead letters (%s); %.1f s, %.1f images/s",
             counts["inputs"], counts["outputs"], counts["dead_letters"], _by_stage(counts), seconds,
             record["images_per_second"] or 0)
    log.info("extract: features in %s; the record, manifest and dead letters beside it in %s", out,
             side_folder(out))
    if detected is not None:
        log.info("extract: %d regions, %d of them detected boxes (%.2f per image)", counts["regions"],
                 counts["detected_boxes"], counts["detected_boxes"] / max(1, counts["outputs"]))
    return record


def check_detector(detect) -> None:
    """CairnError unless the detector of a features.detect.DetectConfig can be found."""
    model = detect.model
    if not model:
        raise CairnError("--detector: give a detector: a .keras from `cairn train --method detector`, an Object "
                         "Detection API SavedModel folder, or activation:WEIGHTS (the training-free fallback)")
    import os

    if detect.fallback:
        weights = model[len(ACTIVATION):]
        if weights not in ("", "imagenet") and not fs.exists(weights):
            raise CairnError(f"--detector {model}: the fallback's weights {weights} do not exist (give a MobileNet "
                             "v1 .tflite, a .weights.h5, or activation:imagenet, which downloads)")
        try:
            BackboneConfig(detect.fallback_backbone, weights=weights or "imagenet")
        except ValueError as e:
            raise CairnError(f"--detector {model}: {e}") from e
        return
    if not fs.exists(model):
        raise CairnError(f"--detector {model}: no such file or folder; train one with `cairn train --method "
                         "detector --manifest M --boxes B --out D` (D/model.keras)")
    if os.path.isdir(model):
        if not os.path.exists(os.path.join(model, "saved_model.pb")):
            raise CairnError(f"--detector {model}: a folder without saved_model.pb; give an Object Detection API "
                             "SavedModel export or a Cairn detector (.keras)")
        check_saved_model(model)  # a graph with file, process or network ops is refused here, before any worker
        return
    try:
        read_metadata(model, FORMAT, VERSION, "a Cairn detector",
                      "train one with `cairn train --method detector --manifest M --boxes B --out D`")
    except ValueError as e:
        raise CairnError(f"--detector: {e}") from e


def resolve_detector(model: str) -> str:
    """A detector path made absolute (the fallback's ``activation:WEIGHTS`` as given)."""
    return model if model.startswith(ACTIVATION) else fs.absolute(model)


def _complete(paths: dict[str, str]) -> bool:
    """True when a previous run's outputs are all there (a complete shard set and the dead letters)."""
    try:
        find_shards(paths["features"])
    except CairnError:
        return False
    return fs.exists(paths["dead_letters"])


def _not_reusable(out: str, record: dict, paths: dict[str, str]) -> str:
    """Why the outputs of a finished extraction with the requested config cannot be reused ("" when they can):
    a file under OUT that is not the one the job wrote (featuresets.verify_files: names, sizes, Parquet footers,
    and the sha256 of every file whose time changed), or an image whose size or modification time is not what
    the job recorded before reading it (one stat per image)."""
    problem = verify_files(record.get("files"), output_files(out))
    if problem:
        return problem
    if not fs.glob(shard_pattern(paths["manifest"])):  # no accepted manifest row: no image to check
        return ""
    table, _ = read_shards(paths["manifest"])
    changed = changed_images(table)
    if changed is None:
        return "its manifest shards hold no image sizes and times (written before Cairn recorded them)"
    if changed:
        shown = some_names([f"{i} ({p})" for i, p in changed], 5)
        return (f"{len(changed)} of {table.num_rows} images changed since they were extracted (size or "
                f"modification time): {shown}")
    return ""


def _by_stage(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts["dead_by_stage"].items())) or "none"


def reconcile(inputs: int, paths: dict[str, str], regional: bool = False) -> dict:
    """Check inputs = outputs + dead letters with no id twice; returns the counts or raises. ``regional``: rows
    are regions, several per image; an image counts once, and must have exactly one region row per number."""
    table, _ = read_shards(paths["features"], columns=["id", "region"] if regional else ["id"])
    ids = table.column("id").to_pylist()
    extra = {}
    if regional:
        pairs = list(zip(ids, table.column("region").to_pylist(), strict=True))
        if len(set(pairs)) != len(pairs):
            raise RuntimeError(f"a region of an image is written twice under {paths['features']}. This is a bug; "
                               "please report it")
        extra = {"regions": len(ids), "detected_boxes": sum(1 for _, r in pairs if r > 0)}
        ids = list(dict.fromkeys(ids))
    dead = parse_dead_letters(fs.read_text(paths["dead_letters"]))
    by_stage: dict[str, int] = {}
    for d in dead:
        by_stage[d.stage] = by_stage.get(d.stage, 0) + 1
    counts = {"inputs": inputs, "outputs": len(ids), "dead_letters": len(dead), "dead_by_stage": by_stage, **extra}
    seen = set(ids)
    twice = len(ids) - len(seen) + sum(1 for d in dead if d.id and d.stage != "manifest" and d.id in seen)
    if inputs != len(ids) + len(dead) or twice:
        raise RuntimeError(
            f"record counts do not reconcile: {inputs} inputs, {len(ids)} outputs, {len(dead)} dead letters, "
            f"{twice} ids in more than one place. This is a bug; please report it with {paths['features']}."
        )
    return counts
