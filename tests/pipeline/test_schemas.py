import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import CairnError
from pipeline.parquet_io import count_rows, read_shards, write_table_shards
from pipeline.schemas import (
    cairn_metadata,
    global_features_schema,
    global_features_table,
    images_schema,
    labels_of,
    local_features_schema,
    vectors_of,
)


def test_global_features_round_trip_through_shards(tmp_path):
    rng = np.random.default_rng(0)
    xb = rng.normal(size=(10, 8)).astype(np.float32)
    schema = global_features_schema(8, {"method": "hog", "config": {"size": 128}})
    table = global_features_table([f"id{i}" for i in range(10)], [1, None] * 5, xb, schema)
    paths = write_table_shards(table, str(tmp_path / "features"), num_shards=3)
    assert [p.rsplit("/", 1)[1] for p in paths] == [f"features-0000{i}-of-00003.parquet" for i in range(3)]
    back, meta = read_shards(str(tmp_path / "features"))
    np.testing.assert_array_equal(vectors_of(back), xb)
    assert vectors_of(back).dtype == np.float32
    assert labels_of(back).tolist() == [1, -1] * 5
    assert back.column("id").to_pylist() == [f"id{i}" for i in range(10)]
    assert meta == {"schema": "cairn.global_features/1", "dim": 8, "method": "hog", "config": {"size": 128}}
    assert count_rows(str(tmp_path / "features")) == 10
    # the metadata is inside every file, not only in a side file
    assert cairn_metadata(pq.read_schema(paths[1]))["method"] == "hog"
    assert pq.read_schema(paths[0]).field("vector").type == pa.list_(pa.float32(), 8)


def test_wrong_dimension_is_refused():
    schema = global_features_schema(4)
    with pytest.raises(ValueError, match="expects"):
        global_features_table(["a"], [None], np.zeros((1, 5), np.float32), schema)


def test_incomplete_or_missing_shard_sets_are_errors(tmp_path):
    schema = global_features_schema(2)
    table = global_features_table(["a", "b"], [1, 2], np.ones((2, 2), np.float32), schema)
    paths = write_table_shards(table, str(tmp_path / "f"), num_shards=2)
    (tmp_path / paths[1].rsplit("/", 1)[1]).unlink()
    with pytest.raises(CairnError, match="incomplete"):
        read_shards(str(tmp_path / "f"))
    with pytest.raises(CairnError, match="no shards"):
        read_shards(str(tmp_path / "g"))


def test_local_features_and_images_schemas_hold_their_data(tmp_path):
    schema = local_features_schema(4, "uint8", {"method": "sift"})
    row = {"id": "a", "landmark_id": 3, "keypoints": [[1.5, 2.5], [3.0, 4.0]], "scales": [1.0, 2.0],
           "orientations": [0.0, 90.0], "scores": [0.5, 0.25], "descriptors": [b"\x01\x02\x03\x04", b"\x05\x06\x07\x08"],
           "width": 64, "height": 48}
    table = pa.Table.from_pylist([row], schema=schema)
    pq.write_table(table, tmp_path / "l.parquet")
    back = pq.read_table(tmp_path / "l.parquet")
    assert back.to_pylist() == [row]
    assert cairn_metadata(back.schema)["dtype"] == "uint8"
    assert back.schema.field("descriptors").type == pa.list_(pa.binary())
    images = pa.Table.from_pylist([{"id": "a", "landmark_id": None, "path": "a.jpg", "width": 3, "height": 2,
                                    "image": b"\xff\xd8"}], schema=images_schema())
    assert images.column("image").to_pylist() == [b"\xff\xd8"]


def test_local_features_and_images_shard_like_global_features(tmp_path):
    schema = local_features_schema(2, "float32", {"method": "sift", "config": {"max_features": 2}})
    rows = [{"id": f"i{n}", "landmark_id": n, "keypoints": [[float(n), 1.0]], "scales": [1.0], "orientations": [0.0],
             "scores": [1.0], "descriptors": [[0.5, 0.5]], "width": 8, "height": 8} for n in range(5)]
    write_table_shards(pa.Table.from_pylist(rows, schema=schema), str(tmp_path / "local"), num_shards=2)
    back, meta = read_shards(str(tmp_path / "local"))
    assert back.to_pylist() == rows and meta["method"] == "sift" and meta["schema"] == "cairn.local_features/2"
    images = [{"id": "a", "landmark_id": 1, "path": "a.jpg", "width": 2, "height": 1, "image": b"abc"}]
    write_table_shards(pa.Table.from_pylist(images, schema=images_schema({"source": "x.csv"})), str(tmp_path / "im"))
    back, meta = read_shards(str(tmp_path / "im"))
    assert back.to_pylist() == images and meta == {"schema": "cairn.images/1", "source": "x.csv"}


def test_sparse_features_round_trip_including_slices():
    import numpy as np
    import scipy.sparse as sp

    from pipeline.schemas import (
        cairn_metadata,
        sparse_features_schema,
        sparse_features_table,
        sparse_matrix_of,
    )

    m = sp.random(6, 50, density=0.2, format="csr", dtype=np.float32, random_state=3)
    m = sp.vstack([m, sp.csr_matrix((1, 50), dtype=np.float32)]).tocsr()  # an empty row too
    schema = sparse_features_schema(50, {"method": "sift-bovw"})
    table = sparse_features_table([str(i) for i in range(7)], [1, 2, None, 3, 4, 5, None], m, schema)
    assert cairn_metadata(table.schema)["dim"] == 50
    assert abs(sparse_matrix_of(table, 50) - m).max() == 0
    part = table.slice(2, 4)
    assert abs(sparse_matrix_of(part, 50) - m[2:6]).max() == 0
