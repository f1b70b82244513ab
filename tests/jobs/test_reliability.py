"""Reliability across the jobs: a killed extraction rerun equals an uninterrupted one; artefacts from elsewhere
or of another config are refused with one line."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import cairn, side, write_manifest


def _features(out) -> dict:
    """id -> (landmark_id, vector) of every shard of an extraction, and the shard names."""
    shards = sorted(p.name for p in out.iterdir() if p.name.startswith("features-"))
    rows = {}
    for name in shards:
        t = pq.read_table(out / name)
        for i, label, v in zip(t.column("id").to_pylist(), t.column("landmark_id").to_pylist(),
                               t.column("vector").to_pylist(), strict=True):
            assert i not in rows, f"{i} written twice"
            rows[i] = (label, np.asarray(v, np.float32))
    return rows


# Loaded by every Python process of the killed job (its worker processes too) through PYTHONPATH: the image named
# CAIRN_TEST_HANG_ON is "read" for ever, and CAIRN_TEST_HANG_MARK says a worker got there. (A FIFO did this before
# Cairn refused FIFOs before reading them.)
_HANG = """
import os
if os.environ.get("CAIRN_TEST_HANG_ON"):
    import time
    from pipeline import fs
    _read = fs.read_regular_file
    def read_regular_file(path, max_bytes):
        if os.path.basename(path) == os.environ["CAIRN_TEST_HANG_ON"]:
            open(os.environ["CAIRN_TEST_HANG_MARK"], "w").close()
            while True:
                time.sleep(60)
        return _read(path, max_bytes)
    fs.read_regular_file = read_regular_file
"""


def _wait_for_reader(mark: Path, job: subprocess.Popen, timeout: float = 300) -> None:
    """Block until a worker of the job starts reading the image it hangs on (it leaves ``mark``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.poll() is not None:
            raise AssertionError(f"the job ended before reading the image it should hang on: {job.stderr.read()}")
        if mark.exists():
            return
        time.sleep(0.05)
    raise AssertionError("the job never read the image")


@pytest.mark.slow
def test_a_killed_extraction_rerun_gives_exactly_the_uninterrupted_outputs(tmp_path, tiny_synth):
    """The job is killed (SIGKILL to its whole process group, workers included) while a worker is stuck reading
    one image (a read that never returns, see _HANG): it is certainly part-way. The rerun must clear what the killed
    run left (the manifest shards, Beam's temporary folders) and write what an uninterrupted run writes."""
    import csv

    rows = list(csv.DictReader(open(tiny_synth / "train.csv"))) + list(csv.DictReader(open(tiny_synth / "queries.csv")))
    images = tmp_path / "images"
    images.mkdir()
    stuck = images / "stuck.jpg"
    shutil.copyfile(tiny_synth / rows[0]["path"], stuck)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HANG)
    mark = tmp_path / "reading"
    env = {**os.environ, "CAIRN_TEST_HANG_ON": "stuck.jpg", "CAIRN_TEST_HANG_MARK": str(mark),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH")]))}
    manifest = [(f"{r['id']}-{rep}", tiny_synth / r["path"], r["landmark_id"]) for rep in range(3) for r in rows]
    manifest.insert(len(manifest) // 2, ("stuck", stuck, 1))
    manifest.append(("missing", images / "gone.jpg", 2))  # a dead letter, so that file is compared too
    path = write_manifest(tmp_path / "m.csv", manifest)
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "jobs.cli", "extract", "--manifest", str(path), "--out", str(out), "--method",
            "hog", "--workers", "2", "--num-shards", "3"]
    job = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           env=env)
    _wait_for_reader(mark, job)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=60)
    assert job.returncode == -signal.SIGKILL
    assert not (side(out) / "extract.json").exists()  # it did not finish
    left = sorted(p.name for p in side(out).iterdir())
    assert any(n.startswith("manifest-") for n in left), left  # it had started writing

    rerun = cairn("extract", "--manifest", str(path), "--out", str(out), "--method", "hog", "--workers", "2",
                  "--num-shards", "3")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "reusing" not in rerun.stderr  # nothing of the killed run was taken for a finished one
    reference = tmp_path / "reference"
    done = cairn("extract", "--manifest", str(path), "--out", str(reference), "--method", "hog", "--workers", "2",
                 "--num-shards", "3")
    assert done.returncode == 0, done.stderr[-2000:]

    for a, b in ((out, reference), (side(out), side(reference))):  # no temp folders
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    a, b = _features(out), _features(reference)
    assert sorted(a) == sorted(b) and len(a) == len(manifest) - 1
    for i in a:
        assert a[i][0] == b[i][0] and np.array_equal(a[i][1], b[i][1]), i
    assert (side(out) / "dead_letters.csv").read_text() == (side(reference) / "dead_letters.csv").read_text()
    for name in (p.name for p in side(reference).iterdir() if p.name.startswith("manifest-")):
        assert pq.read_table(side(out) / name).equals(pq.read_table(side(reference) / name))


@pytest.mark.slow
def test_every_bad_input_is_used_or_a_dead_letter_in_every_method(small_demo):
    """`cairn demo --bad-inputs` ran every method on the synthetic set with the whole bad-input corpus mixed into
    both splits: per method, split and record, the record is in the index (database) or was searched (query),
    or it is a dead letter with a reason at the stage the corpus expects, never both, never neither."""
    import csv
    import json

    from pipeline.manifest import read_manifest
    from pipeline.submission import read_submission
    from tests.pipeline.test_badinput import EXPECTED

    data, run = small_demo / "data", small_demo / "run"
    records = list(csv.DictReader(open(data / "bad_inputs.csv", encoding="utf-8")))
    assert sorted(r["kind"] for r in records) == sorted(list(EXPECTED) * 2)
    metrics = json.loads((run / "metrics.json").read_text())
    accounting = json.loads((run / "accounting.json").read_text())
    dead = list(csv.DictReader(open(run / "dead_letters.csv", encoding="utf-8")))
    manifests = {split: read_manifest(str(data / f"{split}-bad.csv")) for split in ("train", "queries")}
    assert set(accounting) == set(metrics["methods"]) and len(accounting) >= 11  # every method built here
    printed = (small_demo / "stdout.txt").read_text()
    for method, acc in accounting.items():
        for split, m in manifests.items():
            mine = [d for d in dead if d["method"] == method and d["split"] == split]
            assert all(d["reason"].strip() for d in mine)
            c = acc["splits"][split]
            assert c["inputs"] == m.total_rows == c["outputs"] + c["dead_letters"] and c["dead_letters"] == len(mine)
            assert f"{method:20s} {split:8s} {c['inputs']:6d} rows = {c['outputs']:6d} used + " in printed
            assert sorted((d["id"], d["reason"]) for d in mine if d["stage"] == "manifest") == \
                sorted((d.id, d.reason) for d in m.dead_letters)
            stage_of = {d["id"]: d["stage"] for d in mine if d["stage"] != "manifest"}
            assert len(stage_of) == len(mine) - len(m.dead_letters)  # one dead letter per image at most
            if split == "train":  # the database images in the index (non-landmark ones in its side index)
                index = Path(acc["index"])
                used = set(pq.read_table(index / "ids.parquet").column("id").to_pylist())
                if (index / "nonlandmarks" / "ids.parquet").exists():
                    used |= set(pq.read_table(index / "nonlandmarks" / "ids.parquet").column("id").to_pylist())
            else:  # every query has a row in the submission, in manifest order; the readable ones were searched
                preds = read_submission(str(run / "predictions" / f"{method}.csv"))
                assert list(preds) == m.ids and all(preds[q] is None for q in stage_of)
                used = set(pq.read_table(run / "neighbours" / f"{method}.parquet").column("query_id").to_pylist())
            assert used.isdisjoint(stage_of) and used | set(stage_of) == set(m.ids), (method, split)
            for r in (r for r in records if r["split"] == split):
                expected = EXPECTED[r["kind"]]
                if expected == "ok":
                    assert r["id"] in used, (method, r)
                elif expected == "manifest":
                    assert any(d["id"] == r["id"] and d["stage"] == "manifest" for d in mine), (method, r)
                else:
                    assert stage_of.get(r["id"]) == expected, (method, r, stage_of.get(r["id"]))
    report = (run / "report.html").read_text(encoding="utf-8")
    assert "decompression-bomb guard" in report and "duplicate id" in report  # the dead letters, with reasons


def _one_line_error(result, message: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("cairn")]) == 1


@pytest.fixture(scope="module")
def hog_run(tmp_path_factory, tiny_synth):
    """HoG features of both splits (64 px), an index over the database, a classifier, and queries at 32 px."""
    root = tmp_path_factory.mktemp("hog")
    for split in ("train", "queries"):
        assert cairn("extract", "--manifest", str(tiny_synth / f"{split}.csv"), "--out", str(root / split),
                     "--param", "size=64").returncode == 0
    assert cairn("extract", "--manifest", str(tiny_synth / "queries.csv"), "--out", str(root / "q32"),
                 "--param", "size=32").returncode == 0
    assert cairn("index", "--features", str(root / "train"), "--out", str(root / "index")).returncode == 0
    trained = cairn("train", "--method", "hog-linear", "--features", str(root / "train"), "--out", str(root / "clf"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    return root


def test_artefacts_from_another_config_or_place_are_refused_in_one_line(hog_run, tmp_path):
    import json

    import numpy as np

    from features import artifacts

    r = hog_run
    # queries extracted otherwise than the database the index holds
    _one_line_error(cairn("recognize", "--index", str(r / "index"), "--features", str(r / "q32"), "--out",
                          str(tmp_path / "o")), "extract both with the same method and config")
    # the classifier records what it was trained on, in the artefact itself
    assert artifacts.trained_on(str(r / "clf" / "classifier.npz"))["method"] == "hog"
    # an encoder that is a pickle, or not an encoder at all
    evil = tmp_path / "encoder.npz"
    np.savez(evil, centroids=np.array([{"run": "code"}], dtype=object))
    _one_line_error(cairn("encode", "--features", str(r / "train"), "--encoder", str(evil), "--out",
                          str(tmp_path / "e")), "it was not written by Cairn")
    arrays, header = artifacts.load(str(r / "clf" / "classifier.npz"), "classifier")
    header = json.dumps({**header, "kind": "pca_whitening"}).encode()  # a forged header over a pickle
    np.savez(evil, mean=np.array([{"run": "code"}], dtype=object), __cairn__=np.frombuffer(header, np.uint8))
    _one_line_error(cairn("encode", "--features", str(r / "train"), "--encoder", str(evil), "--out",
                          str(tmp_path / "e")), "not a Cairn artefact (.npz without pickles)")
    _one_line_error(cairn("encode", "--features", str(r / "train"), "--encoder", str(r / "clf" / "classifier.npz"),
                          "--out", str(tmp_path / "e")), "holds a 'classifier'")
    # an index whose files were damaged or disagree
    broken = tmp_path / "broken"
    shutil.copytree(r / "index", broken)
    (broken / "index.faiss").write_bytes(b"not a faiss index")
    _one_line_error(cairn("recognize", "--index", str(broken), "--features", str(r / "queries"), "--out",
                          str(tmp_path / "o")), "rebuild the index")
    shutil.rmtree(broken)
    shutil.copytree(r / "index", broken)
    record = json.loads((broken / "index.json").read_text())
    (broken / "index.json").write_text(json.dumps({**record, "dim": record["dim"] // 2}))
    _one_line_error(cairn("recognize", "--index", str(broken), "--features", str(r / "queries"), "--out",
                          str(tmp_path / "o")), "is inconsistent")
    (broken / "index.json").unlink()  # a save killed before its last file
    _one_line_error(cairn("recognize", "--index", str(broken), "--features", str(r / "queries"), "--out",
                          str(tmp_path / "o")), "lacks index.json")


def test_a_classifier_refuses_queries_of_another_config(hog_run):
    from features import artifacts
    from pipeline.errors import CairnError
    from pipeline.stages.recognize import classify

    path = str(hog_run / "clf" / "classifier.npz")
    trained = artifacts.trained_on(path)
    xq = np.zeros((2, artifacts.header(path)["meta"]["n_features_in"]), np.float32)
    pred, _ = classify(path, xq, 0.0, trained)  # the same config: fine
    assert pred.shape == (2,)
    with pytest.raises(CairnError, match="was trained on hog"):
        classify(path, xq, 0.0, {**trained, "config": {**trained["config"], "size": 32}})


def test_a_manifest_without_the_needed_columns_is_one_line_before_any_work(tmp_path, tiny_synth):
    bad = tmp_path / "m.csv"
    bad.write_text("id,landmark_id\nimage-1,3\n")
    _one_line_error(cairn("extract", "--manifest", str(bad), "--out", str(tmp_path / "o")), "needs 'id' and 'path'")
    _one_line_error(cairn("compare", "--train", str(bad), "--queries", str(tiny_synth / "queries.csv"), "--out",
                          str(tmp_path / "c"), "--methods", "hog"), "needs 'id' and 'path'")
    assert not (tmp_path / "c").exists() and not (tmp_path / "o").exists()


def test_a_second_writer_into_a_folder_in_use_ends_in_one_line_and_writes_nothing(tmp_path, tiny_synth, capsys):
    """Every command that writes a folder holds it for its whole run: another run writing there (here a process
    holding the lock, as a running `cairn compare` does) makes each command end with one line naming that run,
    before it writes anything."""
    from jobs import cli
    from pipeline import fs
    from tests.pipeline.test_fs import held_by_another_process

    out = tmp_path / "X"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # what the first run has written so far
    train, queries, missing = str(tiny_synth / "train.csv"), str(tiny_synth / "queries.csv"), str(tmp_path / "none")
    commands = {
        "compare": ["--train", train, "--queries", queries, "--out", str(out), "--methods", "hog", "--no-tune"],
        "demo": ["--out", str(out), "--methods", "hog"],
        "plan": ["--train", train, "--queries", queries, "--out", str(out), "--methods", "hog"],
        "synth": [str(out)],
        "extract": ["--manifest", train, "--out", str(out)],
        "train": ["--method", "hog-linear", "--features", missing, "--out", str(out)],
        "encode": ["--features", missing, "--encoder", missing, "--out", str(out)],
        "index": ["--features", missing, "--out", str(out)],
        "recognize": ["--index", missing, "--features", missing, "--out", str(out)],
        "neighbours": ["--index", missing, "--features", missing, "--out", str(out)],
        "report": [str(out)],
    }
    assert set(commands) == set(cli.COMMANDS)
    first = f"cairn compare --train {train} --queries {queries} --out {out} --methods hog sift-bovw"
    with held_by_another_process(out, first) as pid:
        lock = (out / fs.LOCK_NAME).read_text()
        for name, argv in commands.items():
            assert cli.main([name, *argv]) == 2, name
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith(
                f"cairn {name}: error: {out} is in use by another cairn run (pid {pid} on host "), err
            assert f"`{first}` since " in lines[0] and "; wait for it or choose another" in lines[0], lines[0]
            assert sorted(p.name for p in out.iterdir()) == [fs.LOCK_NAME, "metrics.json"], name
            assert (out / fs.LOCK_NAME).read_text() == lock and (out / "metrics.json").read_text() == "{}"


def test_a_full_disk_ends_in_one_line_naming_the_folder_with_nothing_that_looks_complete(hog_run, tmp_path,
                                                                                         monkeypatch, capsys):
    """The disk fills up while `cairn index` writes (FAISS says so in its own error, after part of the file):
    one line naming the output folder and the full disk; no index file, temporary or final, and no index.json."""
    import faiss

    from jobs import cli

    def full_disk(index, path):
        with open(path, "wb") as f:
            f.write(b"\0" * 4051)
        raise RuntimeError(f"Error in void faiss::write_index(const Index*, IOWriter*, int) at index_write.cpp:499: "
                           f"Error: 'ret == (size * 4)' failed: write error in {path}: 4051 != 2560000 (No space "
                           "left on device)")

    monkeypatch.setattr(faiss, "write_index", full_disk)
    out = tmp_path / "index"
    assert cli.main(["index", "--features", str(hog_run / "train"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cairn")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"cairn index: error: the disk holding {out} is full (no space left on device)"), err
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    assert not [n for n in left if n.endswith((".faiss", ".tmp", "index.json"))], left


def test_a_shard_copied_in_from_another_folder_is_refused_or_recomputed(hog_run, tiny_synth, tmp_path):
    """Issue 23 item 3: a valid queries shard copied into the database's features folder: `cairn index` refuses
    it in one line (before: it indexed the queries' vectors), and a rerun of the extraction says why it does
    not reuse the folder and writes the database's features again."""
    train = tmp_path / "train"
    shutil.copytree(hog_run / "train", train)
    shutil.copytree(side(hog_run / "train"), side(train))  # a features folder moves with its record
    shard = "features-00000-of-00001.parquet"
    shutil.copy(hog_run / "queries" / shard, train / shard)
    _one_line_error(cairn("index", "--features", str(train), "--out", str(tmp_path / "index")),
                    f"{shard} has")
    rerun = cairn("extract", "--manifest", str(tiny_synth / "train.csv"), "--out", str(train), "--param", "size=64")
    assert rerun.returncode == 0 and f"cannot reuse {train}: {shard} has" in rerun.stderr, rerun.stderr[-2000:]
    assert (train / shard).read_bytes() != (hog_run / "queries" / shard).read_bytes()
    assert cairn("index", "--features", str(train), "--out", str(tmp_path / "index")).returncode == 0
