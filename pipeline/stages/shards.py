"""Arrow tables -> Parquet shards ``prefix-SSSSS-of-NNNNN.parquet``, written by the workers that made the tables.

    tables -> WriteParts (in the producing stage: a part file of at most ``max_rows`` rows at a time, under a
              ``beam-temp-*`` folder beside the shards)
           -> the parts' names (a few strings through one small shuffle)
           -> Finalize (more than 10 parts under max_rows / 10 rows: those merged up to max_rows; renamed to
              the shard names in order of their first id; the temporary folder removed)

Beam's Parquet sink with a fixed ``num_shards`` sends every table through a GroupByKey to the worker that
writes its shard: the features are encoded, grouped, encoded again and decoded in a stage of their own after
the last image is done. For HoG on 8,320 images (61 MB of vectors) that was 0.95 s between the last image and
the first byte written, on one core, against 10 s of extraction. Written where they are made, the features
cross no shuffle, and on a cluster no worker waits for the others' vectors. The shard count follows the work:
one part per worker bundle, and another whenever a part reaches ``max_rows``, so that no shard holds more
rows than the readers that take a shard at a time expect (the index build, the encoders). A runner that cuts
the work into many small bundles (Dataflow can) would leave many small files, and the index build pays per
shard (a copy of the trained index each): when more than ten parts hold under a tenth of ``max_rows`` rows,
Finalize merges those into shards of up to ``max_rows`` rows, rewriting only them.

The writer writes dictionary pages and statistics for the plain columns only (id, landmark_id, sizes): the
vector and descriptor columns never repeat a value and no reader filters on their minimum, and skipping both
cut the write of those 61 MB from 0.43 s to 0.25 s. Lists keep the names Beam's sink gave them (``item``), so
that shards are laid out as before.

A bundle that fails leaves its part in the temporary folder; only the parts of bundles that committed reach
Finalize, which removes the folder with whatever else is in it. A run killed before Finalize leaves no shard;
one killed during it leaves an incomplete shard set, which readers refuse (parquet_io.find_shards) and the
next run clears (beamjob.start: the prefix's shards and the ``beam-temp-*`` folders).
"""

from __future__ import annotations

import contextlib
import uuid

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline import fs
from pipeline.parquet_io import read_file, shard_name, write_table
from pipeline.stages.transforms import ROW_GROUP_BYTES, at_bundle_end


def plain_columns(schema: pa.Schema) -> list[str]:
    """The columns that take dictionary pages and statistics: those of a non-nested type."""
    return [f.name for f in schema if not pa.types.is_nested(f.type)]


def _open_writer(path: str, schema: pa.Schema, codec: str):
    """(stream, Parquet writer) of a new file on any Beam filesystem: dictionary pages and statistics for the
    plain columns only; lists named as Beam's sink names them."""
    stream = FileSystems.create(path, mime_type="application/x-parquet", compression_type="uncompressed")
    plain = plain_columns(schema)
    return stream, pq.ParquetWriter(stream, schema, compression=codec, use_dictionary=plain, write_statistics=plain,
                                    use_compliant_nested_type=False)


class _WriteParts(beam.DoFn):
    """Tables -> (first id, rows, path) of each part file it writes. The tables are buffered into row groups of
    about ``row_group_bytes`` (or what is left at a part's end or a bundle's), written as they are, in chunks
    (concatenated, not combined: the writer takes chunked columns at the same speed). A part is opened by the
    first row group of a bundle and after the last one closed, which it is when it reaches ``max_rows``; a
    bundle's last part is closed in ``finish_bundle``."""

    def __init__(self, temp: str, schema: pa.Schema, max_rows: int, row_group_bytes: int, codec: str):
        self.temp = temp
        self.schema = schema
        self.max_rows = max_rows
        self.row_group_bytes = row_group_bytes
        self.codec = codec
        self.part = None
        self.buffer, self.buffered, self.size = [], 0, 0

    def start_bundle(self):
        self.part = None
        self.buffer, self.buffered, self.size = [], 0, 0

    def _take(self, rows: int) -> pa.Table:
        """The first ``rows`` buffered rows as one table; the rest stay buffered."""
        table = pa.concat_tables(self.buffer)
        head, tail = table.slice(0, rows), table.slice(rows)
        self.buffer = [tail] if tail.num_rows else []
        self.buffered, self.size = tail.num_rows, tail.nbytes
        return head

    def _write(self, table: pa.Table):
        if self.part is None:
            path = fs.join(self.temp, f"{uuid.uuid4().hex}.parquet")
            stream, writer = _open_writer(path, self.schema, self.codec)
            self.part = {"path": path, "stream": stream, "writer": writer, "rows": 0,
                         "first": table.column("id")[0].as_py()}
        self.part["writer"].write_table(table)
        self.part["rows"] += table.num_rows

    def _close(self):
        part, self.part = self.part, None
        part["writer"].close()
        part["stream"].close()
        return part["first"], part["rows"], part["path"]

    def process(self, table: pa.Table):
        if not table.num_rows:
            return
        self.buffer.append(table)
        self.buffered += table.num_rows
        self.size += table.nbytes
        while (self.part["rows"] if self.part else 0) + self.buffered >= self.max_rows:
            self._write(self._take(self.max_rows - (self.part["rows"] if self.part else 0)))
            yield self._close()
        if self.size >= self.row_group_bytes:
            self._write(self._take(self.buffered))

    def finish_bundle(self):
        if self.buffered:
            self._write(self._take(self.buffered))
        if self.part is not None:
            yield at_bundle_end(self._close())

    def teardown(self):
        if self.part is not None:  # a failed bundle: its part is left for Finalize's clean-up
            for closing in (self.part["writer"].close, self.part["stream"].close):
                with contextlib.suppress(Exception):  # the bundle already failed with its own error
                    closing()
            self.part = None


SMALL = 10  # more than SMALL parts of fewer than max_rows / SMALL rows each (a runner's small bundles) are merged


def _groups(parts: list, max_rows: int) -> list[list]:
    """The committed parts, (first id, rows, path), in the groups that become one shard each, in order of their
    first id: when more than SMALL parts have under max_rows / SMALL rows, those go together, up to ``max_rows``
    rows a shard; every other part alone (a few small files, one per worker of a small job, cost nothing)."""
    small = max(1, max_rows // SMALL)
    if sum(1 for part in parts if part[1] < small) <= SMALL:
        small = 0
    groups, gathering = [], []
    for part in sorted(parts):
        if part[1] >= small:
            groups.append([part])
        elif gathering and sum(p[1] for p in gathering) + part[1] > max_rows:
            groups.append(gathering)
            gathering = [part]
        else:
            gathering.append(part)
    if gathering:
        groups.append(gathering)
    return sorted(groups)


def _merge(paths: list[str], target: str, schema: pa.Schema, row_group_bytes: int, codec: str) -> None:
    tables = []
    for path in paths:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            tables.append(read_file(f))
    table = pa.concat_tables(tables)
    per_group = max(1, int(row_group_bytes * table.num_rows / max(1, table.nbytes)))
    stream, writer = _open_writer(target, schema, codec)
    with stream, writer:  # the writer closes first, then its stream, also when the write fails
        writer.write_table(table, row_group_size=per_group)


def finalize(parts: list, prefix: str, temp: str, schema: pa.Schema, max_rows: int,
             row_group_bytes: int = ROW_GROUP_BYTES, codec: str = "zstd") -> list[str]:
    """The committed parts -> ``prefix``'s shard names, in order of their first id: small parts merged first
    (_groups), then every file renamed in one call (an object store batches it); no part (no rows): one empty
    shard with the schema. Removes ``temp``. Idempotent, as a retried step must be: the groups follow from the
    parts alone, and a shard already renamed is not made again."""
    groups = _groups(parts, max_rows)
    count = max(1, len(groups))
    shards = [shard_name(prefix, i, count) for i in range(count)]
    if not groups:
        write_table(schema.empty_table(), shards[0])
    sources, targets = [], []
    for i, (group, shard) in enumerate(zip(groups, shards, strict=False)):
        paths = [path for _, _, path in group]
        source = paths[0]
        if len(paths) > 1:
            source = fs.join(temp, f"merged-{i:05d}.parquet")
            if not fs.exists(shard) and all(fs.exists(p) for p in paths):  # a retry does not merge them again
                _merge(paths, source, schema, row_group_bytes, codec)
        if fs.exists(source):
            sources.append(source)
            targets.append(shard)
        elif not fs.exists(shard):
            raise RuntimeError(f"{source}: a part of {prefix} is gone before it became {shard}")
    if sources:
        FileSystems.rename(sources, targets)
    fs.delete_tree(temp)
    return shards


class WriteShards(beam.PTransform):
    """Arrow tables in ``schema`` -> the shard set ``prefix-SSSSS-of-NNNNN.parquet`` (module docstring); the
    output is the list of shard paths, once the set is complete."""

    def __init__(self, prefix: str, schema: pa.Schema, max_rows: int, row_group_bytes: int = ROW_GROUP_BYTES,
                 codec: str = "zstd"):
        super().__init__()
        self.prefix = prefix
        self.schema = schema
        self.max_rows = max(1, max_rows)
        self.row_group_bytes = row_group_bytes
        self.codec = codec

    def expand(self, tables):
        temp = fs.join(fs.dirname(self.prefix), f"beam-temp-{fs.basename(self.prefix)}-{uuid.uuid4().hex}")
        return (tables
                | "WriteParts" >> beam.ParDo(_WriteParts(temp, self.schema, self.max_rows, self.row_group_bytes, self.codec))
                | "Parts" >> beam.combiners.ToList()
                | "Finalize" >> beam.Map(finalize, self.prefix, temp, self.schema, self.max_rows,
                                         self.row_group_bytes, self.codec))
