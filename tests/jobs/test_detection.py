"""Detection in the jobs: `cairn train --method detector`, `cairn extract --detector` (a Beam job over regions),
the regional index and recognition, and cnn-pretrained+det through `cairn compare` on the tiny synthetic set."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from features.detect import DetectConfig
from pipeline.errors import CairnError
from pipeline.run.settings import parse_overrides
from tests.conftest import side

FAST = ["detect.train.backbone.name=mobilenet_v2", "detect.train.input_size=64", "detect.train.epochs=2",
        "detect.train.batch_size=4"]


@pytest.fixture(scope="module")
def detector(tmp_path_factory, tiny_synth):
    """A detector trained on the tiny set's database boxes (plus one box row that matches no image)."""
    from pipeline.run.trainers import train

    home = tmp_path_factory.mktemp("detector")
    boxes = home / "boxes.csv"
    boxes.write_text((tiny_synth / "boxes.csv").read_text() + "no-such-image,1,1,5,5,160,120\n")
    record = train("detector", str(tiny_synth / "train.csv"), str(home / "model"), parse_overrides(FAST),
                   boxes=str(boxes))
    return home, record


@pytest.fixture(scope="module")
def embedder(tiny_embedder):
    return tiny_embedder


@pytest.mark.slow
def test_train_detector_job_counts_and_reuse(detector, tiny_synth, caplog):
    import logging

    from pipeline.run.trainers import train

    home, record = detector
    counts = record["counts"]
    landmark_train = sum(1 for line in (tiny_synth / "train.csv").read_text().splitlines()[1:] if line.split(",")[2])
    assert counts["with_boxes"] == landmark_train and counts["negatives"] == 4  # the non-landmark images
    assert counts["box_rows_unused"] == 8 + 1 and counts["dead_letters"] == 0  # the 8 query boxes, the bad row
    assert "no-such-image" in (home / "model" / "unused_boxes.csv").read_text()
    assert (home / "model" / "model.keras").is_file() and not (home / "model" / "checkpoints").exists()
    with caplog.at_level(logging.INFO):
        again = train("detector", str(tiny_synth / "train.csv"), str(home / "model"), parse_overrides(FAST),
                      boxes=str(home / "boxes.csv"))
    assert "reusing" in caplog.text and again["artefact_sha256"] == record["artefact_sha256"]
    with pytest.raises(CairnError, match="needs --boxes"):
        train("detector", str(tiny_synth / "train.csv"), str(home / "other"), parse_overrides(FAST))


@pytest.fixture(scope="module")
def regional(tmp_path_factory, tiny_synth, detector, embedder):
    """Regional query and database features of the tiny set (the queries with one corrupt image added)."""
    from pipeline.stages.extract import extract

    home = tmp_path_factory.mktemp("regional")
    queries = home / "queries.csv"
    lines = (tiny_synth / "queries.csv").read_text().splitlines()
    bad = home / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    fixed = [lines[0]] + [f"{i},{tiny_synth / p},{y}" for i, p, y in (line.split(",") for line in lines[1:])]
    queries.write_text("\n".join([*fixed, f"corrupt,{bad},"]) + "\n")
    detect = DetectConfig(model=str(detector[0] / "model" / "model.keras"), score_threshold=0.0, max_boxes=2,
                          min_side=0.05)
    params = {"model": embedder}
    q = extract(str(queries), str(home / "q"), "cnn", params, detect=detect, workers=1)
    db = extract(str(tiny_synth / "train.csv"), str(home / "db"), "cnn", params, detect=detect, workers=1)
    return home, q, db, len(lines) - 1


@pytest.mark.slow
def test_extract_with_a_detector_writes_every_region_and_reconciles(regional):
    from pipeline.schemas import cairn_metadata

    home, q, _, n_queries = regional
    counts = q["counts"]
    assert counts["inputs"] == n_queries + 1 and counts["outputs"] == n_queries and counts["dead_letters"] == 1
    assert q["regional"] and counts["regions"] == counts["outputs"] + counts["detected_boxes"]
    table = pq.read_table(next((home / "q").glob("features-*.parquet")))
    assert "regions" in cairn_metadata(table.schema) and cairn_metadata(table.schema)["regions"]["model_sha256"]
    rows = table.to_pylist()
    by_image: dict[str, list] = {}
    for r in rows:
        by_image.setdefault(r["id"], []).append(r)
    assert len(by_image) == n_queries and "corrupt" not in by_image
    for image_rows in by_image.values():
        regions = sorted(r["region"] for r in image_rows)
        assert regions == list(range(len(regions))) and 1 <= len(regions) <= 3  # full image + up to 2 boxes
        full = next(r for r in image_rows if r["region"] == 0)
        assert full["box"] == [0, 0, full["width"], full["height"]] and full["box_score"] == 1.0
        for r in image_rows:
            x0, y0, x1, y1 = r["box"]
            assert 0 <= x0 < x1 <= r["width"] and 0 <= y0 < y1 <= r["height"] and 0 <= r["box_score"] <= 1
    dead = (side(home / "q") / "dead_letters.csv").read_text()
    assert "corrupt" in dead and ",decode," in dead


@pytest.mark.slow
def test_regional_recognition_answers_each_query_once_at_its_best_region_pair(regional):
    from pipeline.stages.index import build_index
    from pipeline.stages.recognize import recognize
    from pipeline.submission import read_submission

    home, _, _, n_queries = regional
    build_index(str(home / "db"), str(home / "index"))
    record = recognize(str(home / "index"), str(home / "q"), str(home / "rec"), neighbours=100)
    preds = read_submission(str(home / "rec" / "predictions.csv"))
    assert len(preds) == n_queries and record["counts"]["queries"] == n_queries
    assert record["counts"]["query_regions"] > n_queries and record["counts"]["database_regions"] > 20
    nb = pq.read_table(home / "rec" / "neighbours.parquet").to_pylist()
    q_rows = pq.read_table(next((home / "q").glob("features-*.parquet"))).to_pylist()
    db_rows = pq.read_table(next((home / "db").glob("features-*.parquet"))).to_pylist()
    query = q_rows[0]["id"]
    listed = [(r["id"], r["score"]) for r in nb if r["query_id"] == query]
    assert len(listed) == len({i for i, _ in listed}) == 20  # every database image once
    qv = np.array([r["vector"] for r in q_rows if r["id"] == query])
    for image_id, score in listed:
        dv = np.array([r["vector"] for r in db_rows if r["id"] == image_id])
        assert score == pytest.approx(float((qv @ dv.T).max()), abs=1e-4)
    assert [s for _, s in listed] == sorted((s for _, s in listed), reverse=True)


@pytest.mark.slow
def test_regional_queries_against_a_whole_image_index(regional, tiny_synth, embedder):
    from pipeline.stages.extract import extract
    from pipeline.stages.index import build_index
    from pipeline.stages.recognize import recognize

    home, _, _, n_queries = regional
    extract(str(tiny_synth / "train.csv"), str(home / "db-whole"), "cnn", {"model": embedder}, workers=1)
    build_index(str(home / "db-whole"), str(home / "index-whole"))
    record = recognize(str(home / "index-whole"), str(home / "q"), str(home / "rec-whole"))
    assert record["counts"]["queries"] == n_queries and record["counts"]["database_regions"] == 20
    assert (home / "rec-whole" / "recognize.json").is_file()


@pytest.mark.slow
def test_compare_with_detection_reports_ap_and_the_gap_change(tmp_path, tiny_synth, detector, embedder):
    from pipeline.run.compare import compare
    from tests.jobs.test_compare import GROUPS

    config = parse_overrides([f"cnn_pretrained.model={embedder}", "detect.detect.score_threshold=0.0",
                              "detect.detect.min_side=0.05", *FAST])
    out = tmp_path / "run"
    metrics = compare(str(tiny_synth / "train.csv"), str(tiny_synth / "queries.csv"), str(out),
                      ["cnn-pretrained", "cnn-pretrained+det"], config=config, boxes=str(tiny_synth / "boxes.csv"))
    assert metrics["version"] == 3
    det = metrics["methods"]["cnn-pretrained+det"]
    assert set(det) >= set(GROUPS) and set(det["detection"]) == GROUPS["detection"]
    d = det["detection"]
    assert 0 <= d["ap_50"] <= 1 and 0 < d["mean_iou"] <= 1 and d["annotated_images"] == 8
    assert d["regions_per_image"] >= 1 and det["cost"]["bytes_per_image"] >= 16 * 4
    assert all(v is None for v in metrics["methods"]["cnn-pretrained"]["detection"].values())
    assert (out / "work" / "detector" / "model.keras").is_file()  # trained on the database's boxes
    html = (out / "report.html").read_text()
    assert 'id="detection"' in html and "GAP change from cropping" in html
    # the detector was trained on the train split only: a query's box is not in its training data
    train_json = json.loads((out / "work" / "detector" / "train.json").read_text())
    assert train_json["config"]["manifest"].endswith("train.csv")


def test_detection_needs_a_detector(tmp_path, tiny_synth, embedder):
    from jobs.extract import detect_config
    from pipeline.run.compare import compare
    from pipeline.stages.extract import extract

    with pytest.raises(CairnError, match="need a detector"):
        compare(str(tiny_synth / "train.csv"), str(tiny_synth / "queries.csv"), str(tmp_path / "r"), ["cnn+det"])
    with pytest.raises(CairnError, match="no such file"):
        extract(str(tiny_synth / "train.csv"), str(tmp_path / "o"), "cnn", {"model": embedder},
                detect=DetectConfig(model=str(tmp_path / "missing.keras")))
    with pytest.raises(CairnError, match="CNN model not found"):
        extract(str(tiny_synth / "train.csv"), str(tmp_path / "o"), "cnn", {"model": str(tmp_path / "x.keras")})
    with pytest.raises(CairnError, match="not for hog"):
        extract(str(tiny_synth / "train.csv"), str(tmp_path / "o"), "hog", detect=DetectConfig(model="activation:none"))
    with pytest.raises(CairnError, match="reads cairn-detector"):  # the embedding model is not a detector
        extract(str(tiny_synth / "train.csv"), str(tmp_path / "o"), "cnn", {"model": embedder},
                detect=DetectConfig(model=embedder))
    with pytest.raises(CairnError, match="saved_model.pb"):
        extract(str(tiny_synth / "train.csv"), str(tmp_path / "o"), "cnn", {"model": embedder},
                detect=DetectConfig(model=str(tmp_path)))
    with pytest.raises(CairnError, match="needs --detector"):
        detect_config("", ["max_boxes=3"])
    with pytest.raises(CairnError, match="max_boxes"):
        detect_config("activation:none", ["max_boxes=x"])
    assert detect_config("activation:none", ["max_boxes=3"]).max_boxes == 3
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
