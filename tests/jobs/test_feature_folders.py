"""Issue 24 item 1: a features folder is a data set that pandas, pyarrow.dataset and DuckDB read as is.

Before, the validated manifest shards, the dead letters and the job record lay beside the feature shards:
`pd.read_parquet(folder)` and `pyarrow.dataset` failed on dead_letters.csv (and, with it excluded, silently read
the manifest's rows too), DuckDB's `folder/*.parquet` failed on the two schemas. They now live in the sibling
folder `folder.cairn/`; not in a sub-folder, which autofaiss (embedding-reader: every `*.parquet` under the
folder, at any depth) would read.
"""

import json
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.featuresets import FEATURE_PREFIX, features_fingerprint, record_path
from pipeline.stages.extract import extract
from tests.conftest import side, write_manifest


def _read_everywhere(folder) -> dict[str, tuple[int, list[str], set]]:
    """{reader: (rows, column names, ids)} of a folder read as one data set by pandas, pyarrow.dataset and DuckDB,
    the way their docs say to read a folder of Parquet files, and by every Parquet file under it at any depth
    (as autofaiss lists them)."""
    frame = pd.read_parquet(folder)
    dataset = ds.dataset(folder, format="parquet").to_table()
    relation = duckdb.sql(f"SELECT * FROM read_parquet('{folder}/*.parquet')")
    duck_ids = {row[0] for row in duckdb.sql(f"SELECT id FROM '{folder}/*.parquet'").fetchall()}
    anywhere = pq.read_table(sorted(str(p) for p in Path(folder).rglob("*.parquet")))
    return {
        "every *.parquet under it": (anywhere.num_rows, anywhere.column_names,
                                     set(anywhere.column("id").to_pylist())),
        "pandas": (len(frame), list(frame.columns), set(frame["id"])),
        "pyarrow.dataset": (dataset.num_rows, dataset.column_names, set(dataset.column("id").to_pylist())),
        "duckdb": (len(relation.fetchall()), relation.columns, duck_ids),
    }


def _assert_one_data_set(folder) -> None:
    """Every reader sees exactly the rows and columns of the feature shards the job recorded."""
    folder = str(folder)
    record = json.loads(open(record_path(folder, "extract.json")).read())
    shards = [name for name in record["files"] if name.startswith(tuple(f"{p}-" for p in FEATURE_PREFIX.values()))]
    assert shards, record["files"]
    table = pq.read_table([f"{folder}/{name}" for name in shards])
    expected = (table.num_rows, table.column_names, set(table.column("id").to_pylist()))
    assert expected[0] == record["counts"]["outputs"]
    for reader, seen in _read_everywhere(folder).items():
        assert seen == expected, reader


def test_a_features_folder_with_dead_letters_reads_as_one_data_set(tmp_path, tiny_synth, bad_images):
    rows = [(f"bad-{name}", path, 1) for name, (path, _) in bad_images.items()]
    rows += [(f"t{i}", p, i % 3) for i, p in enumerate(sorted((tiny_synth / "train").glob("*.jpg"))[:8])]
    rows += [("missing", tmp_path / "nope.jpg", 1), ("t0", tiny_synth / "nope.jpg", 1)]  # a read and a manifest one
    out = tmp_path / "hog"
    record = extract(str(write_manifest(tmp_path / "m.csv", rows)), str(out), workers=1, num_shards=2)
    assert record["counts"]["dead_letters"] >= 3  # bad images, the missing file, the duplicate id
    top = sorted(p.name for p in out.iterdir())
    assert top == ["features-00000-of-00002.parquet", "features-00001-of-00002.parquet"], top
    assert sorted(p.name for p in side(out).iterdir()) == [
        "dead_letters.csv", "extract.json", "manifest-00000-of-00002.parquet", "manifest-00001-of-00002.parquet"]
    _assert_one_data_set(out)


def test_a_local_features_folder_reads_as_one_data_set(tmp_path, tiny_synth):
    out = tmp_path / "sift"
    extract(str(tiny_synth / "train.csv"), str(out), method="sift", workers=1)
    assert {p.name for p in out.iterdir()} == {"local-00000-of-00001.parquet"}
    _assert_one_data_set(out)


def test_a_folder_in_the_layout_before_cairn_side_files_is_still_read_and_a_rerun_cleans_it(tmp_path, tiny_synth):
    """A folder written before the side files moved to folder.cairn/ (they lay beside the shards): its record is
    still found by readers, and a rerun of the job writes the new layout and removes the old files."""
    out = tmp_path / "old"
    manifest = str(tiny_synth / "train.csv")
    extract(manifest, str(out), workers=1)
    fingerprint = features_fingerprint(str(out))
    for path in side(out).iterdir():  # the old layout: everything in the features folder
        shutil.move(path, out / path.name)
    side(out).rmdir()
    assert record_path(str(out), "extract.json") == str(out / "extract.json")
    assert features_fingerprint(str(out)) == fingerprint  # what was trained on it is still current
    with pytest.raises(Exception):  # noqa: B017 - the point: the old layout is not a data set
        pd.read_parquet(out)

    again = extract(manifest, str(out), workers=1)
    assert again["cost"]["reused"] is False
    assert {p.name for p in out.iterdir()} == {"features-00000-of-00001.parquet"}
    assert features_fingerprint(str(out)) == fingerprint
    _assert_one_data_set(out)


@pytest.mark.slow
def test_every_features_folder_of_the_demo_reads_as_one_data_set(small_demo):
    """Every kind a run writes (global, regional, local, sparse; extracted and encoded) in `cairn demo`."""
    folders = sorted({p.parent for prefix in FEATURE_PREFIX.values()
                      for p in (small_demo / "run" / "work").rglob(f"{prefix}-*-of-*.parquet")})
    kinds = set()
    for folder in folders:
        assert all(p.is_file() and p.suffix == ".parquet" for p in folder.iterdir()), folder
        record = next(json.loads((side(folder) / n).read_text()) for n in ("extract.json", "encode.json")
                      if (side(folder) / n).exists())
        kinds.add((record["kind"], record.get("regional", False)))
        seen = _read_everywhere(str(folder))
        assert {rows for rows, _, _ in seen.values()} == {record["counts"].get("regions", record["counts"]["outputs"])}
        assert len({tuple(cols) for _, cols, _ in seen.values()}) == 1, (folder, seen)
    assert {("global", False), ("global", True), ("local", False), ("sparse", False)} <= kinds, kinds
