import numpy as np
import pytest

from pipeline.parquet_io import write_table_shards
from pipeline.schemas import global_features_schema, global_features_table
from reports.html import ReportConfig, class_centroids


def test_class_centroids_stream_the_shards_and_keep_only_the_wanted_classes(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 4)).astype(np.float32)
    labels = [1, 2, 1, None, 3, 1, 2, None, 3]
    table = global_features_table([f"i{k}" for k in range(9)], labels, x, global_features_schema(4))
    prefix = str(tmp_path / "features")
    write_table_shards(table, prefix, num_shards=3)
    got = class_centroids(prefix, {1, 2, 7})
    assert sorted(got) == [1, 2]  # 7 has no image; 3 was not asked for
    np.testing.assert_allclose(got[1], x[[0, 2, 5]].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(got[2], x[[1, 6]].mean(axis=0), rtol=1e-6)
    assert got[1].dtype == np.float32


def test_report_config_refuses_bad_values():
    with pytest.raises(ValueError, match="examples must be >= 0"):
        ReportConfig(examples=-1)
    with pytest.raises(ValueError, match="thumb must be between 32 and 512"):
        ReportConfig(thumb=8)
