import csv
import json
import os

import numpy as np
import pytest

from jobs.extract import run
from pipeline.errors import CairnError, parse_dead_letters
from pipeline.images import DecodeConfig
from pipeline.parquet_io import read_shards
from pipeline.schemas import cairn_metadata, vectors_of
from pipeline.stages.extract import extract
from tests.conftest import call_with_hang_guard, write_manifest


def _mixed_manifest(tmp_path, tiny_synth, bad_images):
    good = list(csv.DictReader(open(tiny_synth / "train.csv")))
    rows = [(r["id"], tiny_synth / r["path"], r["landmark_id"]) for r in good]
    rows += [(f"bad-{name}", path, 1) for name, (path, _) in bad_images.items()]
    rows += [("missing", tmp_path / "does-not-exist.jpg", 2), (good[0]["id"], tiny_synth / good[1]["path"], 1),
             ("badlabel", tiny_synth / good[0]["path"], "seven")]
    return write_manifest(tmp_path / "mixed.csv", rows), good


def test_multi_process_run_reconciles_every_record(tmp_path, tiny_synth, bad_images):
    manifest, good = _mixed_manifest(tmp_path, tiny_synth, bad_images)
    out = tmp_path / "out"
    record = extract(str(manifest), str(out), workers=2, threads=1, num_shards=2,
                     beam_args=["--runner=DirectRunner"])
    assert record["workers"] == 2 and record["runner"] == "DirectRunner"

    table, meta = read_shards(str(out / "features"))
    dead = parse_dead_letters((out / "dead_letters.csv").read_text())
    feature_ids = set(table.column("id").to_pylist())
    dead_by_id = {(d.id, d.stage): d for d in dead}
    expected_ok = {r["id"] for r in good} | {f"bad-{n}" for n, (_, e) in bad_images.items() if e == "ok"}
    assert feature_ids == expected_ok
    for name, (_, expected) in bad_images.items():
        if expected != "ok":
            assert (f"bad-{name}", expected) in dead_by_id, name
    assert ("missing", "read") in dead_by_id and "not found" in dead_by_id[("missing", "read")].reason
    assert (good[0]["id"], "manifest") in dead_by_id and ("badlabel", "manifest") in dead_by_id
    # inputs = outputs + dead letters, and the job's own record says so
    rows_in = sum(1 for _ in open(manifest)) - 1
    assert rows_in == len(feature_ids) + len(dead) == table.num_rows + len(dead)
    assert record["counts"]["inputs"] == rows_in and record["counts"]["outputs"] == len(feature_ids)
    assert record["counts"]["dead_by_stage"]["manifest"] == 2
    # vectors are unit float32 rows with the extractor's description inside the files
    xb = vectors_of(table)
    norms = dict(zip(table.column("id").to_pylist(), np.linalg.norm(xb, axis=1), strict=True))
    assert xb.shape == (len(feature_ids), 1764)
    assert norms.pop("bad-cmyk.jpg") == 0  # a flat colour has no gradients: a zero HoG, not NaN
    assert np.allclose(list(norms.values()), 1, atol=1e-4)
    assert meta["method"] == "hog" and meta["dim"] == 1764 and meta["config"]["size"] == 128
    assert len(list(out.glob("features-*-of-00002.parquet"))) == 2
    assert json.loads((out / "extract.json").read_text())["config"]["decode"]["max_side"] == 1024


def test_multi_process_equals_in_process(tmp_path, tiny_synth):
    manifest = str(tiny_synth / "train.csv")
    a = extract(manifest, str(tmp_path / "a"), workers=1, threads=1)
    b = extract(manifest, str(tmp_path / "b"), workers=2, threads=1)
    ta, _ = read_shards(str(tmp_path / "a" / "features"))
    tb, _ = read_shards(str(tmp_path / "b" / "features"))
    ta, tb = ta.sort_by("id"), tb.sort_by("id")
    assert ta.column("id").to_pylist() == tb.column("id").to_pylist()
    np.testing.assert_array_equal(vectors_of(ta), vectors_of(tb))
    assert a["counts"] == b["counts"]


def test_rerun_reuses_only_with_the_same_config(tmp_path, tiny_synth, caplog):
    manifest = str(tiny_synth / "train.csv")
    out = str(tmp_path / "out")
    first = extract(manifest, out, workers=1)
    caplog.set_level("INFO")
    again = extract(manifest, out, workers=1)
    assert again.pop("cost") == {"reused": True} and "reusing" in caplog.text  # a reused stage costs nothing
    assert first.pop("cost")["units"] == 20  # the first run's cost: its 20 input rows
    assert again == first
    changed = extract(manifest, out, workers=1, params={"size": 64, "cell": 16})
    assert changed["dim"] != first["dim"]
    _, meta = read_shards(out + "/features")
    assert meta["config"]["size"] == 64  # old shards were replaced, not mixed in


def test_unknown_method_and_bad_flags_are_user_errors(tmp_path, tiny_synth):
    with pytest.raises(CairnError, match="cnn needs a model"):
        extract(str(tiny_synth / "train.csv"), str(tmp_path / "o"), method="cnn")
    with pytest.raises(CairnError, match="'delf\\+sv' is not an extractor"):
        extract(str(tiny_synth / "train.csv"), str(tmp_path / "o"), method="delf+sv")
    with pytest.raises(CairnError, match="delf needs a model"):
        extract(str(tiny_synth / "train.csv"), str(tmp_path / "o"), method="delf")
    with pytest.raises(CairnError, match="'surf' is not an extractor"):  # the stage knows its extractors
        extract(str(tiny_synth / "train.csv"), str(tmp_path / "o"), method="surf")
    with pytest.raises(CairnError, match="unknown method 'surf'"):  # the command also knows every method
        run(["--manifest", str(tiny_synth / "train.csv"), "--out", str(tmp_path / "o"), "--method", "surf"])
    with pytest.raises(CairnError, match="--max-side"):
        run(["--manifest", str(tiny_synth / "train.csv"), "--out", str(tmp_path / "o"), "--max-side", "-1"])


def test_empty_outcome_still_writes_a_valid_shard_set(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [("a", tmp_path / "nope.jpg", 1), ("a", "x.jpg", 1)])
    record = extract(str(manifest), str(tmp_path / "out"), workers=1)
    assert record["counts"] == {"inputs": 2, "outputs": 0, "dead_letters": 2,
                                "dead_by_stage": {"manifest": 1, "read": 1}}
    table, meta = read_shards(str(tmp_path / "out" / "features"))
    assert table.num_rows == 0 and cairn_metadata(table.schema)["dim"] == 1764


def test_reuse_needs_the_same_resolved_images_and_complete_outputs(tmp_path, tiny_synth, monkeypatch):
    import shutil

    first = sorted((tiny_synth / "images").rglob("*.jpg"))[:2]
    for name, src in (("a", first[0]), ("b", first[1])):
        (tmp_path / name).mkdir()
        shutil.copy(src, tmp_path / name / "x.jpg")
        write_manifest(tmp_path / name / "m.csv", [("x", "x.jpg", 1)])
    out = str(tmp_path / "out")
    monkeypatch.chdir(tmp_path / "a")
    va = vectors_of(read_shards(out + "/features")[0]) if extract("m.csv", out, workers=1) else None
    monkeypatch.chdir(tmp_path / "b")  # same manifest text, other folder, other image: no reuse
    extract("m.csv", out, workers=1)
    vb = vectors_of(read_shards(out + "/features")[0])
    assert not np.array_equal(va, vb)
    for f in (tmp_path / "out").glob("features-*"):
        f.unlink()
    again = extract("m.csv", out, workers=1)  # outputs gone: recomputed, not "reused"
    assert again["counts"]["outputs"] == 1 and read_shards(out + "/features")[0].num_rows == 1


def test_a_fifo_a_device_and_an_oversized_file_become_dead_letters_not_a_hang(tmp_path, tiny_synth):
    good = list(csv.DictReader(open(tiny_synth / "train.csv")))[:2]
    fifo, big = tmp_path / "pipe.jpg", tmp_path / "big.jpg"
    os.mkfifo(fifo)
    with open(big, "wb") as f:
        f.truncate(4 << 20)  # sparse, above the cap below
    rows = [(r["id"], tiny_synth / r["path"], r["landmark_id"]) for r in good]
    rows += [("fifo", fifo, 1), ("zero", "/dev/zero", 1), ("big", big, 1)]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    # the cap is given so that a Cairn without one fails here at once instead of reading /dev/zero until memory ends
    decode = DecodeConfig(max_bytes=1 << 20)
    finished, record = call_with_hang_guard(lambda: extract(str(manifest), str(out), workers=1, decode=decode), fifo)
    assert finished, "the extraction hung on the FIFO"
    assert isinstance(record, dict), record
    dead = {d.id: d for d in parse_dead_letters((out / "dead_letters.csv").read_text())}
    assert set(dead) == {"fifo", "zero", "big"} and {d.stage for d in dead.values()} == {"read"}
    assert "FIFO" in dead["fifo"].reason and "character device" in dead["zero"].reason
    assert "--max-image-bytes" in dead["big"].reason
    assert record["counts"]["outputs"] == 2 and record["config"]["decode"]["max_bytes"] == 1 << 20


def test_max_image_bytes_flag_reaches_the_decode_config(tmp_path, tiny_synth):
    argv = ["--manifest", str(tiny_synth / "train.csv"), "--out", str(tmp_path / "o"), "--workers", "1"]
    with pytest.raises(CairnError, match="--max-image-bytes must be >= 1"):
        run([*argv, "--max-image-bytes", "0"])
    record = run([*argv, "--max-image-bytes", "123456"])
    assert record["config"]["decode"]["max_bytes"] == 123456
