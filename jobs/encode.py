"""cairn encode: a Beam job that turns extracted features into a method's vectors with a trained encoder.

    local features (sift)  + bovw encoder  -> OUT/sparse-SSSSS-of-NNNNN.parquet    tf-idf bag of visual words
    local features (sift)  + vlad encoder  -> OUT/features-SSSSS-of-NNNNN.parquet  VLAD (+ PCA-whitening)
    global features (hog)  + pca encoder   -> OUT/features-SSSSS-of-NNNNN.parquet  PCA-whitened descriptors
Encoders are written by `cairn train`. OUT/encode.json holds the config, the counts and the timing; every
input row gives exactly one output row (an image without keypoints gives an empty or zero vector), which the
job checks. A rerun with the same inputs and encoder reuses the outputs.

This module also holds the descriptor-sampling job that `cairn train` runs before k-means.
"""

from __future__ import annotations

import logging
import math
import time

import apache_beam as beam

from jobs import common
from jobs.extract import FEATURE_PREFIX, features_prefix
from pipeline import config as cfg
from pipeline import fs, stages
from pipeline.encoding import ENCODERS, SUBSET, EncodeBatches, SampleDescriptors, load_encoder
from pipeline.errors import CairnError
from pipeline.options import (
    default_threads_per_worker,
    dry_run_output,
    make_pipeline,
    pipeline_options,
    run_and_wait,
    runner_name,
)
from pipeline.parquet_io import SHARD_TEMPLATE, count_rows, find_shards, read_shards, shard_pattern
from pipeline.schemas import cairn_metadata, global_features_schema, same_features, sparse_features_schema
from pipeline.transforms import Rebatch

log = logging.getLogger(__name__)


def features_kind(folder: str) -> str:
    """Which kind of features a job folder holds ("global", "local" or "sparse"); CairnError if none."""
    for kind, prefix in FEATURE_PREFIX.items():
        if fs.glob(shard_pattern(fs.join(folder, prefix))):
            return kind
    raise CairnError(f"{folder} holds no features (features-*, local-* or sparse-* shards); "
                     "run `cairn extract` (or `cairn encode`) first")


def features_metadata(folder: str, kind: str | None = None) -> dict:
    """The ``cairn`` metadata of a folder's feature shards (read from the first shard's footer)."""
    import pyarrow.parquet as pq

    kind = kind or features_kind(folder)
    with fs.FileSystems.open(find_shards(features_prefix(folder, kind))[0]) as f:
        return cairn_metadata(pq.read_schema(f))


def features_fingerprint(folder: str) -> str:
    """A fingerprint of a features folder's content: the config of the job that wrote it (extract.json or
    encode.json), which fixes its content, plus its row count. Cheap at any scale (no feature bytes read)."""
    for name in ("extract.json", "encode.json"):
        path = fs.join(folder, name)
        if fs.exists(path):
            record = cfg.load_json(path)
            return cfg.fingerprint({"config": record.get("config"), "counts": record.get("counts")})
    raise CairnError(f"{folder} has no extract.json or encode.json; it was not written by `cairn extract/encode`")


def sample_descriptors(local_dir: str, out: str, sample_size: int, subset_size: int, seed: int = 0,
                       workers: int = 1, beam_args: list[str] | None = None) -> dict:
    """Beam job: about ``sample_size`` descriptors (a seeded share of every image's) into OUT/sample-*.parquet
    and about ``subset_size`` whole images into OUT/subset-*.parquet. Returns counts."""
    prefix = features_prefix(local_dir, "local")
    images = count_rows(prefix)
    if images == 0:
        raise CairnError(f"{local_dir} has no images with local features; nothing to learn a vocabulary from")
    per_image = max(1, math.ceil(sample_size / images))
    fraction = min(1.0, subset_size / images)
    options = pipeline_options(beam_args or [], workers)
    p = make_pipeline(options)  # the runner's options are checked before anything is deleted
    out = dry_run_output(out, options)  # a dry run leaves the outputs alone
    fs.makedirs(out)
    fs.delete(fs.glob(fs.escape(fs.join(out, "sample")) + "-*") + fs.glob(fs.escape(fs.join(out, "subset")) + "-*"))
    fs.delete_temp_folders(out)
    metadata = features_metadata(local_dir, "local")
    with fs.FileSystems.open(find_shards(prefix)[0]) as f:
        import pyarrow.parquet as pq

        local_schema = pq.read_schema(f)
    import pyarrow as pa

    sample_schema = pa.schema([pa.field("descriptor", pa.list_(pa.float32(), metadata["dim"]))])
    parts = (p | "Read" >> beam.io.ReadFromParquetBatched(shard_pattern(prefix))
             | "Sample" >> beam.ParDo(SampleDescriptors(per_image, fraction, seed)).with_outputs(SUBSET, main="d"))
    _ = parts.d | "WriteSample" >> beam.io.WriteToParquetBatched(
        fs.join(out, "sample"), sample_schema, num_shards=1, shard_name_template=SHARD_TEMPLATE,
        file_name_suffix=".parquet")
    _ = parts[SUBSET] | "RebatchSubset" >> Rebatch() | "WriteSubset" >> beam.io.WriteToParquetBatched(
        fs.join(out, "subset"), local_schema, num_shards=max(1, math.ceil(min(images, subset_size) / 20_000)),
        shard_name_template=SHARD_TEMPLATE, file_name_suffix=".parquet")
    run_and_wait(p)
    return {"images": images, "per_image": per_image, "subset_fraction": fraction,
            "descriptors": count_rows(fs.join(out, "sample")) if fs.glob(shard_pattern(fs.join(out, "sample"))) else 0,
            "subset_images": count_rows(fs.join(out, "subset")) if fs.glob(shard_pattern(fs.join(out, "subset")))
            else 0}


def read_sample(out: str):
    """[S, D] float32: the stored descriptors sampled for k-means by the sampling job (they fit in memory:
    k-means needs them there)."""
    import numpy as np

    from pipeline.schemas import vectors_of

    if not fs.glob(shard_pattern(fs.join(out, "sample"))):
        return np.zeros((0, 128), np.float32)
    return vectors_of(read_shards(fs.join(out, "sample"))[0], "descriptor")


def iter_subset(out: str):
    """The sampled images' LocalFeatures, one row group at a time (the subset can be larger than memory)."""
    import pyarrow.parquet as pq

    from features.local import local_features_from_table

    for path in fs.glob(shard_pattern(fs.join(out, "subset"))):
        with fs.FileSystems.open(path) as f:
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                yield from local_features_from_table(pf.read_row_group(g))


def encode(features: str, encoder_path: str, out: str, workers: int = 0, threads: int = 0,
           beam_args: list[str] | None = None, force: bool = False) -> dict:
    """Run the encoding job; returns the record written to OUT/encode.json."""
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
    record_path = fs.join(out, "encode.json")
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
    if not force and cfg.check_reusable(record_path, config) and _complete(out_prefix, record_path):
        log.info("encode: reusing %s (same features and encoder; --force recomputes)", out)
        stages.mark_reused()
        return cfg.load_json(record_path)
    workers = common.resolve_workers(workers, images)
    threads = threads or default_threads_per_worker(workers)
    options = pipeline_options(beam_args or [], workers)
    p = make_pipeline(options)  # the runner's options are checked before anything is deleted
    if out != (out := dry_run_output(out, options)):  # a dry run leaves the outputs alone
        out_prefix, record_path = features_prefix(out, out_kind), fs.join(out, "encode.json")
    if fs.exists(record_path):
        fs.delete([record_path])
    dim = int(encoder.dim_out if header["kind"] == "pca_whitening" else encoder.dim)
    schema = (sparse_features_schema(dim, metadata) if out_kind == "sparse"
              else global_features_schema(dim, metadata, regional=bool(source.get("regions"))))
    fs.makedirs(out)
    fs.delete(fs.glob(fs.escape(out_prefix) + "-*"))
    fs.delete_temp_folders(out)
    started = time.perf_counter()
    _ = (p | "Read" >> beam.io.ReadFromParquetBatched(shard_pattern(in_prefix))
         | "Encode" >> beam.ParDo(EncodeBatches(encoder_path, in_kind, source.get("postprocess", "none"), schema,
                                                threads))
         | "Rebatch" >> Rebatch()
         | "Write" >> beam.io.WriteToParquetBatched(out_prefix, schema, num_shards=max(1, len(find_shards(in_prefix))),
                                                    shard_name_template=SHARD_TEMPLATE, file_name_suffix=".parquet",
                                                    codec="zstd"))
    run_and_wait(p)
    seconds = time.perf_counter() - started
    written = count_rows(out_prefix) if fs.glob(shard_pattern(out_prefix)) else 0
    if written != images:
        raise RuntimeError(f"encode: {images} input rows but {written} outputs. This is a bug; please report it")
    record = {"config": config, "counts": {"inputs": images, "outputs": written}, "kind": out_kind, "dim": dim,
              "runner": runner_name(options), "workers": workers, "threads_per_worker": threads,
              "seconds": round(seconds, 3),
              "images_per_second": round(images / seconds, 2) if seconds > 0 else None}
    cfg.save_json(record_path, record)
    log.info("encode: %d images -> %d %s vectors of dim %d in %.1f s", images, written, out_kind, dim, seconds)
    return record


def _complete(prefix: str, record_path: str) -> bool:
    """True when a complete shard set holds as many rows as the record says were written."""
    try:
        find_shards(prefix)
    except CairnError:
        return False
    return count_rows(prefix) == cfg.load_json(record_path).get("counts", {}).get("outputs")


def build_parser():
    p = common.parser("cairn encode", __doc__, beam=True)
    p.add_argument("--features", required=True, help="folder written by `cairn extract` (local or global features)")
    p.add_argument("--encoder", required=True, help="encoder.npz written by `cairn train`")
    p.add_argument("--out", required=True, help="output folder")
    common.add_beam_job_args(p, decode=False)
    return p


def run(argv=None, test_pipeline=None) -> dict:
    args, beam_args = common.parse_beam_job(build_parser(), argv)
    return encode(args.features, args.encoder, args.out, workers=args.workers, threads=args.threads_per_worker,
                  beam_args=beam_args, force=args.force)
