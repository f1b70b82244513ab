"""End to end: every classic method through `cairn compare` on the tiny synthetic set, and the jobs it chains."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.run.compare import compare
from pipeline.run.settings import parse_overrides
from pipeline.submission import read_submission
from tests.jobs.test_compare import flat

CLASSIC = ["hog", "sift-bovw", "sift-vlad", "sift-bovw+sv", "hog-linear", "sift-vlad-linear"]
# the tiny set has 16 database images: small vocabularies and PCA
SMALL = ["bovw.vocabulary.k=64", "vlad.vocabulary.k=8", "vlad.pca_dim=8", "hog.pca_dim=8", "sv.top_k=8",
         "vlad.pca_min_images=0", "hog.pca_min_images=0"]


@pytest.fixture(scope="module")
def classic_run(tmp_path_factory, tiny_synth):
    out = tmp_path_factory.mktemp("classic")
    compare(str(tiny_synth / "train.csv"), str(tiny_synth / "queries.csv"), str(out), CLASSIC, workers=1,
            config=parse_overrides(SMALL))
    return out


def test_every_classic_method_has_predictions_and_metrics(classic_run, tiny_synth):
    metrics = json.loads((classic_run / "metrics.json").read_text())
    assert sorted(metrics["methods"]) == sorted(CLASSIC)
    queries = [line.split(",")[0] for line in (tiny_synth / "queries.csv").read_text().splitlines()[1:]]
    for name, m in metrics["methods"].items():
        m = flat(m)
        assert 0 <= m["gap"] <= 1 and 0 <= m["map_at_100"] <= 1, name
        assert sorted(read_submission(str(classic_run / "predictions" / f"{name}.csv"))) == sorted(queries)
        assert pq.read_table(classic_run / "neighbours" / f"{name}.parquet").num_rows > 0
    m = {name: flat(entry) for name, entry in metrics["methods"].items()}
    assert m["sift-vlad"]["dim"] == 8 and m["sift-vlad"]["bytes_per_image"] == 32
    assert m["sift-bovw"]["dim"] == 64 and 0 < m["sift-bovw"]["bytes_per_image"] <= 64 * 8  # stored non-zeros
    assert m["sift-bovw+sv"]["bytes_per_image"] > m["sift-bovw"]["bytes_per_image"]  # + local features
    assert m["sift-bovw"]["train_seconds"] > 0 and m["sift-vlad-linear"]["train_seconds"] > m["sift-vlad"][
        "train_seconds"]
    assert m["hog"]["dim"] == 8  # hog.pca_dim=8 (16 database images allow up to 8): PCA-whitened HoG


def test_sift_features_are_extracted_once_for_every_sift_method(classic_run):
    folders = list((classic_run / "work" / "local").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("sift-")
    local = folders[0]
    shards = list((local / "train").glob("local-*.parquet"))
    meta = json.loads(pq.read_schema(shards[0]).metadata[b"cairn"])
    assert meta["schema"] == "cairn.local_features/2" and meta["postprocess"] == "rootsift"


def test_reranking_reorders_neighbours_by_inliers(classic_run):
    def by_query(name):
        rows = pq.read_table(classic_run / "neighbours" / f"{name}.parquet").to_pylist()
        out = {}
        for r in sorted(rows, key=lambda r: (r["query_id"], r["rank"])):
            out.setdefault(r["query_id"], []).append((r["id"], r["score"]))
        return out

    base, sv = by_query("sift-bovw"), by_query("sift-bovw+sv")
    assert base.keys() == sv.keys()
    for q, ranked in sv.items():
        assert {i for i, _ in ranked} == {i for i, _ in base[q]}  # same neighbours, possibly re-ordered
        assert np.all(np.diff([s for _, s in ranked]) <= 1e-7)  # scores follow the new order
    # each file says what its score is: a cosine, or after verification the re-ranking score
    for name, score in (("sift-bovw", "cosine"), ("sift-bovw+sv", "reranked")):
        meta = json.loads(pq.read_schema(classic_run / "neighbours" / f"{name}.parquet").metadata[b"cairn"])
        assert meta["kind"] == "neighbours" and meta["score"] == score and meta["score_meaning"], name
    ids = pq.read_schema(classic_run / "work" / "sift-bovw" / "index" / "ids.parquet")
    assert json.loads(ids.metadata[b"cairn"])["kind"] == "index ids"


def test_rerun_reuses_everything_and_gives_the_same_metrics(classic_run, tiny_synth):
    before = json.loads((classic_run / "metrics.json").read_text())
    compare(str(tiny_synth / "train.csv"), str(tiny_synth / "queries.csv"), str(classic_run), CLASSIC, workers=1,
            config=parse_overrides(SMALL))
    after = json.loads((classic_run / "metrics.json").read_text())
    for name in CLASSIC:
        for key in ("gap", "accuracy", "map_at_100", "extract_seconds", "train_seconds"):
            assert flat(after["methods"][name])[key] == flat(before["methods"][name])[key], (name, key)


def test_local_features_and_vectors_are_written_in_row_groups_not_one_per_image(classic_run):
    for pattern in ("local/sift-*/train/local-*.parquet", "sift-bovw/vectors/train/sparse-*.parquet"):
        for path in (classic_run / "work").glob(pattern):
            meta = pq.ParquetFile(path).metadata
            assert meta.num_rows == 20 and meta.num_row_groups < meta.num_rows, (path, meta.num_row_groups)


def test_verification_refuses_query_features_extracted_differently(classic_run, tiny_synth, tmp_path):
    from pipeline.errors import CairnError
    from pipeline.stages.extract import extract
    from pipeline.stages.recognize import recognize

    work = classic_run / "work"
    local = next((work / "local").iterdir())
    extract(str(tiny_synth / "queries.csv"), str(tmp_path / "q"), method="sift", params={"max_features": 50})
    with pytest.raises(CairnError, match="extract both alike"):
        recognize(str(work / "sift-bovw" / "index"), str(work / "sift-bovw" / "vectors" / "queries"),
                  str(tmp_path / "out"), verify=(str(local / "train"), str(tmp_path / "q"),
                                                 parse_overrides(SMALL).sv))
