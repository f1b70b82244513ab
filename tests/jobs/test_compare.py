import csv
import json

import pyarrow.parquet as pq
import pytest

from pipeline.run.compare import compare
from pipeline.run.compare import report as write_metrics
from pipeline.submission import read_submission

GROUPS = {
    "quality": {"gap", "accuracy", "landmark_accuracy", "map_at_100", "recall_at_k", "mean_class_ap",
                "gap_all_answers", "auc", "note"},
    "cost": {"images_per_second", "extract_seconds", "train_seconds", "index_seconds", "search_seconds",
             "verify_seconds", "dim", "bytes_per_image", "feature_bytes_per_image", "local_feature_bytes_per_image",
             "index_bytes"},
    "counts": {"queries", "queries_with_landmark", "predicted", "dead_letters"},
    "config": {"index_factory", "vote", "params"},
    "detection": {"ap_50", "mean_iou", "annotated_images", "detections_per_image", "regions_per_image"},
}
KEYS = set().union(*GROUPS.values())


def flat(entry: dict) -> dict:
    """A metrics.json method entry with its groups merged (quality, cost, counts, config)."""
    assert {k: set(entry[k]) for k in GROUPS} == GROUPS  # the stable keys, no more, no less
    return {k: v for group in GROUPS for k, v in entry[group].items()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_synth):
    out = tmp_path_factory.mktemp("compare")
    compare(str(tiny_synth / "train.csv"), str(tiny_synth / "queries.csv"), str(out), ["hog"], workers=2)
    return out


def test_compare_writes_every_output(run_dir, tiny_synth):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    m = flat(metrics["methods"]["hog"])
    assert KEYS == set(m) and metrics["format"] == "cairn-metrics" and metrics["version"] == 3
    assert metrics["methods"]["hog"]["family"] == "baseline" and set(m["recall_at_k"]) == {"1", "5", "10", "100"}
    assert m["params"]["hog"]["hog"]["cell"] and m["verify_seconds"] == 0.0
    assert 0 <= m["gap"] <= 1 and 0 <= m["accuracy"] <= 1 and 0 <= m["map_at_100"] <= 1
    assert m["bytes_per_image"] == 1764 * 4 and m["images_per_second"] > 0
    assert metrics["data"] == {"train_images": 20, "queries": 12, "queries_with_landmark": 8, "train_classes": 4}
    queries = [r["id"] for r in csv.DictReader(open(tiny_synth / "queries.csv"))]
    preds = read_submission(str(run_dir / "predictions" / "hog.csv"))
    assert sorted(preds) == sorted(queries)
    nb = pq.read_table(run_dir / "neighbours" / "hog.parquet")
    assert nb.num_rows == 12 * 20  # every query lists every database image (fewer than 100)
    assert set(nb.column("query_id").to_pylist()) == set(queries)
    assert (run_dir / "dead_letters.csv").read_text().startswith("method,split,id,stage,reason,path")
    # what tuning chose, with its validation figures beside the plain top-1 rule's
    tuning = metrics["methods"]["hog"]["tuning"]
    assert tuning["rule"] == "vote" and 0 <= tuning["min_confidence"] <= 1
    assert tuning["validation"]["landmark_queries"] > 0 and tuning["validation"]["unseen_queries"] > 0
    assert tuning["validation"]["top1_gap"] is not None


def test_confidences_hold_every_answer_before_the_threshold(run_dir, tiny_synth):
    from reports.metrics import gap

    queries = [r["id"] for r in csv.DictReader(open(tiny_synth / "queries.csv"))]
    truth = {r["id"]: (int(r["landmark_id"]) if r["landmark_id"] else None)
             for r in csv.DictReader(open(tiny_synth / "queries.csv"))}
    table = pq.read_table(run_dir / "confidences" / "hog.parquet")
    assert sorted(table.column("query_id").to_pylist()) == sorted(queries)
    meta = json.loads(table.schema.metadata[b"cairn"])
    rows = {q: (lab, c, k) for q, lab, c, k in zip(*(table.column(n).to_pylist() for n in
                                                   ("query_id", "landmark_id", "confidence", "kept")), strict=True)}
    preds = read_submission(str(run_dir / "predictions" / "hog.csv"))
    for q, (lab, c, kept) in rows.items():
        assert kept == (lab is not None and c >= meta["threshold"])
        assert (preds[q] is not None) == kept  # the predictions are the answers that passed the threshold
        if kept:
            assert preds[q][0] == lab and preds[q][1] == pytest.approx(c, abs=1e-5)
    ids = sorted(rows)
    every = gap([rows[i][0] for i in ids], [rows[i][1] if rows[i][0] is not None else 0.0 for i in ids],
                [truth[i] for i in ids], ids)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["methods"]["hog"]["quality"]["gap_all_answers"] == pytest.approx(every, abs=1e-6)
    assert metrics["methods"]["hog"]["quality"]["gap"] <= every + 1e-9  # a threshold can only lower GAP


def test_metrics_are_consistent_with_the_predictions(run_dir, tiny_synth):
    from reports.metrics import gap

    truth = {r["id"]: (int(r["landmark_id"]) if r["landmark_id"] else None)
             for r in csv.DictReader(open(tiny_synth / "queries.csv"))}
    preds = read_submission(str(run_dir / "predictions" / "hog.csv"))
    ids = sorted(truth)
    expected = gap([preds[i][0] if preds[i] else None for i in ids], [preds[i][1] if preds[i] else 0 for i in ids],
                   [truth[i] for i in ids], ids)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["methods"]["hog"]["quality"]["gap"] == pytest.approx(expected, abs=1e-6)


def test_report_rebuilds_the_same_metrics(run_dir):
    before = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").unlink()
    assert write_metrics(str(run_dir)) == before


def test_report_works_from_any_folder_and_refuses_changed_manifests(run_dir, tiny_synth, monkeypatch, tmp_path):
    from pipeline.errors import CairnError

    monkeypatch.chdir(tmp_path)
    assert write_metrics(str(run_dir))["methods"]["hog"]["counts"]["queries"] == 12
    original = (run_dir / "run.json").read_text()
    run = json.loads(original)
    run["manifest_sha256"]["queries"] = "0" * 16
    (run_dir / "run.json").write_text(json.dumps(run))
    try:
        with pytest.raises(CairnError, match="changed since the run"):
            write_metrics(str(run_dir))
    finally:
        (run_dir / "run.json").write_text(original)


def test_output_folders_with_glob_characters_are_refused_before_any_work(tmp_path, tiny_synth):
    from pipeline.errors import CairnError

    with pytest.raises(CairnError, match="wildcards"):
        compare(str(tiny_synth / "train.csv"), str(tiny_synth / "queries.csv"), str(tmp_path / "run [1]"), ["hog"])
    assert not (tmp_path / "run [1]").exists()


def test_the_report_of_a_single_method_run_says_what_it_cannot_show(run_dir):
    from reports.html import ReportConfig

    write_metrics(str(run_dir), ReportConfig(examples=2))
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    assert 'data-method="hog"' in text and "this run has only one method" in text
    assert "Grad-CAM needs one" in text  # hog has no Keras model to explain
    rows = list(csv.DictReader(open(run_dir / "per_class.csv")))
    assert {r["method"] for r in rows} == {"hog"} and sum(int(r["queries"]) for r in rows) == 8


def test_report_methods_are_checked_before_any_work(tmp_path, tiny_synth):
    from pipeline.errors import CairnError
    from reports.html import ReportConfig

    with pytest.raises(CairnError, match="--deep cnn: not among the methods of this run"):
        compare(str(tiny_synth / "train.csv"), str(tiny_synth / "queries.csv"), str(tmp_path / "o"), ["hog"],
                report=ReportConfig(deep="cnn"))
    assert not (tmp_path / "o" / "work").exists()


def test_a_database_of_dead_letters_ends_with_its_accounting_written_and_named(tmp_path, tiny_synth):
    """Every database image unreadable: the run ends with one line that points to OUT/dead_letters.csv and
    OUT/accounting.json, which say what became of every row."""
    from pipeline.errors import CairnError
    from tests.conftest import write_manifest

    train = write_manifest(tmp_path / "train.csv", [(f"gone-{i}", tmp_path / f"gone-{i}.jpg", i % 2) for i in range(3)]
                           + [("empty-id-row", "", 1)])
    out = tmp_path / "run"
    with pytest.raises(CairnError) as error:
        compare(str(train), str(tiny_synth / "queries.csv"), str(out), ["hog"])
    message = str(error.value)
    assert "every database image" in message and "is a dead letter" in message, message
    assert str(out / "dead_letters.csv") in message and str(out / "accounting.json") in message, message
    rows = list(csv.DictReader(open(out / "dead_letters.csv")))
    assert sorted(r["id"] for r in rows if r["split"] == "train") == ["empty-id-row", "gone-0", "gone-1", "gone-2"]
    assert {r["method"] for r in rows} == {"hog"} and all(r["reason"] for r in rows)
    counts = json.loads((out / "accounting.json").read_text())["hog"]["splits"]["train"]
    assert counts["inputs"] == 4 and counts["outputs"] == 0 and counts["dead_letters"] == 4


def test_a_rerun_with_fewer_methods_leaves_only_its_own_results(run_dir, tiny_synth, caplog):
    """A run into a folder where an earlier run had more methods: the dropped method's predictions, confidences
    and neighbours go (with a log line each), so nothing in OUT looks like a result of this run that is not."""
    import logging
    import shutil

    for folder, ending in (("predictions", ".csv"), ("confidences", ".parquet"), ("neighbours", ".parquet")):
        shutil.copy(run_dir / folder / f"hog{ending}", run_dir / folder / f"sift-bovw{ending}")
    with caplog.at_level(logging.INFO, logger="pipeline.run.compare"):
        compare(str(tiny_synth / "train.csv"), str(tiny_synth / "queries.csv"), str(run_dir), ["hog"], workers=2)
    for folder, ending in (("predictions", ".csv"), ("confidences", ".parquet"), ("neighbours", ".parquet")):
        assert sorted(p.name for p in (run_dir / folder).iterdir()) == [f"hog{ending}"]
        assert f"removed {run_dir / folder / f'sift-bovw{ending}'}: sift-bovw is not among this run's methods" \
            in caplog.text
    assert list(json.loads((run_dir / "metrics.json").read_text())["methods"]) == ["hog"]


def test_a_rerun_after_query_images_changed_in_place_equals_a_fresh_run(tmp_path, tiny_synth, caplog):
    """Issue 23 item 2: replacing query images in place (the manifest unchanged) and rerunning gave the old
    predictions ("reusing" the old features); now the rerun extracts the changed queries again and its
    predictions are a fresh run's."""
    import shutil

    for split in ("train", "queries"):
        rows = list(csv.DictReader(open(tiny_synth / f"{split}.csv")))
        for r in rows:
            (tmp_path / split).mkdir(exist_ok=True)
            shutil.copy(tiny_synth / r["path"], tmp_path / split / f"{r['id']}.jpg")
        with open(tmp_path / f"{split}.csv", "w") as f:
            f.write("id,path,landmark_id\n" + "".join(f"{r['id']},{split}/{r['id']}.jpg,{r['landmark_id']}\n"
                                                      for r in rows))
    queries = sorted((tmp_path / "queries").iterdir())

    def run(out):
        compare(str(tmp_path / "train.csv"), str(tmp_path / "queries.csv"), str(tmp_path / out), ["hog"],
                workers=1, tune=None, report=None)
        return (tmp_path / out / "predictions" / "hog.csv").read_text()

    before = run("out")
    for a, b in zip(queries[:3], queries[1:4], strict=True):  # three queries now show another query's picture
        shutil.copy(b, a)
    caplog.set_level("INFO")
    rerun = run("out")
    fresh = run("fresh")
    assert rerun == fresh != before
    assert "3 of 12 images changed since they were extracted" in caplog.text


def test_a_run_without_landmark_queries_writes_null_figures_and_says_why(tmp_path, tiny_synth):
    """GAP and mAP@100 were 0.0 in metrics.json when no query shows a landmark; now null, a note, and n/a in the
    printed table and the report."""
    from jobs.common import summary_table
    from reports.html import ReportConfig

    with open(tiny_synth / "queries.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "queries.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "landmark_id": ""} for r in rows)
    out = tmp_path / "run"
    metrics = compare(str(tiny_synth / "train.csv"), str(tmp_path / "queries.csv"), str(out), ["hog"], workers=1,
                      tune=None, report=ReportConfig(examples=1))
    stored = json.loads((out / "metrics.json").read_text())["methods"]["hog"]["quality"]
    assert stored["gap"] is None and stored["map_at_100"] is None and stored["landmark_accuracy"] is None
    assert "no query shows a landmark" in stored["note"] and stored["accuracy"] is not None
    assert metrics["methods"]["hog"]["quality"] == stored
    assert "n/a" in summary_table(metrics).splitlines()[2]
    html = (out / "report.html").read_text(encoding="utf-8")
    assert 'data-key="quality.gap" data-value="null">n/a<' in html and "n/a: no query shows a landmark" in html
