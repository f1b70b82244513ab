"""Beam adapters: read a validated manifest, decode images and extract descriptors, with dead letters.

These are thin: the work is done by pipeline.images and the extractors in features/. Every element carries
its image id; a record that fails goes to the ``dead`` output as a DeadLetter with its stage and reason.
"""

from __future__ import annotations

import logging

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from features.local import local_features_table
from features.registry import make_extractor
from pipeline.errors import DeadLetter
from pipeline.images import DecodeConfig, ImageError, load_image
from pipeline.resources import limit_threads
from pipeline.schemas import global_features_table

log = logging.getLogger(__name__)
DEAD = "dead"  # tag of the dead-letter output
NAMESPACE = "cairn"


def at_bundle_end(value):
    """``value`` (or a TaggedOutput of it) as ``finish_bundle`` must yield it: a windowed value, in the global
    window, at the start of time (what a bounded source's elements carry)."""
    if isinstance(value, beam.pvalue.TaggedOutput):
        return beam.pvalue.TaggedOutput(value.tag, at_bundle_end(value.value))
    return WindowedValue(value, MIN_TIMESTAMP, [GlobalWindow()])


EXTRACT_BATCH = 64  # images per DecodeAndExtract call: Beam's per-element cost is paid once per batch


def row_chunks(table: pa.Table, size: int):
    """A table of manifest rows (ReadFromParquetBatched) -> lists of at most ``size`` row dicts, in order."""
    for start in range(0, table.num_rows, size):
        yield table.slice(start, size).to_pylist()


class DecodeAndExtract(beam.DoFn):
    """A chunk of rows [{id, path, landmark_id}, ...] (row_chunks) -> one Arrow table of their features in
    ``schema`` (global descriptors, or local features for a local extractor), for WriteToParquetBatched;
    failures -> TaggedOutput(DEAD, DeadLetter), one per image. Per image it is the same work as one call
    per image (decode, extract); per batch, the Beam costs of an element (invocation, output, the sink's row
    conversion) and the table are paid once (for a 1 ms HoG, those were half of the job's time)."""

    def __init__(self, method: str, params: dict, decode: DecodeConfig, threads: int, schema):
        self.method = method
        self.params = params
        self.decode = decode
        self.threads = threads
        self.schema = schema
        self.ok = Metrics.counter(NAMESPACE, "images_ok")
        self.failed = {stage: Metrics.counter(NAMESPACE, f"dead_{stage}") for stage in ("read", "decode", "extract")}

    def setup(self):
        limit_threads(self.threads)
        self.extractor = make_extractor(self.method, self.params)
        self.local = getattr(self.extractor, "kind", "global") == "local"

    def _dead(self, row: dict, stage: str, reason: str):
        self.failed[stage].inc()
        return beam.pvalue.TaggedOutput(DEAD, DeadLetter(row["id"], stage, reason, row.get("path") or ""))

    def _extract(self, row: dict):
        """The image's features (a [dim] float32 vector, or LocalFeatures), or its dead letter."""
        try:
            image = load_image(row["path"], self.decode)
        except ImageError as e:
            return self._dead(row, e.stage, e.reason)
        except Exception as e:  # noqa: BLE001 - never let one file stop the job
            return self._dead(row, "decode", f"{type(e).__name__}: {e}")
        try:
            output = self.extractor.extract(image)
            if self.local:
                output.validate(self.extractor.dim)
        except Exception as e:  # noqa: BLE001 - any extractor failure is this record's, not the job's
            log.warning("extract failed for %s: %s", row["id"], e)
            return self._dead(row, "extract", f"{type(e).__name__}: {e}")
        if not self.local and (output.shape != (self.extractor.dim,) or not np.all(np.isfinite(output))):
            return self._dead(row, "extract", f"bad descriptor (shape {output.shape} or non-finite values)")
        return output

    def process(self, rows: list[dict]):
        kept, outputs = [], []
        for row in rows:
            output = self._extract(row)
            if isinstance(output, beam.pvalue.TaggedOutput):
                yield output
            else:
                kept.append(row)
                outputs.append(output)
        if not kept:
            return
        ids, labels = [r["id"] for r in kept], [r["landmark_id"] for r in kept]
        if self.local:
            table = local_features_table(ids, labels, outputs, self.schema)
        else:
            table = global_features_table(ids, labels, np.stack(outputs).astype(np.float32), self.schema)
        self.ok.inc(len(kept))
        yield table


ROW_GROUP_BYTES = 64 << 20  # the row-group buffer of Beam's row-by-row Parquet sink


class _Coalesce(beam.DoFn):
    """Arrow tables -> tables of about ``target_bytes`` (the last of a bundle smaller), concatenated in order."""

    def __init__(self, target_bytes: int):
        self.target_bytes = target_bytes
        self.buffer, self.size = [], 0

    def start_bundle(self):
        self.buffer, self.size = [], 0

    def _flush(self):
        # combined: the Parquet writer and the coder pay per chunk (a 2,080-row HoG table in 64-row chunks took
        # 0.44 s to write and pickle, against 0.08 s in one chunk; the combine itself 2 ms)
        table = pa.concat_tables(self.buffer).combine_chunks()
        self.buffer, self.size = [], 0
        return table

    def process(self, table):
        self.buffer.append(table)
        self.size += table.nbytes
        if self.size >= self.target_bytes:
            yield self._flush()

    def finish_bundle(self):
        if self.buffer:
            yield at_bundle_end(self._flush())


class Rebatch(beam.PTransform):
    """Arrow tables (one row, or one batch of images) -> tables of about ``target_bytes`` (64 MiB, as Beam's
    row-by-row Parquet sink buffers), so that a batched Parquet sink writes one row group per table of that size
    rather than per image or per small batch: a footer entry per image would make million-row shards slow to
    open, and small row groups of float vectors are dictionary-encoded whole (every value unique), which made
    HoG shards 1.5 times their raw size and slower to write."""

    def __init__(self, target_bytes: int = ROW_GROUP_BYTES):
        super().__init__()
        self.target_bytes = target_bytes

    def expand(self, tables):
        return tables | "Coalesce" >> beam.ParDo(_Coalesce(self.target_bytes))


def rows_to_table(rows: list[dict], schema):
    """Global-feature dict rows ({id, landmark_id, vector, and the regional columns}) -> one Arrow table in
    ``schema``, the vectors stacked into one buffer (pyarrow converts a list of numpy vectors element by element:
    0.5 ms per 1,764-d HoG row, more than the descriptor costs)."""
    extra = None
    if len(schema.names) > 3:  # regional rows: region, box, box_score, width, height
        fields = [schema.field(name) for name in schema.names[3:]]
        extra = pa.Table.from_pylist([{f.name: r[f.name] for f in fields} for r in rows], schema=pa.schema(fields))
    vectors = np.stack([r["vector"] for r in rows]) if rows else np.zeros((0, schema.field("vector").type.list_size))
    return global_features_table([r["id"] for r in rows], [r["landmark_id"] for r in rows], vectors, schema, extra)


class RowsToTables(beam.PTransform):
    """Global-feature dict rows -> Arrow tables of ``min_rows``..``max_rows`` rows in ``schema`` (then
    :class:`Rebatch` into row groups)."""

    def __init__(self, schema, min_rows: int = 128, max_rows: int = 1024):
        super().__init__()
        self.schema = schema
        self.min_rows = min_rows
        self.max_rows = max_rows

    def expand(self, rows):
        return (
            rows
            | "Batch" >> beam.BatchElements(min_batch_size=self.min_rows, max_batch_size=self.max_rows)
            | "ToTable" >> beam.Map(rows_to_table, self.schema)
        )


class WriteDeadLetters(beam.PTransform):
    """DeadLetters -> one CSV file (``id,stage,reason,path``), sorted by id for stable output."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, letters):
        return (
            letters
            | "ToLines" >> beam.Map(lambda d: (d.id, d.to_csv_line()))
            | "OneKey" >> beam.Map(lambda kv: (None, kv))
            | "Gather" >> beam.GroupByKey()
            | "Sort" >> beam.FlatMap(lambda kv: [line for _, line in sorted(kv[1])])
            | "Write" >> beam.io.WriteToText(
                self.path, num_shards=1, shard_name_template="", header="id,stage,reason,path"
            )
        )
