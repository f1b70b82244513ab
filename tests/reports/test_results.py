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


def _run(tmp_path, query_labels, train_labels=(1, 1, 2, 2)):
    from pipeline.manifest import read_manifest
    from reports.results import MethodResult, RunResults

    for name, labels in (("train", train_labels), ("queries", query_labels)):
        rows = ["id,path,landmark_id"] + [f"{name[0]}{i},{name[0]}{i}.jpg,{'' if y is None else y}"
                                          for i, y in enumerate(labels)]
        (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")
    train, queries = read_manifest(str(tmp_path / "train.csv")), read_manifest(str(tmp_path / "queries.csv"))
    nb = {q: [(t, 0.9 - 0.1 * r, y) for r, (t, y) in enumerate(zip(train.ids, train.labels, strict=True))]
          for q in queries.ids}
    method = MethodResult("hog", "baseline", "", [1, None, 2][:len(queries.ids)], [0.8, 0.0, 0.6][:len(queries.ids)],
                          nb, raw_pred=[1, 2, 2][:len(queries.ids)], raw_conf=np.array([0.8, 0.3, 0.6][:len(queries.ids)]))
    return RunResults(str(tmp_path), {"config": {}}, train, queries, {"hog": method}, [])


def test_figures_without_a_landmark_query_are_null_with_a_note(tmp_path):
    """GAP and mAP@100 were written as 0.0 when no query shows a landmark: a figure that cannot be computed."""
    from jobs.common import summary_table
    from reports.results import method_quality

    run = _run(tmp_path, [None, None, None])
    q = method_quality(run, run.methods["hog"])
    for key in ("gap", "landmark_accuracy", "map_at_100", "mean_class_ap", "gap_all_answers"):
        assert q[key] is None, key
    assert set(q["recall_at_k"].values()) == {None}
    assert q["accuracy"] == round(1 / 3, 6)  # defined: the query left unanswered is right
    assert "no query shows a landmark" in q["note"] and "GAP" in q["note"]
    table = summary_table({"methods": {"hog": {"quality": q, "cost": {}}}})
    assert "n/a" in table.splitlines()[2] and "n/a: no query shows a landmark" in table

    run = _run(tmp_path, [1, None, 2])
    defined = method_quality(run, run.methods["hog"])
    assert defined["note"] is None and defined["gap"] == 1.0 and defined["map_at_100"] == round((1 + 5 / 12) / 2, 6)


def test_map_without_database_images_of_the_query_landmarks_is_null(tmp_path):
    from reports.results import method_quality

    run = _run(tmp_path, [5, None, 6])  # landmarks that no database image shows
    q = method_quality(run, run.methods["hog"])
    assert q["gap"] == 0.0 and q["map_at_100"] is None and set(q["recall_at_k"].values()) == {None}
    assert "no query's landmark has database images" in q["note"]


def test_plots_leave_out_undefined_figures():
    from reports import plots

    families = {"hog": "baseline", "cnn": "deep"}
    assert plots.quality_vs_cost({"hog": {"gap": None, "images_per_second": 5.0, "bytes_per_image": 10},
                                  "cnn": {"gap": 0.5, "images_per_second": 2.0, "bytes_per_image": 20}}, families)
    assert plots.pr_curves({"hog": (np.array([1.0]), np.array([0.5]), None)}, families)
    assert plots.recall_at_k({"hog": {"1": None, "5": None}, "cnn": {"1": 0.5, "5": 0.7}}, families)


def test_confidences_and_settings_are_written_for_people():
    """A re-ranking score of 0.0008 printed as "(0.00)", and the vote table showed raw JSON with 17-digit floats."""
    from reports.html import Page, _confidence, _short

    assert _confidence(0.000812345) == "0.000812" and _confidence(0.85) == "0.85" and _confidence(1.0) == "1"
    assert _short(0.30820312500000004) == "0.3082" and _short([2.299704, -8.834364]) == "[2.3, -8.834]"
    text = Page._vote({"rule": "vote", "min_confidence": 0.952531000001, "k": 10, "gap": 0.015, "accuracy": 0.5})
    assert text == "k=10, min_confidence=0.9525, rule=vote"


def test_every_built_method_has_a_style_of_its_own_whatever_else_a_run_compares():
    """reports/plots.py names the built methods (reports may not import the registry): a new method that is not
    there would take a free style, but a registry entry left out of that table should be added to it."""
    from pipeline.run.methods import METHODS
    from reports.plots import KNOWN, styles

    for name, method in METHODS.items():
        assert name in KNOWN[method.family], name
    families = {name: m.family for name, m in METHODS.items()}
    every = styles(families)
    assert len(set(every.values())) == len(every)
    alone = styles({"cnn": "deep", "my-method": "deep"})  # a run of two keeps cnn's style; the new one a free one
    assert alone["cnn"] == every["cnn"] and alone["my-method"] != alone["cnn"]
