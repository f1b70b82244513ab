"""Feature shards written by the workers that make them (pipeline/stages/shards.py)."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from pipeline.parquet_io import find_shards, read_shards
from pipeline.schemas import global_features_schema, global_features_table, vectors_of
from pipeline.stages.shards import WriteShards, finalize, plain_columns

SCHEMA = global_features_schema(8, {"method": "test"})


def _tables(ids_per_table: list[list[str]]) -> list[pa.Table]:
    tables = []
    for ids in ids_per_table:
        vectors = np.array([[int(i[1:])] * 8 for i in ids], np.float32)
        tables.append(global_features_table(ids, [int(i[1:]) % 3 for i in ids], vectors, SCHEMA))
    return tables


def _write(tmp_path, tables, max_rows, row_group_bytes=64 << 20):
    prefix = str(tmp_path / "out" / "features")
    with BeamTestPipeline() as p:
        _ = p | beam.Create(tables, reshuffle=False) | WriteShards(prefix, SCHEMA, max_rows, row_group_bytes)
    return prefix


def test_every_row_once_in_a_complete_set_of_shards_of_at_most_max_rows(tmp_path):
    ids = [f"i{n:03d}" for n in range(23)]
    prefix = _write(tmp_path, _tables([ids[:4], ids[4:11], ids[11:12], ids[12:]]), max_rows=5)
    shards = find_shards(prefix)  # raises unless the set is complete
    rows = [pq.ParquetFile(s).metadata.num_rows for s in shards]
    assert sum(rows) == 23 and max(rows) <= 5 and len(shards) >= 5
    table, meta = read_shards(prefix)
    assert sorted(table.column("id").to_pylist()) == ids and meta["method"] == "test"
    by_id = dict(zip(table.column("id").to_pylist(), vectors_of(table)[:, 0], strict=True))
    assert all(by_id[i] == int(i[1:]) for i in ids)  # each vector stays with its id
    firsts = [pq.read_table(s).column("id")[0].as_py() for s in shards]
    assert firsts == sorted(firsts)  # shards numbered in order of their first id
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(s.rsplit("/", 1)[1] for s in shards)


def test_row_groups_of_about_the_target_size_and_no_statistics_or_dictionary_for_vectors(tmp_path):
    tables = _tables([[f"i{n:03d}" for n in range(k, k + 4)] for k in range(0, 40, 4)])
    one = _write(tmp_path / "a", tables, max_rows=1000)
    small = _write(tmp_path / "b", tables, max_rows=1000, row_group_bytes=tables[0].nbytes * 3)
    (a,), (b,) = find_shards(one), find_shards(small)
    assert pq.ParquetFile(a).metadata.num_row_groups == 1  # ten tables, one row group
    assert 3 <= pq.ParquetFile(b).metadata.num_row_groups <= 4  # about three tables a row group
    group = pq.ParquetFile(a).metadata.row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    vector = next(c for name, c in columns.items() if name.startswith("vector."))
    assert not vector.is_stats_set and not vector.has_dictionary_page
    assert columns["landmark_id"].is_stats_set and columns["landmark_id"].has_dictionary_page
    assert plain_columns(SCHEMA) == ["id", "landmark_id"]
    assert pq.read_table(a).equals(pq.read_table(b))  # the same rows either way


def test_no_rows_make_one_empty_shard_with_the_schema(tmp_path):
    prefix = _write(tmp_path, [], max_rows=5)
    (shard,) = find_shards(prefix)
    table = pq.read_table(shard)
    assert table.num_rows == 0 and table.schema.equals(SCHEMA, check_metadata=False)


def test_a_row_group_flush_then_a_part_boundary_and_tables_ending_on_it(tmp_path):
    """Tables of 3, 2 and 5 rows with parts of 5 (the second table ends a part exactly) and row groups of about
    one table: every row once, no part over 5 rows, no empty part."""
    ids = [f"i{n:03d}" for n in range(10)]
    tables = _tables([ids[:3], ids[3:5], ids[5:]])
    prefix = _write(tmp_path, tables, max_rows=5, row_group_bytes=tables[0].nbytes)
    rows = [pq.ParquetFile(s).metadata.num_rows for s in find_shards(prefix)]
    assert rows == [5, 5]
    table, _ = read_shards(prefix)
    assert table.column("id").to_pylist() == ids


def _parts(temp, sizes: dict[str, int]) -> list[tuple]:
    temp.mkdir(exist_ok=True)
    parts = []
    for first, rows in sizes.items():
        path = temp / f"{first}.parquet"
        ids = [f"{first}-{k:02d}" for k in range(rows)]
        vectors = np.zeros((rows, 8), np.float32)
        pq.write_table(global_features_table(ids, [1] * rows, vectors, SCHEMA), path)
        parts.append((ids[0], rows, str(path)))
    return parts


def test_finalize_renames_what_committed_removes_the_rest_and_can_run_again(tmp_path):
    temp = tmp_path / "beam-temp-features-x"
    parts = _parts(temp, {"i005": 3, "i001": 4})
    (temp / "failed-bundle.parquet").write_bytes(b"a part of a bundle that did not commit")
    prefix = str(tmp_path / "features")
    shards = finalize(parts, prefix, str(temp), SCHEMA, max_rows=10)
    assert [pq.read_table(s).column("id")[0].as_py() for s in shards] == ["i001-00", "i005-00"]
    assert not temp.exists()
    assert finalize(parts, prefix, str(temp), SCHEMA, max_rows=10) == shards  # a retried finalize step


def test_finalize_merges_the_small_parts_of_many_small_bundles(tmp_path):
    """Parts under max_rows / 10 rows (a runner's small bundles) go together into shards of up to max_rows;
    larger parts stay as they are."""
    temp = tmp_path / "beam-temp-features-x"
    sizes = {f"a{k:02d}": 30 for k in range(40)} | {"b00": 500, "c00": 150}  # 100 is a tenth of 1,000
    parts = _parts(temp, sizes)
    prefix = str(tmp_path / "features")
    shards = finalize(parts, prefix, str(temp), SCHEMA, max_rows=1000)
    rows = {pq.read_table(s).column("id")[0].as_py(): pq.ParquetFile(s).metadata.num_rows for s in shards}
    assert rows == {"a00-00": 990, "a33-00": 210, "b00-00": 500, "c00-00": 150}  # 33 x 30 rows, then 7 x 30
    table, _ = read_shards(prefix)
    assert table.num_rows == sum(sizes.values()) == len(set(table.column("id").to_pylist()))


def test_finalize_after_a_retry_that_stopped_half_way(tmp_path):
    """The big part was renamed to its shard before a crash; the retry merges the eleven small parts and
    renames the rest, and the set is whole."""
    temp = tmp_path / "beam-temp-features-x"
    parts = _parts(temp, {"i001": 40} | {f"s{k:02d}": 2 for k in range(11)})
    prefix = str(tmp_path / "features")
    big = temp / "i001.parquet"
    big.rename(tmp_path / "features-00000-of-00002.parquet")
    shards = finalize(parts, prefix, str(temp), SCHEMA, max_rows=50)
    table, _ = read_shards(prefix)
    assert len(shards) == 2 and table.num_rows == 62 and not temp.exists()
    assert pq.ParquetFile(shards[1]).metadata.num_rows == 22


def test_a_few_small_parts_stay_as_they_are(tmp_path):
    """Ten small parts (a 10-worker job on a few images) are not rewritten: one shard each."""
    temp = tmp_path / "beam-temp-features-x"
    parts = _parts(temp, {f"a{k:02d}": 30 for k in range(10)})
    assert len(finalize(parts, str(tmp_path / "features"), str(temp), SCHEMA, max_rows=1000)) == 10


def test_a_retry_after_the_renames_does_not_merge_again(tmp_path, monkeypatch):
    """A finalize step that renamed everything but died before removing its temporary folder: the retry finds
    the merged shard in place and rewrites nothing."""
    from pipeline.stages import shards as module

    temp = tmp_path / "beam-temp-features-x"
    parts = _parts(temp, {f"s{k:02d}": 2 for k in range(11)})
    prefix = str(tmp_path / "features")
    monkeypatch.setattr(module.fs, "delete_tree", lambda path: None)  # the crash before the clean-up
    shards = finalize(parts, prefix, str(temp), SCHEMA, max_rows=50)
    merges = []
    monkeypatch.setattr(module, "_merge", lambda *args: merges.append(args))
    assert finalize(parts, prefix, str(temp), SCHEMA, max_rows=50) == shards and merges == []
    assert pq.ParquetFile(shards[0]).metadata.num_rows == 22
