import numpy as np

from features.local import LocalFeatures, local_features_table
from features.verify import RerankConfig
from index.rerank import load_local, spatial_rerank
from pipeline.parquet_io import write_table_shards
from pipeline.schemas import local_features_schema


def _scene(rng, n=300):
    pts = rng.uniform(0, 200, (n, 2)).astype(np.float32)
    desc = rng.normal(size=(n, 16)).astype(np.float32)
    return pts, desc


def _feats(pts, desc):
    n = len(pts)
    z = np.zeros(n, np.float32)
    return LocalFeatures(pts.astype(np.float32), z + 1, z, z, desc.astype(np.float32), 200, 200)


def test_load_local_reads_only_the_wanted_rows_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    feats = [_feats(*_scene(rng, 5 + i)) for i in range(6)]
    schema = local_features_schema(16)
    table = local_features_table([f"img{i}" for i in range(6)], [0] * 6, feats, schema)
    write_table_shards(table, str(tmp_path / "local"), num_shards=3)
    got = load_local(str(tmp_path / "local"), {"img1", "img4", "missing"})
    assert sorted(got) == ["img1", "img4"]
    np.testing.assert_array_equal(got["img4"].descriptors, feats[4].descriptors)
    assert load_local(str(tmp_path / "local"), set()) == {}


def test_spatial_rerank_moves_the_geometrically_consistent_image_first(tmp_path):
    rng = np.random.default_rng(1)
    pts, desc = _scene(rng)
    query = _feats(pts, desc)
    shifted = _feats(pts + [12.0, -7.0], desc + rng.normal(scale=0.01, size=desc.shape))  # same scene, moved
    others = [_feats(*_scene(rng)) for _ in range(3)]  # unrelated scenes
    schema = local_features_schema(16)
    write_table_shards(local_features_table(["q"], [None], [query], schema), str(tmp_path / "q"))
    db = others + [shifted]
    write_table_shards(local_features_table([f"d{i}" for i in range(4)], [1, 1, 1, 2], db, schema),
                       str(tmp_path / "db"))
    D = np.array([[0.9, 0.8, 0.7, 0.6]], np.float32)  # the global search ranked the true match last
    I = np.array([[0, 1, 2, 3]], np.int64)
    D2, I2, inliers = spatial_rerank(["q"], D, I, ["d0", "d1", "d2", "d3"], str(tmp_path / "q"), str(tmp_path / "db"),
                                     RerankConfig(top_k=4))
    assert I2[0, 0] == 3 and inliers[0, 0] >= 250
    assert np.all(np.diff(D2[0]) <= 0) and D2[0, 0] > 0.9
    assert sorted(I2[0]) == [0, 1, 2, 3]


def test_chunks_smaller_than_the_query_set_give_the_same_result(tmp_path):
    rng = np.random.default_rng(2)
    scenes = [_scene(rng) for _ in range(5)]
    schema = local_features_schema(16)
    db = [_feats(p + [5.0, 3.0], d + rng.normal(scale=0.01, size=d.shape)) for p, d in scenes]
    write_table_shards(local_features_table([f"d{i}" for i in range(5)], list(range(5)), db, schema),
                       str(tmp_path / "db"), num_shards=2)
    queries = [_feats(p, d) for p, d in scenes]
    write_table_shards(local_features_table([f"q{i}" for i in range(5)], [None] * 5, queries, schema),
                       str(tmp_path / "q"), num_shards=2)
    # every query's true match (d_i for q_i) sits at a different rank of the global list
    I = np.array([np.roll(np.arange(5), -((i + 2) % 5)) for i in range(5)], np.int64)
    D = np.tile(np.linspace(0.9, 0.5, 5, dtype=np.float32), (5, 1))
    args = (["q0", "q1", "q2", "q3", "q4"], D, I, [f"d{i}" for i in range(5)], str(tmp_path / "q"),
            str(tmp_path / "db"), RerankConfig(top_k=5))
    whole = spatial_rerank(*args, chunk=500)
    pieces = spatial_rerank(*args, chunk=2)
    for a, b in zip(whole, pieces, strict=True):
        np.testing.assert_array_equal(a, b)
    assert list(whole[1][:, 0]) == [0, 1, 2, 3, 4]  # every query's own scene first
    assert np.all(whole[2][:, 0] >= 250) and np.all(whole[2][:, 1:] < 10)  # inliers aligned with the new order
