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


def test_finalize_renames_what_committed_removes_the_rest_and_can_run_again(tmp_path):
    temp = tmp_path / "beam-temp-features-x"
    temp.mkdir()
    parts = []
    for first in ("i005", "i001"):
        path = temp / f"{first}.parquet"
        pq.write_table(_tables([[first]])[0], path)
        parts.append((first, 1, str(path)))
    (temp / "failed-bundle.parquet").write_bytes(b"a part of a bundle that did not commit")
    prefix = str(tmp_path / "features")
    shards = finalize(parts, prefix, str(temp), SCHEMA)
    assert [pq.read_table(s).column("id")[0].as_py() for s in shards] == ["i001", "i005"]
    assert not temp.exists()
    assert finalize(parts, prefix, str(temp), SCHEMA) == shards  # a retried finalize step
