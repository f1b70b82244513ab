import csv
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.extract import run
from pipeline.errors import CairnError, parse_dead_letters
from pipeline.featuresets import features_fingerprint
from pipeline.images import DecodeConfig
from pipeline.parquet_io import read_shards
from pipeline.schemas import cairn_metadata, vectors_of
from pipeline.stages.extract import extract
from tests.conftest import call_with_hang_guard, side, write_manifest


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
    dead = parse_dead_letters((side(out) / "dead_letters.csv").read_text())
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
    assert json.loads((side(out) / "extract.json").read_text())["config"]["decode"]["max_side"] == 1024


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
    # the validated manifest's shards say what they are, as every Parquet file Cairn writes does
    manifest = pq.read_schema(next(side(tmp_path / "a").glob("manifest-*.parquet")))
    meta = json.loads(manifest.metadata[b"cairn"])
    assert meta["kind"] == "manifest" and meta["source"].endswith("train.csv") and "mtime_ns" in meta["columns"]


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
    dead = {d.id: d for d in parse_dead_letters((side(out) / "dead_letters.csv").read_text())}
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


def _copied_set(tmp_path, tiny_synth, split: str = "queries", n: int = 6) -> tuple[Path, list[Path]]:
    """The first ``n`` images of a tiny_synth split copied under tmp_path (tests change them) with their manifest."""
    import shutil

    rows = list(csv.DictReader(open(tiny_synth / f"{split}.csv")))[:n]
    (tmp_path / "img").mkdir(exist_ok=True)
    images = []
    for r in rows:
        images.append(tmp_path / "img" / f"{r['id']}.jpg")
        shutil.copy(tiny_synth / r["path"], images[-1])
    manifest = write_manifest(tmp_path / f"{split}.csv", [(r["id"], f"img/{r['id']}.jpg", r["landmark_id"] or "")
                                                         for r in rows])
    return manifest, images


def test_rerun_extracts_again_when_an_image_changed_in_place(tmp_path, tiny_synth, caplog):
    """Issue 23 item 2: the manifest's bytes are the same, but an image was replaced in place: its size or
    modification time differs from what the job recorded, so the rerun extracts again and says which image."""
    import os
    import shutil

    manifest, images = _copied_set(tmp_path, tiny_synth)
    out = str(tmp_path / "out")
    first = extract(str(manifest), out, workers=1)
    trained_on = features_fingerprint(out)  # what a PCA or vocabulary trained on these features is keyed by
    before = dict(zip(*[read_shards(out + "/features")[0].column(c).to_pylist() for c in ("id", "vector")],
                      strict=True))
    shutil.copy(images[1], images[0])  # the first query is now the second's picture
    stat = os.stat(images[1])
    os.utime(images[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    caplog.set_level("INFO")
    again = extract(str(manifest), out, workers=1)
    assert "reusing" not in caplog.text and again.get("cost") != {"reused": True}
    changed = images[0].stem
    assert f"1 of 6 images changed since they were extracted (size or modification time): {changed} (" in caplog.text
    table = read_shards(out + "/features")[0]
    after = dict(zip(table.column("id").to_pylist(), table.column("vector").to_pylist(), strict=True))
    assert after[changed] == before[images[1].stem] != before[changed]  # the new picture's features, not stale
    assert again["counts"] == first["counts"] and features_fingerprint(out) != trained_on  # a trainer trains again
    caplog.clear()
    extract(str(manifest), out, workers=1)  # nothing changed since: reused
    assert "reusing" in caplog.text and "changed" not in caplog.text
    os.utime(images[2])  # touched: another modification time (the bytes may be the same: it cannot tell)
    os.remove(images[3])  # gone: now a dead letter rather than a feature
    caplog.clear()
    gone = extract(str(manifest), out, workers=1)
    assert "2 of 6 images changed" in caplog.text and gone["counts"]["dead_by_stage"] == {"read": 1}


def test_rerun_verifies_the_shards_it_would_reuse(tmp_path, tiny_synth, caplog):
    """Issue 23 item 3: a features shard copied in from another folder, or truncated, is not the job's own: the
    rerun says why and extracts again (before, the first was reused, the second a traceback on every rerun)."""
    import shutil

    train, queries = str(tmp_path / "train"), str(tmp_path / "queries")
    record = extract(str(tiny_synth / "train.csv"), train, workers=1)
    extract(str(tiny_synth / "queries.csv"), queries, workers=1)
    shard = "features-00000-of-00001.parquet"
    assert set(record["files"]) == {shard, "manifest-00000-of-00001.parquet", "dead_letters.csv"}
    assert record["files"][shard]["rows"] == 20 and len(record["files"][shard]["sha256"]) == 64
    original = read_shards(train + "/features")[0].sort_by("id")
    shutil.copy(f"{queries}/{shard}", f"{train}/{shard}")  # a valid shard, of another folder
    caplog.set_level("INFO")
    again = extract(str(tiny_synth / "train.csv"), train, workers=1)
    assert "reusing" not in caplog.text and f"cannot reuse {train}: {shard} has" in caplog.text
    assert again.get("cost") != {"reused": True} and read_shards(train + "/features")[0].sort_by("id").equals(original)

    data = (tmp_path / "train" / shard).read_bytes()
    (tmp_path / "train" / shard).write_bytes(data[: len(data) // 2])  # truncated
    caplog.clear()
    extract(str(tiny_synth / "train.csv"), train, workers=1)
    assert "(truncated or replaced); extracting again" in caplog.text
    assert read_shards(train + "/features")[0].sort_by("id").equals(original)

    flipped = bytearray((tmp_path / "train" / shard).read_bytes())  # same size, other bytes
    flipped[len(flipped) // 2] ^= 0xFF
    (tmp_path / "train" / shard).write_bytes(bytes(flipped))
    caplog.clear()
    extract(str(tiny_synth / "train.csv"), train, workers=1)
    assert f"{shard} is not the file the job wrote (its sha256 differs)" in caplog.text
    shutil.copy(f"{queries}/{shard}", f"{train}/local-00000-of-00001.parquet")  # an extra shard of another kind
    caplog.clear()
    extract(str(tiny_synth / "train.csv"), train, workers=1)
    assert "local-00000-of-00001.parquet not written by the job that recorded it" in caplog.text
    (tmp_path / "train" / shard).write_bytes((tmp_path / "train" / shard).read_bytes())  # touched, same bytes
    caplog.clear()
    extract(str(tiny_synth / "train.csv"), train, workers=1)
    assert "reusing" in caplog.text and "cannot reuse" not in caplog.text  # its checksum was read and matched


def test_readers_refuse_shards_the_record_does_not_list(tmp_path, tiny_synth):
    """Issue 23 item 3: `cairn index` (and every reader of a features folder) refuses a shard that is not the one
    the extraction recorded, with one line, instead of indexing the wrong vectors or a traceback."""
    import shutil

    from pipeline.stages.index import build_index

    rows = [(r["id"], tiny_synth / r["path"], r["landmark_id"]) for r in csv.DictReader(open(tiny_synth / "train.csv"))]
    a, b, shard = tmp_path / "a", tmp_path / "b", "features-00000-of-00001.parquet"
    extract(str(write_manifest(tmp_path / "a.csv", rows[:6])), str(a), workers=1)
    extract(str(write_manifest(tmp_path / "b.csv", rows[6:12])), str(b), workers=1)
    assert build_index(str(a), str(tmp_path / "index"))["count"] == 6
    saved = (a / shard).read_bytes()
    shutil.copy(b / shard, a / shard)  # a valid shard of other images
    with pytest.raises(CairnError, match=f"{shard} (has \\d+ bytes where the job wrote \\d+ \\(truncated or "
                                         "replaced\\)|is not the file the job wrote \\(its Parquet footer "
                                         "differs\\)); its features are not what extract.json records"):
        build_index(str(a), str(tmp_path / "index"))
    footer = bytearray(saved)  # the same size, another footer (as a shard of as many other rows may have)
    footer[-20] ^= 0xFF
    (a / shard).write_bytes(bytes(footer))
    with pytest.raises(CairnError, match=f"{shard} is not the file the job wrote \\(its Parquet footer differs\\)"):
        build_index(str(a), str(tmp_path / "index"))
    (a / shard).write_bytes(saved[:-100])  # truncated
    with pytest.raises(CairnError, match=f"{shard} has {len(saved) - 100} bytes where the job wrote {len(saved)}"):
        build_index(str(a), str(tmp_path / "index"))
    (a / shard).unlink()
    shutil.copy(b / shard, a / "features-00000-of-00002.parquet")  # a whole shard set again, but not the recorded one
    shutil.copy(b / shard, a / "features-00001-of-00002.parquet")
    with pytest.raises(CairnError, match="features-00000-of-00002.parquet, features-00001-of-00002.parquet not "
                                         "written by the job"):
        build_index(str(a), str(tmp_path / "index"))


def test_a_terminal_sees_the_images_done_of_a_multi_process_extraction(tmp_path, tiny_synth, capsys, monkeypatch):
    """The longest stage showed nothing at all on a terminal: the workers now count the images they read into a
    scratch folder, which the launching process adds up into a bar; the folder is gone afterwards."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    record = extract(str(tiny_synth / "train.csv"), str(tmp_path / "out"), workers=2, threads=1,
                     show_progress=True)
    n = record["counts"]["inputs"]
    err = capsys.readouterr().err
    assert f"{n}/{n}" in err and "extract" in err and "img/s" in err
    assert list((tmp_path / "scratch").iterdir()) == []


def test_the_cnn_job_gives_the_extractor_s_vectors_and_records_its_start_up(tmp_path, tiny_synth, tiny_embedder):
    """Issue 25: decoding ahead of the model in a pool changes no vector (each is the extractor's own on that
    image), and the record splits the start-up out: pipeline construction, and the model load for a job that
    has a model."""
    from features.cnn import CnnConfig, CnnExtractor
    from pipeline.images import load_image

    record = extract(str(tiny_synth / "train.csv"), str(tmp_path / "cnn"), method="cnn",
                     params={"model": tiny_embedder, "batch_size": 3}, workers=1, threads=2)
    table, _ = read_shards(str(tmp_path / "cnn" / "features"))
    extractor = CnnExtractor(CnnConfig(model=tiny_embedder), threads=1)
    paths = {r["id"]: tiny_synth / r["path"] for r in csv.DictReader(open(tiny_synth / "train.csv"))}
    expected = np.stack([extractor.extract(load_image(str(paths[i]))) for i in table.column("id").to_pylist()])
    assert table.num_rows == len(paths) and np.allclose(vectors_of(table), expected, atol=1e-5)
    assert record["startup"]["build_seconds"] > 0 and record["startup"]["model_load_seconds"] > 0
    hog = extract(str(tiny_synth / "train.csv"), str(tmp_path / "hog"), workers=1)
    assert hog["startup"]["build_seconds"] > 0 and "model_load_seconds" not in hog["startup"]


def test_hog_and_sift_rows_travel_in_chunks_that_lose_and_reorder_nothing(tmp_path):
    """Issue 25: the manifest is read as tables and cut into chunks of EXTRACT_BATCH rows, which cross the shuffle
    and the progress count as one element each; every row is in exactly one chunk, in order, and the progress
    counts images, not chunks."""
    import pyarrow as pa

    from pipeline.stages.progress import CountImages, read_counts
    from pipeline.stages.transforms import EXTRACT_BATCH, row_chunks

    n = 2 * EXTRACT_BATCH + 5
    table = pa.table({"id": [f"i{k}" for k in range(n)], "landmark_id": list(range(n))})
    chunks = list(row_chunks(table, EXTRACT_BATCH))
    assert [len(c) for c in chunks] == [EXTRACT_BATCH, EXTRACT_BATCH, 5]
    assert [r["id"] for c in chunks for r in c] == table.column("id").to_pylist()
    assert chunks[2][4] == {"id": f"i{n - 1}", "landmark_id": n - 1}

    counter = CountImages(str(tmp_path), per_element=len)
    counter.setup()
    for c in chunks:
        assert list(counter.process(c)) == [c]
    counter.finish_bundle()
    assert read_counts(str(tmp_path)) == n


def test_the_query_extraction_reuses_the_model_the_database_extraction_loaded(tmp_path, tiny_synth, tiny_embedder,
                                                                             monkeypatch):
    """Issue 25 part 4: the stages of a run that share a SharedModels (a method's database and query extractions)
    load a model once per process; the second stage's vectors are the same, and other params load their own.
    The cycle collector runs between the stages: the model must outlive the first stage because SharedModels
    holds it, not because the first stage's objects happen to be uncollected (CI once saw [3, 3] that way)."""
    import gc

    from pipeline.stages import inference
    from pipeline.stages.inference import EmbeddingModelHandler, SharedModels

    built = []
    original = EmbeddingModelHandler.build

    def build(self):
        built.append(self.params["batch_size"])
        return original(self)

    monkeypatch.setattr(EmbeddingModelHandler, "build", build)
    manifest = str(tiny_synth / "train.csv")
    params = {"model": tiny_embedder, "batch_size": 3}
    models = SharedModels()
    for out in ("database", "queries"):
        extract(manifest, str(tmp_path / out), method="cnn", params=params, workers=1, threads=1,
                shared_models=models)
        gc.collect()
    assert built == [3]
    first, _ = read_shards(str(tmp_path / "database" / "features"))
    second, _ = read_shards(str(tmp_path / "queries" / "features"))
    assert np.array_equal(vectors_of(first.sort_by("id")), vectors_of(second.sort_by("id")))

    extract(manifest, str(tmp_path / "other"), method="cnn", params={**params, "batch_size": 2}, workers=1,
            threads=1, shared_models=models)
    extract(manifest, str(tmp_path / "alone"), method="cnn", params=params, workers=1, threads=1)
    assert built == [3, 2, 3]
    assert models.handles["embed"] in inference._HELD
    models.release()  # the launcher's `with` block: the process lets the model go
    assert models.handles["embed"] not in inference._HELD


def test_automatic_shards_follow_the_work_and_hold_at_most_rows_per_shard(tmp_path, tiny_synth, monkeypatch):
    """Without --num-shards the features are written by the workers that extract them (no shuffle of the
    vectors): a shard per worker bundle and per ROWS_PER_SHARD rows, a complete set, every image once."""
    from pipeline.stages import extract as stage

    monkeypatch.setattr(stage, "ROWS_PER_SHARD", 5)
    manifest = str(tiny_synth / "train.csv")
    out = tmp_path / "out"
    record = extract(manifest, str(out), workers=2, threads=1, beam_args=["--runner=DirectRunner"])
    shards = sorted(out.glob("features-*.parquet"))
    rows = [pq.ParquetFile(s).metadata.num_rows for s in shards]
    images = sum(1 for _ in open(manifest)) - 1
    assert len(shards) >= 4 and max(rows) <= 5 and sum(rows) == record["counts"]["outputs"] == images
    assert all(s.name.endswith(f"-of-{len(shards):05d}.parquet") for s in shards)
    assert sorted(p.name for p in out.iterdir()) == [s.name for s in shards]  # no temporary folder left
    table, _ = read_shards(str(out / "features"))
    alone = extract(manifest, str(tmp_path / "fixed"), workers=1, threads=1, num_shards=1)
    fixed, _ = read_shards(str(tmp_path / "fixed" / "features"))
    assert alone["counts"]["outputs"] == images
    assert np.array_equal(vectors_of(table.sort_by("id")), vectors_of(fixed.sort_by("id")))
