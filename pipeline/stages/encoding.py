"""Beam adapters for learned encoders: sample descriptors for a vocabulary, and encode features with one.

* :class:`SampleDescriptors` reads batches of local features and keeps, per image, a seeded choice of at most
  ``per_image`` descriptors (the k-means sample) and, for a seeded share of images, the whole row (the sample
  of images that BoVW document frequencies and VLAD's PCA are learned on). The choice depends only on the
  seed and the image id, so a rerun, or a run on another runner, samples the same descriptors.
* :class:`EncodeBatches` loads an encoder artefact once per worker and maps batches of local (or global)
  features to encoded rows: BoVW -> sparse features, VLAD -> global features, PCA-whitening -> global.

The work itself is in features/ (vocabulary.py, pca.py); these only convert Arrow tables.
"""

from __future__ import annotations

import zlib

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics

from features import artifacts
from features.delf import AttentionPooling
from features.local import local_features_from_table
from features.pca import PCAWhitening
from features.sift import prepare_descriptors
from features.vocabulary import BoVWEncoder, VLADEncoder
from pipeline.errors import CairnError
from pipeline.resources import limit_threads
from pipeline.schemas import descriptor_layout, global_features_table, sparse_features_table, vectors_of

SUBSET = "subset"  # tag of the whole-row image sample
NAMESPACE = "cairn"
# encoder artefact kind -> (input feature kind, output feature kind)
ENCODERS = {"bovw": ("local", "sparse"), "vlad": ("local", "global"), "pca_whitening": ("global", "global"),
            "attention_pool": ("local", "global")}


def load_encoder(path: str):
    """(encoder, header) of an encoder artefact: BoVWEncoder, VLADEncoder or PCAWhitening."""
    header = artifacts.header(path)
    kind = header.get("kind")
    classes = {"bovw": BoVWEncoder, "vlad": VLADEncoder, "pca_whitening": PCAWhitening,
               "attention_pool": AttentionPooling}
    if kind not in classes:
        raise CairnError(f"{path} holds a {kind!r}, not an encoder (bovw, vlad or pca_whitening)")
    return classes[kind].load(path), header


def image_uniform(image_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by the image id and the seed (for sampling images reproducibly)."""
    return zlib.crc32(f"{seed}:{image_id}".encode()) / 2**32


def sample_rows(table: pa.Table, per_image: int, seed: int) -> np.ndarray:
    """[S, D] float32: at most ``per_image`` stored descriptors per row of a local-features table, chosen by
    a generator seeded with (seed, image id)."""
    chosen = []
    for image_id, f in zip(table.column("id").to_pylist(), local_features_from_table(table), strict=True):
        n = len(f)
        if n == 0:
            continue
        if n > per_image:
            rng = np.random.default_rng([seed, zlib.crc32(image_id.encode())])
            f_idx = np.sort(rng.choice(n, per_image, replace=False))
            chosen.append(f.descriptors[f_idx])
        else:
            chosen.append(f.descriptors)
    if chosen:
        return np.concatenate(chosen)
    dim, _ = descriptor_layout(table.schema)
    return np.zeros((0, dim or 0), np.float32)


def descriptor_table(desc: np.ndarray) -> pa.Table:
    """One column ``descriptor`` (fixed_size_list<float32>[D]) holding descriptors as stored (not prepared)."""
    desc = np.ascontiguousarray(desc, dtype=np.float32)
    flat = pa.array(desc.reshape(-1), pa.float32())
    return pa.table({"descriptor": pa.FixedSizeListArray.from_arrays(flat, desc.shape[1])})


class SampleDescriptors(beam.DoFn):
    """Arrow batch of local features -> descriptor sample table; whole rows of sampled images -> SUBSET."""

    def __init__(self, per_image: int, subset_fraction: float, seed: int):
        self.per_image = per_image
        self.subset_fraction = subset_fraction
        self.seed = seed
        self.sampled = Metrics.counter(NAMESPACE, "descriptors_sampled")

    def process(self, table: pa.Table):
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        desc = sample_rows(table, self.per_image, self.seed)
        self.sampled.inc(len(desc))
        if len(desc):
            yield descriptor_table(desc)
        ids = table.column("id").to_pylist()
        keep = [i for i, image_id in enumerate(ids) if image_uniform(image_id, self.seed) < self.subset_fraction]
        if keep:
            yield beam.pvalue.TaggedOutput(SUBSET, table.take(pa.array(keep, pa.int64())))


class EncodeBatches(beam.DoFn):
    """Arrow batch of features -> Arrow table of encoded features in ``schema`` (same ids, same order)."""

    def __init__(self, encoder_path: str, input_kind: str, postprocess: str, schema: pa.Schema, threads: int):
        self.encoder_path = encoder_path
        self.input_kind = input_kind
        self.postprocess = postprocess
        self.schema = schema
        self.threads = threads
        self.encoded = Metrics.counter(NAMESPACE, "images_encoded")

    def setup(self):
        limit_threads(self.threads)
        self.encoder, _ = load_encoder(self.encoder_path)

    def process(self, table: pa.Table):
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        ids = table.column("id").to_pylist()
        labels = table.column("landmark_id").to_pylist()
        if self.input_kind == "local":
            feats = local_features_from_table(table)
            sets = [prepare_descriptors(f.descriptors, {"postprocess": self.postprocess}) for f in feats]
            if getattr(self.encoder, "weighted", False):  # DELF attention pooling weighs by the scores
                encoded = self.encoder.transform(sets, [f.scores for f in feats])
            else:
                encoded = self.encoder.transform(sets)
        else:
            encoded = self.encoder.transform(vectors_of(table))
        self.encoded.inc(len(ids))
        if "indices" in self.schema.names:
            yield sparse_features_table(ids, labels, encoded, self.schema)
        else:
            yield global_features_table(ids, labels, np.asarray(encoded, np.float32), self.schema, extra=table)
