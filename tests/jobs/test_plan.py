"""cairn plan: the samples it measures, the cost model (hand-computed), and the command end to end."""

from __future__ import annotations

import csv
import json
import os

import pytest

from jobs.cli import main
from pipeline.errors import CairnError
from pipeline.run import ledger as stages
from pipeline.run import plan as P
from tests.conftest import cairn, write_manifest


def _stage(kind, key, units, seconds, grows, parallel=False, cores=2, cap=None, output_bytes=0, **kw):
    return {"kind": kind, "key": key, "name": key, "units": units, "seconds": seconds, "grows": grows,
            "parallel": parallel, "cores": cores, "cap": cap, "output_bytes": output_bytes, **kw}


def _runs():
    small = {"quantities": {"train": 100, "queries": 50, "classes": 10}, "stages": [
        _stage("extract", "x", 100, 12.0, [["train", None]], parallel=True, output_bytes=1000),
        _stage("train", "clf", 1000, 3.0, [["train", None], ["classes", None]]),
        _stage("train", "voc", 5000, 5.0, [["train", None]], cap=20_000),
        _stage("search", "s", 100 * 50, 1.0, [["queries", None], ["train", None]]),
        _stage("tune", "t", 100, 1.0, [["train", None]]),
        _stage("extract", "q/train", 100, 7.0, [["train", None]], parallel=True, split="train", workers=2),
        _stage("extract", "q/queries", 20, 3.0, [["queries", None]], parallel=True, split="queries", workers=2),
    ]}
    large = {"quantities": {"train": 200, "queries": 100, "classes": 20}, "stages": [
        _stage("extract", "x", 200, 22.0, [["train", None]], parallel=True, output_bytes=2000),
        _stage("train", "clf", 4000, 9.0, [["train", None], ["classes", None]]),
        _stage("train", "voc", 10_000, 9.0, [["train", None]], cap=20_000),
        _stage("search", "s", 200 * 100, 3.0, [["queries", None], ["train", None]]),
        _stage("tune", "t", 200, 0.5, [["train", None]]),  # noise: faster than in the smaller sample
        _stage("report", "r", 100, 4.0, [["queries", None]]),  # only in the larger sample
        _stage("extract", "q/train", 200, 12.0, [["train", None]], parallel=True, split="train", workers=2),
        _stage("extract", "q/queries", 40, 4.0, [["queries", None]], parallel=True, split="queries", workers=2),
    ]}
    return small, large


def test_fit_is_fixed_plus_per_unit_over_the_two_samples():
    fitted = {f["key"]: f for f in P.fit(*_runs())}
    assert fitted["x"]["seconds_per_unit"] == pytest.approx(0.1) and fitted["x"]["fixed_seconds"] == pytest.approx(2)
    assert fitted["clf"]["seconds_per_unit"] == pytest.approx(0.002)
    assert fitted["clf"]["fixed_seconds"] == pytest.approx(1.0)
    assert fitted["s"]["seconds_per_unit"] == pytest.approx(2 / 15_000)
    # no growth seen (start-up noise above the work): fixed; one sample only: all of it per unit
    assert fitted["t"]["seconds_per_unit"] == 0 and fitted["t"]["fixed_seconds"] == pytest.approx(0.75)
    assert fitted["r"]["seconds_per_unit"] == pytest.approx(0.04) and fitted["r"]["fixed_seconds"] == 0
    # a Beam job's two splits share one line through their four points: t = 2 + 0.05 x
    for key in ("q/train", "q/queries"):
        assert fitted[key]["points"] == 4
        assert fitted[key]["seconds_per_unit"] == pytest.approx(0.05) and fitted[key]["fixed_seconds"] == \
            pytest.approx(2.0)


def test_projection_scales_each_stage_by_what_it_grows_with():
    small, large = _runs()
    fitted = P.fit(small, large)
    want = {"train": 1000, "queries": 400, "classes": 40}
    one = {r["key"]: r for r in P.project(fitted, large["quantities"], want, workers=1, cores_per_worker=2)}
    assert one["x"]["units"] == 1000 and one["x"]["seconds"] == pytest.approx(2 + 0.1 * 1000)
    assert one["x"]["output_bytes"] == 10_000  # features: bytes per image
    assert one["clf"]["units"] == 4000 * 5 * 2 and one["clf"]["seconds"] == pytest.approx(1 + 0.002 * 40_000)
    assert one["voc"]["units"] == 20_000  # the descriptor sample is capped
    assert one["s"]["units"] == 20_000 * 4 * 5
    assert one["r"]["units"] == 400 and one["r"]["seconds"] == pytest.approx(16)
    ten = {r["key"]: r for r in P.project(fitted, large["quantities"], want, workers=10, cores_per_worker=4)}
    assert ten["x"]["seconds"] == pytest.approx(2 + 0.1 * 1000 * 2 / 40)  # Beam stage: 40 cores instead of 2
    assert ten["clf"]["seconds"] == one["clf"]["seconds"]  # on the launching machine
    scanned = {r["key"]: r for r in P.project(fitted, large["quantities"], want, 1, 2, scanned={"s": 0.25})}
    fixed = {f["key"]: f for f in fitted}["s"]["fixed_seconds"]
    assert scanned["s"]["seconds"] == pytest.approx(fixed + (one["s"]["seconds"] - fixed) * 0.25)  # the work only
    assert scanned["x"]["seconds"] == one["x"]["seconds"]  # only the search scans an index


def test_a_softmax_classifier_is_priced_by_its_steps_timed_at_the_target_shape(monkeypatch):
    """The sample's time beyond its own SGD steps is fixed; the target's steps are epochs x images x train share /
    batch, each at the step time of (batch, dim, classes + 1) (prefilled here: no timing in a test)."""
    monkeypatch.setattr(P, "_STEP_SECONDS", {(100, 8, 21): 0.01, (100, 8, 41): 0.05})
    probe = {"kernel": "softmax-step", "dim": 8, "batch": 100, "epochs": 3, "validation_fraction": 0.1}
    small, large = _runs()
    for run, seconds in ((small, 2.0), (large, 4.0)):
        run["stages"].append(_stage("train", "soft", 0, seconds, [["train", None], ["classes", None]], probe=probe))
    fitted = {f["key"]: f for f in P.fit(small, large)}
    # the larger sample: 3 x ceil((200 - 10% held out) / 100) = 6 steps of 0.01 s at 20 + 1 classes
    assert fitted["soft"]["fixed_seconds"] == pytest.approx(4.0 - 6 * 0.01)
    assert fitted["soft"]["from"] == "probe" and fitted["soft"]["seconds_per_unit"] == 0
    want = {"train": 1000, "queries": 400, "classes": 40}
    rows = {r["key"]: r for r in P.project(list(fitted.values()), large["quantities"], want, 1, 2)}
    assert rows["soft"]["seconds"] == pytest.approx(4.0 - 0.06 + 3 * 9 * 0.05)  # ceil(900 / 100) = 9 steps
    with pytest.raises(CairnError, match="unknown cost probe"):
        P.probe_seconds({"kernel": "nope"}, want)
    # above PROBE_CLASSES the step is timed there and scaled by the classes
    monkeypatch.setattr(P, "PROBE_CLASSES", 30)
    monkeypatch.setattr(P, "_STEP_SECONDS", {(100, 8, 30): 0.03})
    assert P.probe_seconds(probe, want) == pytest.approx(3 * 9 * 0.03 * 41 / 30)
    # at 13,000 classes the held-out calibration rows are capped: nearly every row trains
    from models.classifiers import calibration_rows, training_rows

    assert training_rows(1_000_000, 13_001, 0.1) == 1_000_000 - calibration_rows(13_001)


def test_recognition_splits_into_search_classifier_scoring_tuning_and_verification():
    from pipeline.stages.recognize import recognize_cost

    rec = {"counts": {"queries": 10}, "search_seconds": 1.0, "verify_seconds": 0.0, "decide_seconds": 0.5,
           "tuning": {"seconds": 2.0, "queries": 4}}
    with stages.recording() as ledger:
        with stages.stage("recognize", "m/recognize", name="recognize") as st:
            stages.record(st, recognize_cost(rec, database=100, classes=7), "m/recognize")
    parts = {r["kind"]: r for r in ledger}
    assert parts["search"]["units"] == 10 * 100 and parts["search"]["grows"] == [["queries", None], ["train", None]]
    assert parts["classify"]["units"] == 10 * 7 and parts["classify"]["grows"] == [["queries", None],
                                                                                    ["classes", None]]
    assert parts["tune"]["units"] == 4 and parts["tune"]["grows"] == [["classes", 2000]]
    assert "verify" not in parts  # no time, no part
    # a plain kNN method: no classifier part
    with stages.recording() as ledger, stages.stage("recognize", "n/recognize", name="recognize") as st:
        stages.record(st, recognize_cost({**rec, "tuning": None}, database=100), "n/recognize")
    assert {r["kind"] for r in ledger} == {"search", "recognize"}


def test_the_step_probe_times_real_steps_at_the_shape_it_is_given():
    from models.classifiers import softmax_step_seconds

    seconds = softmax_step_seconds(batch=16, dim=4, classes=3, repeats=2)
    assert 0 < seconds < float("inf")


def test_a_sample_learns_its_pca_when_the_whole_run_would():
    """VLAD's PCA needs 10 images per dimension: a sample of 800 of 2,600 images must learn it as the whole run
    does (a sample that keeps the raw 8,192-d VLAD prices the wrong index and classifier), on what it has."""
    from pipeline.options import sized_as
    from pipeline.stages.train import whitening_dim

    assert whitening_dim(256, 800, "t", min_per_dim=10) == 0
    with sized_as(2600 / 800):
        assert whitening_dim(256, 800, "t", min_per_dim=10) == 256
    with sized_as(2600 / 300):
        assert whitening_dim(256, 300, "t", min_per_dim=10) == 150  # at most half the images it learns from
    with sized_as(2000 / 800):  # the whole run has too few as well
        assert whitening_dim(256, 800, "t", min_per_dim=10) == 0


def test_a_method_searching_another_methods_index_scans_as_that_index_does():
    stage = {"kind": "search", "name": "search", "grows": [["queries", None], ["train", None]], "parallel": False,
             "cores": 2, "cap": None, "output_bytes": 0, "fixed_seconds": 0.0, "seconds_per_unit": 1.0, "units": 10}
    fitted = [{**stage, "key": f"RUN/work/{m}/recognize/search"} for m in ("hog", "hog-linear", "cnn+delf", "x")]
    same = {"train": 1, "queries": 1}
    rows = {r["key"].split("/")[2]: r["seconds"] for r in P.project(fitted, same, same, 1, 2,
                                                                     scanned={"hog": 0.5, "cnn": 0.25})}
    assert rows == {"hog": 5.0, "hog-linear": 5.0, "cnn+delf": 2.5, "x": 10.0}


def test_ratio_caps_each_quantity():
    assert P._ratio([["train", None], ["classes", 2000]], {"train": 10, "classes": 100},
                    {"train": 100, "classes": 13_000}) == pytest.approx(10 * 20)
    assert P._ratio([], {}, {"train": 5}) == 1.0


def test_index_memory_follows_the_factory_cairn_would_build():
    small = P.index_memory(1000, 64, 8 << 30)
    assert small["factory"] == "Flat" and small["cpu_bytes"] == 1000 * 64 * 4 and small["scanned_fraction"] == 1
    assert small["gpu_bytes"] == 1000 * 64 * 2  # float16 on the GPU
    big = P.index_memory(1_000_000, 512, 8 << 30)
    assert big["factory"] == "IVF4096,PQ64x4fs,Refine(PQ128)"
    assert big["cpu_bytes"] == 1_000_000 * (32 + 128 + 8) + 4096 * 512 * 4
    assert big["gpu_bytes"] is None  # fast-scan and refinement stay on the CPU
    assert big["scanned_fraction"] == pytest.approx(128 / 4096)
    tight = P.index_memory(1_000_000, 512, 100 << 20)
    assert tight["factory"] == "IVF4096,PQ64" and tight["cpu_bytes"] == 1_000_000 * (64 + 8) + 4096 * 512 * 4
    assert tight["gpu_bytes"] == tight["cpu_bytes"] and tight["scanned_fraction"] == pytest.approx(64 / 4096)
    on_workers = P.index_memory(1_000_000, 512, 8 << 30, mergeable_only=True)  # shards merged: no fast-scan
    assert on_workers["factory"] == "IVF4096,PQ64"
    given = P.index_memory(10_000, 64, 8 << 30, factory="IVF100,Flat", search="nprobe=10")
    assert given["cpu_bytes"] == 10_000 * (64 * 4 + 8) + 100 * 64 * 4 and given["scanned_fraction"] == 0.1


def test_samples_take_whole_classes_and_the_rest_at_the_same_rate(tmp_path):
    img = tmp_path / "x.jpg"
    img.write_bytes(b"")
    train = [(f"t{c}-{i}", img, c) for c in range(10) for i in range(4)] + [(f"n{i}", img, "") for i in range(20)]
    queries = [(f"q{c}", img, c) for c in range(10)] + [(f"qn{i}", img, "") for i in range(30)]
    write_manifest(tmp_path / "train.csv", train)
    write_manifest(tmp_path / "queries.csv", queries)
    s = P.sample_manifests(str(tmp_path / "train.csv"), str(tmp_path / "queries.csv"), 30, str(tmp_path / "s"))
    assert s["fraction"] == pytest.approx(0.5)
    rows = list(csv.DictReader(open(s["train"], encoding="utf-8")))
    labels = [r["landmark_id"] for r in rows if r["landmark_id"]]
    assert len(labels) == 20 and all(labels.count(c) == 4 for c in set(labels))  # 5 whole classes
    assert sum(1 for r in rows if not r["landmark_id"]) == 10
    q = list(csv.DictReader(open(s["queries"], encoding="utf-8")))
    assert {r["landmark_id"] for r in q if r["landmark_id"]} == set(labels)
    assert sum(1 for r in q if not r["landmark_id"]) == 15
    again = P.sample_manifests(str(tmp_path / "train.csv"), str(tmp_path / "queries.csv"), 30, str(tmp_path / "t"))
    assert open(again["train"]).read() == open(s["train"]).read()  # seeded


def test_stage_records_skip_reused_stages_and_number_repeated_ones():
    with stages.recording() as ledger:
        with stages.stage("extract", "a") as st:
            st.update(units=3)
        with stages.stage("extract", "a") as again:  # the same work again (an index rebuilt for a second method)
            again.update(units=2)
        with stages.stage("train", "b") as st:
            stages.record(st, {"reused": True}, "b")
        with stages.stage("recognize", "c") as st:
            stages.add("search", "c/search", 0.0, units=9)
            st["minus_seconds"] = 0.0
    assert [r["key"] for r in ledger] == ["a", "a#2", "c/search", "c"]
    assert ledger[0]["units"] == 3 and ledger[0]["seconds"] >= 0 and ledger[0]["peak_bytes"] > 0
    with stages.stage("extract", "x") as st:  # not recording: nothing kept, nothing fails
        st.update(units=1)


def test_plan_flags_are_checked(tmp_path, capsys):
    assert main(["plan", "--manifest", "m.csv", "--queries", "q.csv", "--out", str(tmp_path), "--sample", "5"]) == 2
    assert "--sample must be at least 20" in capsys.readouterr().err
    assert main(["plan", "--manifest", "m.csv", "--queries", "q.csv", "--out", str(tmp_path), "--workers", "0"]) == 2
    assert "--workers '0'" in capsys.readouterr().err
    with pytest.raises(CairnError, match="train=N"):
        P.parse_target("images=5", {"train": 1, "queries": 1, "classes": 1})
    assert P.parse_target("train=1_000_000,classes=13000", {"train": 1, "queries": 2, "classes": 1}) == \
        {"train": 1_000_000, "queries": 2, "classes": 13_000}


@pytest.mark.slow
def test_plan_end_to_end_on_the_tiny_set(tmp_path, tiny_synth):
    """`cairn plan` in a subprocess, as a user runs it (its sample runs' Beam pipelines and logging stay out of
    the test process)."""
    out = tmp_path / "plan"
    argv = ["plan", "--manifest", str(tiny_synth / "train.csv"), "--queries", str(tiny_synth / "queries.csv"),
            "--out", str(out), "--methods", "hog", "hog-linear", "--sample", "20", "--workers", "1,10",
            "--target", "train=1000000,classes=13000,queries=100000", "--runner=DirectRunner"]
    result = cairn(*argv)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout
    assert "assumptions:" in printed and "index memory" in printed and "10 worker(s)" in printed
    record = json.loads((out / "plan.json").read_text())
    assert [p["workers"] for p in record["plans"]] == [1, 10]
    one, ten = ({r["key"]: r for r in p["stages"]} for p in record["plans"])
    extract_train = next(k for k, r in one.items() if r["kind"] == "extract" and r["split"] == "train")
    assert one[extract_train]["units"] == 1_000_000 and one[extract_train]["parallel"]
    f = next(f for f in record["fitted"] if f["key"] == extract_train)
    cores = os.cpu_count()
    for plan_, workers in ((one, 1), (ten, 10)):  # the per-unit work spread over the workers' cores
        assert plan_[extract_train]["seconds"] == pytest.approx(
            f["fixed_seconds"] + f["seconds_per_unit"] * 1_000_000 * f["cores"] / (workers * cores))
    classifier = next(k for k, r in one.items() if r["kind"] == "train" and "classifier" in r["name"])
    assert ten[classifier]["seconds"] == one[classifier]["seconds"]  # trained on the launching machine
    fitted = {f["key"]: f for f in record["fitted"]}
    assert fitted[classifier]["from"] == "probe" and fitted[classifier]["probe"]["kernel"] == "softmax-step"
    assert one[classifier]["output_bytes"] > 1000 * fitted[classifier]["output_bytes"]  # C x D weights
    scoring = next(k for k, r in one.items() if r["kind"] == "classify")  # queries x classes
    have = record["sample_runs"][1]["quantities"]
    assert one[scoring]["units"] == round(fitted[scoring]["units"] * 100_000 / have["queries"] * 13_000 /
                                          have["classes"])
    assert record["plans"][0]["indices"][0]["factory"].startswith("IVF")
    assert {r["kind"] for r in one.values()} >= {"extract", "train", "index", "search", "recognize", "report"}
    rows = list(csv.DictReader(open(out / "plan.csv", encoding="utf-8")))
    assert len(rows) == 2 * len(one)
    measured = out / "work" / "sample-20" / "measured.json"
    before = measured.stat().st_mtime_ns
    assert cairn(*argv, "--reuse").returncode == 0
    assert measured.stat().st_mtime_ns == before  # the samples were not measured again


def test_beam_stages_take_their_per_unit_cost_from_cpu_time():
    """A small input spread unevenly over the workers makes a Beam stage's wall time noisy; its CPU time is
    not: the per-unit cost is the CPU slope over the cores, the fixed time what the larger sample's wall leaves."""
    stage = {"kind": "extract", "name": "extract cnn", "grows": [["train", None]], "parallel": True, "cores": 2,
             "cap": None, "output_bytes": 0, "split": "train", "workers": 2}
    small = {"quantities": {"train": 100}, "stages": [
        {**stage, "key": "e/train", "units": 100, "seconds": 14.0, "cpu_seconds": 12.0}]}
    large = {"quantities": {"train": 200}, "stages": [
        {**stage, "key": "e/train", "units": 200, "seconds": 13.0, "cpu_seconds": 16.0}]}  # wall: noise
    (f,) = P.fit(small, large)
    assert f["from"] == "cpu" and f["seconds_per_unit"] == pytest.approx(0.04 / 2)
    assert f["fixed_seconds"] == pytest.approx(13.0 - 0.02 * 200)
    (row,) = P.project([f], large["quantities"], {"train": 2000}, workers=1, cores_per_worker=2)
    assert row["seconds"] == pytest.approx(9.0 + 0.02 * 2000)
