"""Sharded Parquet files on any Beam filesystem: ``prefix-SSSSS-of-NNNNN.parquet``.

Beam jobs write shards with :func:`beam.io.WriteToParquetBatched` or, where the features are made, with
pipeline/stages/shards.py; this module writes
small tables from one process (id tables, manifests) and reads shard sets back as one table with the
metadata of the files, checking that every shard agrees.

Which rows a Beam job writes to which shard, and in which order, follows its workers (their number and timing).
Everything read back for learning or indexing therefore comes back in image-id order (:func:`sort_by_id`,
:func:`id_ordered_parts`), so that samples, training and index ids do not depend on the worker count.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import fs
from pipeline.errors import CairnError
from pipeline.schemas import cairn_metadata

SHARD_TEMPLATE = "-SSSSS-of-NNNNN"


def shard_name(prefix: str, index: int, count: int, suffix: str = ".parquet") -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}{suffix}"


def shard_pattern(prefix: str, suffix: str = ".parquet") -> str:
    """A glob matching the shards of ``prefix`` (wildcards in the prefix itself are escaped)."""
    return f"{fs.escape(prefix)}-*-of-*{suffix}"


def write_table_shards(table: pa.Table, prefix: str, num_shards: int = 1) -> list[str]:
    """Write ``table`` as ``num_shards`` row-balanced shards; returns the paths. Each write is atomic."""
    num_shards = max(1, min(num_shards, max(1, table.num_rows)))
    paths = []
    for i in range(num_shards):
        lo = table.num_rows * i // num_shards
        hi = table.num_rows * (i + 1) // num_shards
        path = shard_name(prefix, i, num_shards)
        write_table(table.slice(lo, hi - lo), path)
        paths.append(path)
    return paths


def write_table(table: pa.Table, path: str, compression: str = "zstd") -> None:
    """Write one Parquet file atomically (temporary name, then rename): a killed job leaves the old file or none."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression)
    fs.write_bytes(path, buf.getvalue())


def find_shards(prefix: str, suffix: str = ".parquet") -> list[str]:
    """The complete shard set under ``prefix``; raises CairnError if none or if shards are missing."""
    paths = fs.glob(shard_pattern(prefix, suffix))
    if not paths:
        raise CairnError(f"no shards found at {shard_pattern(prefix, suffix)}; run the job that writes them first")
    counts = {p.rsplit("-of-", 1)[1][: -len(suffix)] for p in paths}
    if len(counts) != 1 or len(paths) != int(next(iter(counts))):
        raise CairnError(
            f"incomplete or mixed shard set at {prefix} ({len(paths)} files, totals {sorted(counts)}); "
            "rerun the job that writes them"
        )
    return paths


def read_file(f, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file from an open file object (a Beam filesystem's), read synchronously by its own reader.
    Not ``pq.read_table(f)``: that scans through Arrow's dataset layer, whose pool threads can drop the last
    reference to the Python file after the read returns; when that happens while the interpreter exits (a job
    that fails right after reading), the thread needs the GIL that is gone and the process aborts ("terminate
    called without an active exception").

    Row group by row group: a whole-file read of a column of binary values (SIFT's descriptors) over 2 GiB
    fails in Arrow ("Nested data conversions not implemented for chunked array outputs"); a row group is
    about 64 MiB (pipeline/stages/transforms.Rebatch)."""
    reader = pq.ParquetFile(f)
    if reader.num_row_groups <= 1:
        return reader.read(columns=columns)
    return pa.concat_tables([reader.read_row_group(i, columns=columns) for i in range(reader.num_row_groups)])


def read_shards(prefix: str, columns: list[str] | None = None) -> tuple[pa.Table, dict]:
    """Read every shard under ``prefix`` into one table, in image-id order when it has an ``id`` column (ask
    for it among ``columns``); returns (table, cairn metadata)."""
    tables, metas = [], []
    for path in find_shards(prefix):
        with fs.FileSystems.open(path) as f:
            t = read_file(f, columns=columns)
        tables.append(t)
        metas.append(cairn_metadata(t.schema))
    if any(m != metas[0] for m in metas[1:]):
        raise CairnError(f"shards under {prefix} were written with different configurations; rerun the job")
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return sort_by_id(table), metas[0]


ID_ORDER_BUCKET_ROWS = 20_000  # rows :func:`id_ordered_parts` holds at once (a feature shard's size)


def sort_by_id(table: pa.Table) -> pa.Table:
    """``table``'s rows in image-id order (a detected region's rows by region number): an order that does not
    depend on how a job's workers split the rows into shards. A table without ids is returned as it is."""
    if "id" not in table.column_names or table.num_rows < 2:
        return table
    keys = [("id", "ascending")] + ([("region", "ascending")] if "region" in table.column_names else [])
    return table.take(pc.sort_indices(table, sort_keys=keys))


@contextlib.contextmanager
def id_ordered_parts(paths: list[str], bucket_rows: int | None = None):
    """The rows of the Parquet files ``paths`` in image-id order, in parts of about ``bucket_rows`` rows:
    yields (parts, counts), ``parts[i]()`` loading the i-th part's table (it may be called again) and
    ``counts[i]`` its rows. Only the ids are read up front; when the rows need more than one part, one pass
    splits them by id range into local scratch files (removed on exit), so memory holds one part at a time.
    ``bucket_rows`` defaults to ID_ORDER_BUCKET_ROWS."""
    bucket_rows = bucket_rows or ID_ORDER_BUCKET_ROWS
    ids = []
    for path in paths:
        with fs.FileSystems.open(path) as f:
            ids.append(read_file(f, columns=["id"]).column("id"))
    ordered = np.sort(np.asarray([i for column in ids for i in column.to_pylist()], dtype=str))
    if len(ordered) <= bucket_rows:  # one part: read the files whenever it is loaded
        def whole() -> pa.Table:
            tables = []
            for path in paths:
                with fs.FileSystems.open(path) as f:
                    tables.append(read_file(f))
            return sort_by_id(pa.concat_tables(tables)) if tables else pa.table({"id": pa.array([], pa.string())})

        yield [whole], [len(ordered)]
        return
    bounds = ordered[bucket_rows::bucket_rows]  # part b holds the ids in [bounds[b - 1], bounds[b])
    counts = np.bincount(np.searchsorted(bounds, ordered, side="right"), minlength=len(bounds) + 1)
    with tempfile.TemporaryDirectory(prefix="cairn-id-order-") as scratch:
        files = [os.path.join(scratch, f"part-{b:05d}.parquet") for b in range(len(bounds) + 1)]
        writers: dict[int, pq.ParquetWriter] = {}
        try:
            for path in paths:
                with fs.FileSystems.open(path) as f:
                    pf = pq.ParquetFile(f)
                    for g in range(pf.num_row_groups):
                        group = pf.read_row_group(g)
                        which = np.searchsorted(bounds, np.asarray(group.column("id").to_pylist(), dtype=str),
                                                side="right")
                        for b in np.unique(which):
                            if b not in writers:
                                writers[b] = pq.ParquetWriter(files[b], group.schema)
                            writers[b].write_table(group.filter(pa.array(which == b)))
        finally:
            for w in writers.values():
                w.close()

        def load(file: str):
            def part() -> pa.Table:
                with open(file, "rb") as f:
                    return sort_by_id(read_file(f))
            return part

        yield [load(file) for file in files], [int(c) for c in counts]


def footer_sha256(path: str) -> str:
    """sha256 (hex) of a Parquet file's footer (its metadata: schema, row groups with their offsets, sizes and
    column statistics, e.g. the smallest and largest id), read with two small reads at the end of the file: a
    cheap fingerprint that tells shards of other rows apart even when they have the same size. "" when the
    file does not end like a Parquet file (truncated)."""
    import hashlib

    with fs.FileSystems.open(path, compression_type="uncompressed") as f:
        f.seek(0, io.SEEK_END)
        end = f.tell()
        if end < 12:
            return ""
        f.seek(end - 8)
        tail = f.read(8)
        length = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or length + 12 > end:
            return ""
        f.seek(end - 8 - length)
        return hashlib.sha256(f.read(length) + tail).hexdigest()


def count_rows(prefix: str) -> int:
    """Rows in a shard set, from the Parquet footers only."""
    total = 0
    for path in find_shards(prefix):
        with fs.FileSystems.open(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total
