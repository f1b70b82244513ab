"""Sharded Parquet files on any Beam filesystem: ``prefix-SSSSS-of-NNNNN.parquet``.

Beam jobs write shards with :func:`beam.io.WriteToParquet` (see pipeline/stages/transforms.py); this module writes
small tables from one process (id tables, manifests) and reads shard sets back as one table with the
metadata of the files, checking that every shard agrees.
"""

from __future__ import annotations

import io

import pyarrow as pa
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
    called without an active exception")."""
    return pq.ParquetFile(f).read(columns=columns)


def read_shards(prefix: str, columns: list[str] | None = None) -> tuple[pa.Table, dict]:
    """Read every shard under ``prefix`` into one table; returns (table, cairn metadata)."""
    tables, metas = [], []
    for path in find_shards(prefix):
        with fs.FileSystems.open(path) as f:
            t = read_file(f, columns=columns)
        tables.append(t)
        metas.append(cairn_metadata(t.schema))
    if any(m != metas[0] for m in metas[1:]):
        raise CairnError(f"shards under {prefix} were written with different configurations; rerun the job")
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return table, metas[0]


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
