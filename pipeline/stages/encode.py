"""The encoding job: features -> a method's vectors with a trained encoder (BoVW, VLAD, PCA-whitening, DELF
attention pooling), one output row per input row, checked; and the descriptor-sampling job that a vocabulary's
k-means learns from. What OUT holds is in `cairn encode --help`.
"""

from __future__ import annotations

import logging
import math

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.local import local_features_from_table
from pipeline import config as cfg
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.featuresets import (
    FEATURE_PREFIX,
    features_fingerprint,
    features_kind,
    features_metadata,
    features_prefix,
    record_files,
    shard_globs,
    side_folder,
    side_path,
    tree_bytes,
    verify_files,
)
from pipeline.parquet_io import (
    SHARD_TEMPLATE,
    count_rows,
    find_shards,
    id_ordered_parts,
    read_shards,
    shard_pattern,
)
from pipeline.schemas import global_features_schema, same_features, sparse_features_schema, vectors_of
from pipeline.stages import beamjob, costs
from pipeline.stages.encoding import ENCODERS, SUBSET, EncodeBatches, SampleDescriptors, load_encoder
from pipeline.stages.transforms import Rebatch

log = logging.getLogger(__name__)


def sample_descriptors(local_dir: str, out: str, sample_size: int, subset_size: int, seed: int = 0,
                       workers: int = 1, beam_args: list[str] | None = None, test_pipeline=None) -> dict:
    """Beam job: about ``sample_size`` descriptors (a seeded share of every image's) into OUT/sample-*.parquet
    and about ``subset_size`` whole images into OUT/subset-*.parquet. Returns counts."""
    prefix = features_prefix(local_dir, "local")
    images = count_rows(prefix)
    if images == 0:
        raise CairnError(f"{local_dir} has no images with local features; nothing to learn a vocabulary from")
    per_image = max(1, math.ceil(sample_size / images))
    fraction = min(1.0, subset_size / images)
    job = beamjob.start(out, beam_args, max(1, workers), test_pipeline=test_pipeline, clear=("sample-*", "subset-*"))
    p, out = job.pipeline, job.out
    metadata = features_metadata(local_dir, "local")
    with fs.FileSystems.open(find_shards(prefix)[0]) as f:
        local_schema = pq.read_schema(f)
    sample_schema = pa.schema([pa.field("descriptor", pa.list_(pa.float32(), metadata["dim"]))])
    parts = (p | "Read" >> beam.io.ReadFromParquetBatched(shard_pattern(prefix))
             | "Sample" >> beam.ParDo(SampleDescriptors(per_image, fraction, seed)).with_outputs(SUBSET, main="d"))
    _ = parts.d | "WriteSample" >> beam.io.WriteToParquetBatched(
        fs.join(out, "sample"), sample_schema, num_shards=1, shard_name_template=SHARD_TEMPLATE,
        file_name_suffix=".parquet")
    _ = parts[SUBSET] | "RebatchSubset" >> Rebatch() | "WriteSubset" >> beam.io.WriteToParquetBatched(
        fs.join(out, "subset"), local_schema, num_shards=max(1, math.ceil(min(images, subset_size) / 20_000)),
        shard_name_template=SHARD_TEMPLATE, file_name_suffix=".parquet")
    job.run()
    return {"images": images, "per_image": per_image, "subset_fraction": fraction,
            "descriptors": count_rows(fs.join(out, "sample")) if fs.glob(shard_pattern(fs.join(out, "sample"))) else 0,
            "subset_images": count_rows(fs.join(out, "subset")) if fs.glob(shard_pattern(fs.join(out, "subset")))
            else 0}


SUBSET_PART_IMAGES = 1_000  # subset images iter_subset holds at once (their local features)


def read_sample(out: str):
    """[S, D] float32: the stored descriptors sampled for k-means by the sampling job (they fit in memory:
    k-means needs them there), sorted by their bytes: the workers write them in an order of their own, and
    k-means' subsample and initialisation pick rows by position."""
    if not fs.glob(shard_pattern(fs.join(out, "sample"))):
        return np.zeros((0, 128), np.float32)
    desc = np.ascontiguousarray(vectors_of(read_shards(fs.join(out, "sample"))[0], "descriptor"))
    if len(desc) < 2:
        return desc
    rows = desc.view(np.dtype((np.void, desc.itemsize * desc.shape[1]))).ravel()
    return desc[np.argsort(rows, kind="stable")]


def iter_subset(out: str, part_images: int | None = None):
    """The sampled images' LocalFeatures in image-id order (not the workers'), ``part_images`` images in memory
    at a time (default SUBSET_PART_IMAGES; the subset can be larger than memory)."""
    paths = fs.glob(shard_pattern(fs.join(out, "subset")))
    with id_ordered_parts(paths, part_images or SUBSET_PART_IMAGES) as (parts, _):
        for part in parts:
            yield from local_features_from_table(part())


def encode(features: str, encoder_path: str, out: str, workers: int = 0, threads: int = 0,
           beam_args: list[str] | None = None, force: bool = False, test_pipeline=None) -> dict:
    """Run the encoding job; returns the record written to OUT.cairn/encode.json, with its cost."""
    fs.check_output_folder(out)
    if fs.absolute(out).rstrip("/") == fs.absolute(features).rstrip("/"):
        raise CairnError(f"--out {out} is the --features folder; write the encoded vectors to another folder")
    encoder, header = load_encoder(encoder_path)
    in_kind, out_kind = ENCODERS[header["kind"]]
    kind = features_kind(features)
    if kind != in_kind:
        raise CairnError(f"a {header['kind']} encoder reads {in_kind} features, but {features} holds {kind} ones")
    source = features_metadata(features, kind)
    train_path = fs.join(fs.dirname(encoder_path), "train.json")  # written by `cairn train` beside the encoder
    train_record = cfg.load_json(train_path) if fs.exists(train_path) else {}
    # what the artefact says it was trained on; train.json beside it for encoders from before it said so
    trained_on = header.get("meta", {}).get("trained_on") or train_record.get("features_metadata") or {}
    if trained_on and not same_features(trained_on, source):
        raise CairnError(f"{encoder_path} was trained on {trained_on.get('method')} {trained_on.get('config')} "
                         f"features, but {features} holds {source.get('method')} {source.get('config')}; "
                         "extract with the same config or retrain the encoder")
    in_prefix = features_prefix(features, kind)
    images = count_rows(in_prefix)
    record_path = side_path(out, "encode.json")
    metadata = {"method": train_record.get("method") or header["kind"],
                "config": {"features": source.get("config"), "encoder": header["config"],
                           "encoder_sha256": cfg.file_fingerprint(encoder_path)},
                "source": {"method": source.get("method"), "dim": source.get("dim")},
                "preprocessing": f"{source.get('method')} features encoded by a {header['kind']} encoder"}
    if source.get("regions"):  # detected regions stay regions: the encoder maps each region's vector
        if out_kind != "global":
            raise CairnError(f"{features} holds detected regions; a {header['kind']} encoder cannot keep them")
        metadata["regions"] = source["regions"]
    config = {"features": fs.absolute(features), "features_fingerprint": features_fingerprint(features),
              "encoder": fs.absolute(encoder_path), "metadata": metadata}
    out_prefix = features_prefix(out, out_kind)
    outputs = shard_globs(out, (out_kind,))
    if not force and test_pipeline is None and cfg.check_reusable(record_path, config):
        stored = cfg.load_json(record_path)
        problem = verify_files(stored.get("files"), outputs)  # before any footer is read
        if not problem and _complete(out_prefix, record_path):
            log.info("encode: reusing %s (same features and encoder; --force recomputes)", out)
            return {**stored, "cost": costs.reused()}
        if problem:
            log.warning("encode: cannot reuse %s: %s; encoding again", out, problem)
    job = beamjob.start(out, beam_args, workers, threads, images=images, test_pipeline=test_pipeline,
                        clear=(f"{FEATURE_PREFIX[out_kind]}-*", "encode.json"),  # and the record of before OUT.cairn
                        clear_globs=[record_path])
    p, workers, threads = job.pipeline, job.workers, job.threads
    if out != job.out:  # a dry run leaves the outputs alone
        out = job.out
        out_prefix, record_path = features_prefix(out, out_kind), side_path(out, "encode.json")
        outputs = shard_globs(out, (out_kind,))
    dim = int(encoder.dim_out if header["kind"] == "pca_whitening" else encoder.dim)
    schema = (sparse_features_schema(dim, metadata) if out_kind == "sparse"
              else global_features_schema(dim, metadata, regional=bool(source.get("regions"))))
    _ = (p | "Read" >> beam.io.ReadFromParquetBatched(shard_pattern(in_prefix))
         | "Encode" >> beam.ParDo(EncodeBatches(encoder_path, in_kind, source.get("postprocess", "none"), schema,
                                                threads))
         | "Rebatch" >> Rebatch()
         | "Write" >> beam.io.WriteToParquetBatched(out_prefix, schema, num_shards=max(1, len(find_shards(in_prefix))),
                                                    shard_name_template=SHARD_TEMPLATE, file_name_suffix=".parquet",
                                                    codec="zstd"))
    seconds = job.run()
    written = count_rows(out_prefix) if fs.glob(shard_pattern(out_prefix)) else 0
    if written != images:
        raise RuntimeError(f"encode: {images} input rows but {written} outputs. This is a bug; please report it")
    record = {"config": config, "counts": {"inputs": images, "outputs": written}, "kind": out_kind, "dim": dim,
              "runner": job.runner, "workers": workers, "threads_per_worker": threads,
              "seconds": round(seconds, 3),
              "images_per_second": round(images / seconds, 2) if seconds > 0 else None,
              "files": record_files(outputs)}
    cfg.save_json(record_path, record)
    record = {**record, "cost": costs.beam_cost("encode", record, tree_bytes(out) + tree_bytes(side_folder(out)))}
    log.info("encode: %d images -> %d %s vectors of dim %d in %.1f s (record beside them: %s)", images, written,
             out_kind, dim, seconds, record_path)
    return record


def _complete(prefix: str, record_path: str) -> bool:
    """True when a complete shard set holds as many rows as the record says were written."""
    try:
        find_shards(prefix)
    except CairnError:
        return False
    return count_rows(prefix) == cfg.load_json(record_path).get("counts", {}).get("outputs")
