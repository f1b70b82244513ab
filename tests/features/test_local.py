import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.local import LocalFeatures, _unpack, local_features_from_table, local_features_table
from pipeline.schemas import cairn_metadata, local_features_schema

DIM = 8


def make(n: int, seed: int, dtype=np.float32, dim: int = DIM) -> LocalFeatures:
    rng = np.random.default_rng(seed)
    desc = rng.integers(0, 256, (n, dim)) if dtype == np.uint8 else rng.standard_normal((n, dim))
    return LocalFeatures(
        keypoints=rng.uniform(0, 100, (n, 2)).astype(np.float32),
        scales=rng.uniform(1, 20, n).astype(np.float32),
        orientations=rng.uniform(0, 360, n).astype(np.float32),
        scores=rng.uniform(0, 1, n).astype(np.float32),
        descriptors=desc.astype(dtype),
        width=100 + n,
        height=50 + seed,
    )


def assert_same(got: LocalFeatures, want: LocalFeatures) -> None:
    for name in ("keypoints", "scales", "orientations", "scores", "descriptors"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype and g.shape == w.shape, name
        np.testing.assert_array_equal(g, w, err_msg=name)
    assert (got.width, got.height) == (want.width, want.height)


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_round_trip_with_empty_and_non_empty_images(dtype, tmp_path):
    np_dtype = np.dtype(dtype)
    feats = [make(3, 0, np_dtype), make(0, 1, np_dtype), make(5, 2, np_dtype),
             LocalFeatures.empty(DIM, 7, 9, np_dtype), make(1, 4, np_dtype)]
    schema = local_features_schema(DIM, dtype, {"method": "test"})
    table = local_features_table(["a", "b", "c", "d", "e"], [1, None, 2, None, 3], feats, schema)
    assert table.num_rows == 5 and table.schema.equals(schema, check_metadata=True)
    assert table.column("landmark_id").to_pylist() == [1, None, 2, None, 3]
    # uint8 descriptors are DIM-byte values (one Parquet value per keypoint), float32 ones lists of DIM floats
    want_type = pa.list_(pa.binary()) if dtype == "uint8" else pa.list_(pa.list_(pa.float32(), DIM))
    assert table.column("descriptors").type == want_type
    for got, want in zip(local_features_from_table(table), feats, strict=True):
        assert_same(got, want)
    # ... and through a Parquet file, the form the pipeline stores
    pq.write_table(table, tmp_path / "local-00000-of-00001.parquet")
    read = pq.read_table(tmp_path / "local-00000-of-00001.parquet")
    assert cairn_metadata(read.schema)["method"] == "test"
    for got, want in zip(local_features_from_table(read), feats, strict=True):
        assert_same(got, want)


def test_no_images_gives_an_empty_table():
    table = local_features_table([], [], [], local_features_schema(DIM))
    assert table.num_rows == 0 and local_features_from_table(table) == []


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_sliced_and_rechunked_tables_unpack_correctly(dtype):
    np_dtype = np.dtype(dtype)
    feats = [make(3, 0, np_dtype), make(0, 1, np_dtype), make(5, 2, np_dtype), make(2, 3, np_dtype)]
    table = local_features_table(list("abcd"), [0, 1, 2, 3], feats, local_features_schema(DIM, dtype))
    for start, length in [(1, 2), (2, 2), (3, 1), (1, 0)]:
        got = local_features_from_table(table.slice(start, length))
        assert len(got) == length
        for g, w in zip(got, feats[start: start + length], strict=True):
            assert_same(g, w)
    # several chunks, each of them a slice
    two = pa.concat_tables([table.slice(0, 1), table.slice(2, 2)])
    assert two.column("descriptors").num_chunks == 2
    for g, w in zip(local_features_from_table(two), [feats[0], feats[2], feats[3]], strict=True):
        assert_same(g, w)


def test_unpack_list_whose_values_are_a_slice():
    """List offsets index the child array as seen through its own offset (Arrow's layout).

    ``combine_chunks`` copies, so through a table this case never reaches ``_unpack``; a plain array does.
    """
    rows = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    child = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), 4).slice(2)  # rows 2..9
    lists = pa.ListArray.from_arrays(pa.array([0, 1, 3], pa.int32()), child)
    first, second = _unpack(lists, 4, np.float32)
    np.testing.assert_array_equal(first, rows[2:3])
    np.testing.assert_array_equal(second, rows[3:5])
    # and a sliced list array over an unsliced child
    whole = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), 4)
    lists = pa.ListArray.from_arrays(pa.array([0, 2, 5, 9], pa.int32()), whole).slice(1)
    a, b = _unpack(lists, 4, np.float32)
    np.testing.assert_array_equal(a, rows[2:5])
    np.testing.assert_array_equal(b, rows[5:9])
    values = pa.array(np.arange(6, dtype=np.float32))
    scalars = pa.ListArray.from_arrays(pa.array([0, 2, 5], pa.int32()), values)
    np.testing.assert_array_equal(_unpack(scalars.slice(1), None, np.float32)[0], [2, 3, 4])


def test_uint8_descriptors_are_one_binary_value_per_keypoint_in_their_byte_order():
    feats = [make(2, 0, np.uint8), make(3, 1, np.uint8)]
    table = local_features_table(["a", "b"], [0, 1], feats, local_features_schema(DIM, "uint8"))
    assert table.column("descriptors").to_pylist() == [[row.tobytes() for row in f.descriptors] for f in feats]


def test_version_1_uint8_descriptors_as_lists_of_bytes_are_still_read(tmp_path):
    """Folders written before version 2 hold list<fixed_size_list<uint8>[dim]>: the same features come back."""
    feats = [make(3, 0, np.uint8), make(0, 1, np.uint8), make(2, 2, np.uint8)]
    table = local_features_table(list("abc"), [0, None, 2], feats, local_features_schema(DIM, "uint8"))
    lengths = np.array([len(f) for f in feats])
    old = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32()),
        pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate([f.descriptors for f in feats]).reshape(-1)), DIM))
    v1 = table.set_column(table.schema.get_field_index("descriptors"), "descriptors", old)
    assert v1.schema.field("descriptors").type == pa.list_(pa.list_(pa.uint8(), DIM))
    pq.write_table(v1, tmp_path / "local-00000-of-00001.parquet")
    read = pq.read_table(tmp_path / "local-00000-of-00001.parquet")
    for got, want in zip(local_features_from_table(read), feats, strict=True):
        assert_same(got, want)
    for got, want in zip(local_features_from_table(read.slice(1, 2)), feats[1:], strict=True):
        assert_same(got, want)


def test_unpack_binary_values_that_are_a_slice():
    rows = np.arange(6 * 4, dtype=np.uint8).reshape(6, 4)
    child = pa.array([r.tobytes() for r in rows], pa.binary()).slice(1)  # rows 1..5
    lists = pa.ListArray.from_arrays(pa.array([0, 2, 2, 5], pa.int32()), child)
    first, empty, last = _unpack(lists, 4, np.uint8)
    np.testing.assert_array_equal(first, rows[1:3])
    assert empty.shape == (0, 4) and empty.dtype == np.uint8
    np.testing.assert_array_equal(last, rows[3:6])
    (only,) = _unpack(lists.slice(2), 4, np.uint8)
    np.testing.assert_array_equal(only, rows[3:6])
    # without a width (a table that lost its metadata) the values' own length is the width
    np.testing.assert_array_equal(_unpack(lists, None, np.uint8)[2], rows[3:6])


def test_a_descriptor_of_the_wrong_length_is_an_error_not_a_misread():
    values = pa.array([b"\x01\x02\x03\x04", b"\x05\x06\x07"], pa.binary())
    lists = pa.ListArray.from_arrays(pa.array([0, 2], pa.int32()), values)
    with pytest.raises(ValueError, match="3 bytes where the features have 4"):
        _unpack(lists, 4, np.uint8)
    with pytest.raises(ValueError, match="3 bytes where the features have 4"):
        _unpack(lists, None, np.uint8)


def test_empty_constructor():
    e = LocalFeatures.empty(DIM, 640, 480, np.uint8)
    assert len(e) == 0 and e.keypoints.shape == (0, 2) and e.descriptors.shape == (0, DIM)
    assert e.descriptors.dtype == np.uint8 and (e.width, e.height) == (640, 480)
    e.validate(DIM)


def test_validate_accepts_good_records():
    make(4, 0).validate(DIM)
    make(4, 0, np.uint8).validate(DIM)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda f: setattr(f, "descriptors", f.descriptors[:, :-1]), "descriptors"),
        (lambda f: setattr(f, "descriptors", f.descriptors[:-1]), "descriptors"),
        (lambda f: setattr(f, "keypoints", np.zeros((4, 3), np.float32)), "keypoints"),
        (lambda f: setattr(f, "keypoints", np.zeros((3, 2), np.float32)), "keypoints"),
        (lambda f: setattr(f, "scales", f.scales[:-1]), "scales"),
        (lambda f: setattr(f, "orientations", f.orientations.reshape(4, 1)), "orientations"),
        (lambda f: setattr(f, "scores", np.zeros(5, np.float32)), "scores"),
        (lambda f: f.keypoints.__setitem__((1, 0), np.nan), "non-finite"),
        (lambda f: f.scales.__setitem__(2, np.inf), "non-finite"),
        (lambda f: f.scores.__setitem__(0, np.nan), "non-finite"),
        (lambda f: f.descriptors.__setitem__((3, 3), np.nan), "non-finite"),
    ],
)
def test_validate_rejects_bad_records(change, match):
    f = make(4, 0)
    change(f)
    with pytest.raises(ValueError, match=match):
        f.validate(DIM)


def test_validate_rejects_the_wrong_dimension():
    with pytest.raises(ValueError, match="descriptors"):
        make(4, 0).validate(DIM + 1)
