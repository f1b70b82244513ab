import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.parquet_io import find_shards, id_ordered_parts, read_file, read_shards, write_table_shards


def _table(n: int, seed: int) -> pa.Table:
    order = np.random.default_rng(seed).permutation(n)
    return pa.table({"id": [f"img{i // 2:03d}" for i in order], "region": pa.array(order % 2, pa.int32()),
                     "value": pa.array(order, pa.int64())})


def test_shards_read_back_in_id_order_whatever_their_split(tmp_path):
    """Shard order and split follow the workers that wrote them; the rows read back do not."""
    write_table_shards(_table(30, 1), str(tmp_path / "a" / "f"), 1)
    write_table_shards(_table(30, 2), str(tmp_path / "b" / "f"), 4)
    a, b = read_shards(str(tmp_path / "a" / "f"))[0], read_shards(str(tmp_path / "b" / "f"))[0]
    assert a.equals(b) and a.column("value").to_pylist() == list(range(30))  # by id, then region


def test_a_file_of_several_row_groups_reads_whole_with_its_metadata_and_columns(tmp_path):
    """read_file goes row group by row group (a whole-file read of binary lists over 2 GiB fails in Arrow)."""
    table = _table(30, 4).replace_schema_metadata({b"cairn": b'{"dim": 4}'})
    pq.write_table(table, tmp_path / "f.parquet", row_group_size=7)
    assert pq.ParquetFile(tmp_path / "f.parquet").num_row_groups == 5
    with open(tmp_path / "f.parquet", "rb") as f:
        back = read_file(f)
    assert back.equals(table) and back.schema.metadata == table.schema.metadata
    with open(tmp_path / "f.parquet", "rb") as f:
        assert read_file(f, columns=["value"]).column("value").to_pylist() == table.column("value").to_pylist()
    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    with open(tmp_path / "empty.parquet", "rb") as f:
        assert read_file(f).num_rows == 0


def test_id_ordered_parts_split_by_id_range_and_reload(tmp_path):
    write_table_shards(_table(30, 3), str(tmp_path / "f"), 3)
    paths = find_shards(str(tmp_path / "f"))
    with id_ordered_parts(paths, 8) as (parts, counts):
        tables = [part() for part in parts]
        assert [t.num_rows for t in tables] == counts and sum(counts) == 30 and len(parts) == 4
        values = [v for t in tables for v in t.column("value").to_pylist()]
        assert values == list(range(30))  # an image's regions stay in one part
        assert parts[1]().equals(tables[1])  # a part loads again (the index trains, then adds)
    with id_ordered_parts(paths, 100) as (parts, counts):
        assert counts == [30] and parts[0]().column("value").to_pylist() == list(range(30))
