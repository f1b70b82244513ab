"""cairn index / recognize / neighbours on landmark-shaped vectors written as feature shards."""

import csv
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from index.faiss_index import VectorIndex
from index.recognize import TuneConfig, VoteConfig
from index.synthetic import VectorSet, VectorSetConfig
from jobs import index as index_job
from jobs import neighbours as neighbours_job
from jobs import recognize as recognize_job
from pipeline import parquet_io
from pipeline.errors import CairnError
from pipeline.parquet_io import write_table_shards
from pipeline.schemas import global_features_schema, global_features_table

META = {"method": "synthetic-vectors", "config": {"seed": 0}}


def _write(folder, x, y, shards, prefix="q"):
    ids = [f"{prefix}{i:05d}" for i in range(len(x))]
    labels = [None if v < 0 else int(v) + 1000 for v in y]
    table = global_features_table(ids, labels, x, global_features_schema(x.shape[1], META))
    write_table_shards(table, str(folder / "features"), shards)
    return ids, labels


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    root = tmp_path_factory.mktemp("vectors")
    vs = VectorSet(VectorSetConfig(dim=32, classes=60, seed=5, spread=(0.4, 0.7)))
    xb, yb = vs.draw(3000, seed=1, distractors=0.15)
    xq, yq = vs.draw(400, seed=2, distractors=0.5)
    _write(root / "db", xb, yb, 3, "db")
    ids, labels = _write(root / "queries", xq, yq, 2)
    return root, dict(zip(ids, labels, strict=True))


def main(argv):
    """Run a job as `cairn` would, in this process (without its logging set-up): 0, or 2 for a CairnError."""
    job = {"index": index_job, "recognize": recognize_job, "neighbours": neighbours_job}[argv[0]]
    try:
        job.run(argv[1:])
    except CairnError as e:
        print(f"cairn {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _predictions(path):
    with open(path, newline="") as f:
        return {r["id"]: r["landmarks"] for r in csv.DictReader(f)}


def _gap(preds, truth):
    from reports import metrics as M

    ids = sorted(truth)
    pred = [int(preds[q].split()[0]) if preds[q] else None for q in ids]
    conf = [float(preds[q].split()[1]) if preds[q] else 0.0 for q in ids]
    return M.gap(pred, conf, [truth[q] for q in ids], ids)


def test_index_recognize_and_neighbours_end_to_end(vectors, tmp_path, capsys):
    root, truth = vectors
    ix = tmp_path / "ix"
    assert main(["index", "--features", str(root / "db"), "--out", str(ix), "--factory", "IVF32,Flat",
                 "--search-params", "nprobe=8", "--shard-size", "700"]) == 0
    meta = json.loads((ix / "index.json").read_text())
    # the rows are added in image-id order, 700 at a time (not shard by shard)
    assert meta["factory"] == "IVF32,Flat" and meta["count"] == 3000 and meta["build"]["shards"] == 5
    assert meta["nonlandmarks"] > 0 and meta["build"]["source"] == str(root / "db")

    # untuned: every query gets the top class
    assert main(["recognize", "--index", str(ix), "--features", str(root / "queries"), "--out",
                 str(tmp_path / "plain"), "--no-tune", "--neighbours", "20"]) == 0
    plain = _predictions(tmp_path / "plain" / "predictions.csv")
    # tuned on held-out database images (the folder recorded in the index)
    assert main(["recognize", "--index", str(ix), "--features", str(root / "queries"), "--out",
                 str(tmp_path / "tuned"), "--neighbours", "20"]) == 0
    tuned = _predictions(tmp_path / "tuned" / "predictions.csv")
    record = json.loads((tmp_path / "tuned" / "recognize.json").read_text())
    # on validation: the threshold is the best balance of GAP and accuracy for the chosen rule (answering every
    # query is one of the thresholds tried), and that rule ranks at least as well as the top-1 rule
    tuning = record["tuning"]
    curve, chosen = tuning["threshold_curve"], tuning["tuned"]
    assert curve[0]["threshold"] == 0.0
    assert chosen["gap"] + chosen["weighted_accuracy"] >= curve[0]["gap"] + curve[0]["weighted_accuracy"] - 1e-6
    assert curve[0]["gap"] >= tuning["top1"]["gap"] - 1e-6
    assert set(plain) == set(tuned) == set(truth)
    # the no-landmark handling does not cost GAP on the queries (observed: 0.999 -> 0.999 on these easy vectors;
    # the demo's images measure the gain)
    assert _gap(tuned, truth) >= _gap(plain, truth) - 0.01

    table = pq.read_table(tmp_path / "tuned" / "neighbours.parquet")
    assert table.num_rows == 400 * 20 and table.column("rank").to_pylist()[:3] == [1, 2, 3]

    assert main(["neighbours", "--index", str(ix), "--features", str(root / "queries"), "--out",
                 str(tmp_path / "nn"), "--k", "5", "--csv", "--search-params", "nprobe=32"]) == 0
    with open(tmp_path / "nn" / "neighbours.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 400 * 5 and set(rows[0]) == {"query_id", "rank", "id", "score", "landmark_id"}
    assert "400 queries searched" in capsys.readouterr().out


def test_beam_search_job_equals_the_local_path(vectors, tmp_path):
    root, _ = vectors
    ix = tmp_path / "ix"
    assert main(["index", "--features", str(root / "db"), "--out", str(ix), "--factory", "Flat"]) == 0
    common = ["--index", str(ix), "--features", str(root / "queries"), "--neighbours", "10", "--no-tune",
              "--nonlandmark-weight", "0.5", "--runner=DirectRunner"]
    assert main(["recognize", *common, "--out", str(tmp_path / "local"), "--beam", "off"]) == 0
    assert main(["recognize", *common, "--out", str(tmp_path / "beam"), "--beam", "on"]) == 0
    assert _predictions(tmp_path / "local" / "predictions.csv") == _predictions(tmp_path / "beam" / "predictions.csv")
    local = pq.read_table(tmp_path / "local" / "neighbours.parquet").sort_by([("query_id", "ascending"),
                                                                               ("rank", "ascending")])
    beam = pq.read_table(sorted((tmp_path / "beam").glob("neighbours-*.parquet"))).sort_by(
        [("query_id", "ascending"), ("rank", "ascending")])
    assert local.column("id").to_pylist() == beam.column("id").to_pylist()
    np.testing.assert_allclose(local.column("score").to_numpy(), beam.column("score").to_numpy(), rtol=1e-6)
    for path in [tmp_path / "local" / "neighbours.parquet", *(tmp_path / "beam").glob("neighbours-*.parquet")]:
        assert json.loads(pq.read_schema(path).metadata[b"cairn"])["score"] == "cosine", path
    record = json.loads((tmp_path / "beam" / "recognize.json").read_text())
    assert record["counts"]["queries"] == 400 and record["counts"]["neighbour_rows"] == 4000
    # the answers before the threshold too, with the threshold and the rule in their metadata
    local = pq.read_table(tmp_path / "local" / "confidences.parquet").sort_by("query_id")
    shards = sorted((tmp_path / "beam").glob("confidences-*.parquet"))
    assert shards and json.loads(pq.read_schema(shards[0]).metadata[b"cairn"])["rule"] == "vote"
    beam = pq.read_table(shards).sort_by("query_id")
    assert beam.num_rows == 400 and local.column("query_id").equals(beam.column("query_id"))
    assert local.column("landmark_id").equals(beam.column("landmark_id"))
    assert local.column("kept").equals(beam.column("kept"))
    np.testing.assert_allclose(local.column("confidence").to_numpy(), beam.column("confidence").to_numpy(),
                               rtol=1e-6)


def test_beam_search_job_records_its_tuning(vectors, tmp_path):
    root, _ = vectors
    ix = tmp_path / "ix"
    assert main(["index", "--features", str(root / "db"), "--out", str(ix), "--factory", "Flat"]) == 0
    assert main(["recognize", "--index", str(ix), "--features", str(root / "queries"), "--out",
                 str(tmp_path / "beam"), "--beam", "on", "--runner=DirectRunner"]) == 0
    record = json.loads((tmp_path / "beam" / "recognize.json").read_text())
    tuned = record["tuning"]["tuned"]
    assert record["tuning"]["queries"] > 0 and tuned["min_confidence"] == record["config"]["vote"]["min_confidence"]
    shards = sorted((tmp_path / "beam").glob("confidences-*.parquet"))
    conf = pq.read_table(shards)
    kept = conf.column("kept").to_numpy(zero_copy_only=False)
    assert np.array_equal(kept, conf.column("confidence").to_numpy() >= tuned["min_confidence"])
    # the threshold is fitted to all the queries after the job (it needs every answer), as in one process
    assert tuned["threshold_from"] == "queries" and record["tuning"]["query_threshold"]["queries"] == 400
    assert json.loads(pq.read_schema(shards[0]).metadata[b"cairn"])["threshold"] == tuned["min_confidence"]
    assert main(["recognize", "--index", str(ix), "--features", str(root / "queries"), "--out",
                 str(tmp_path / "local"), "--beam", "off"]) == 0
    local = json.loads((tmp_path / "local" / "recognize.json").read_text())["tuning"]
    assert local["tuned"]["min_confidence"] == tuned["min_confidence"]
    assert _predictions(tmp_path / "local" / "predictions.csv") == _predictions(tmp_path / "beam" / "predictions.csv")
    assert record["counts"]["predicted"] == sum(1 for v in _predictions(tmp_path / "beam" / "predictions.csv").values()
                                                if v)
    # from the validation queries alone: no query-set record, the validation threshold
    assert main(["recognize", "--index", str(ix), "--features", str(root / "queries"), "--out",
                 str(tmp_path / "val"), "--beam", "off", "--threshold-from", "validation"]) == 0
    val = json.loads((tmp_path / "val" / "recognize.json").read_text())["tuning"]
    assert val["tuned"]["threshold_from"] == "validation" and "query_threshold" not in val
    assert val["tuned"]["min_confidence"] == local["query_threshold"]["validation_threshold"]


def test_validation_queries_get_the_non_landmark_penalty_a_real_query_gets(vectors, tmp_path):
    """A validation query made from a database image is penalised by its similarity to every *other* known
    non-landmark image, as a real query is by all of them: leaving out all the held-out ones (half of them)
    made the validation's penalty smaller and its confidences higher than the real queries'."""
    from index.recognize import validation_split
    from index.sparse_index import load_any
    from pipeline.stages.lookup import nonlandmark_sims, read_rows, search

    root, _ = vectors
    ix = tmp_path / "ix"
    assert main(["index", "--features", str(root / "db"), "--out", str(ix), "--factory", "Flat"]) == 0
    index = load_any(str(ix))
    split = validation_split(index.labels, TuneConfig(), index.image_ids)
    held = split.held
    x = read_rows(str(root / "db"), [index.image_ids[r] for r in held])
    D, I = search(index, x, 40)
    config = VoteConfig()
    sims = nonlandmark_sims(index, x, D, I, config, own=held)
    every = read_rows(str(root / "db"), list(index.image_ids))
    clutter = np.nonzero(index.labels < 0)[0]
    S = x @ every[clutter].T
    S[held[:, None] == clutter[None, :]] = -np.inf  # itself
    expected = np.mean(-np.sort(-S, axis=1)[:, :config.nonlandmark_k], axis=1)
    np.testing.assert_allclose(sims, expected, atol=1e-5)
    assert len(split.nonlandmark) > 0 and np.isin(clutter, split.nonlandmark).sum() < len(clutter)


def test_dimension_mismatch_and_bad_flags_are_clear_errors(vectors, tmp_path, capsys):
    root, _ = vectors
    ix = tmp_path / "ix"
    assert main(["index", "--features", str(root / "db"), "--out", str(ix), "--factory", "Flat"]) == 0
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    _write(tmp_path / "other", x, np.zeros(5, int), 1)
    assert main(["neighbours", "--index", str(ix), "--features", str(tmp_path / "other"), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "dimension 16 but the index holds dimension 32" in err and "Traceback" not in err
    assert main(["recognize", "--index", str(ix), "--features", str(root / "queries"), "--out", str(tmp_path / "o"),
                 "--search-params", "nprobe=4"]) == 2
    assert "does not apply" in capsys.readouterr().err
    assert main(["index", "--features", str(root / "db"), "--out", str(tmp_path / "b"),
                 "--memory-budget", "lots"]) == 2
    assert "memory size" in capsys.readouterr().err
    # the command itself: one line, exit status 2
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "neighbours", "--index", str(ix), "--features",
                             str(tmp_path / "other"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("cairn neighbours: error:")
    assert "Traceback" not in result.stderr


def test_a_classifier_learns_its_no_landmark_threshold_on_unseen_classes(vectors, tmp_path):
    """A copy of the classifier trained without a fifth of the classes answers their images wrongly, with some
    probability: the threshold learned there makes the classifier say "no landmark" to most queries of
    landmarks it does not know, and the accuracy of the recognition rises over the untuned classifier's."""
    from models.classifiers import NearestClassMean
    from pipeline.featuresets import features_prefix
    from pipeline.parquet_io import read_shards
    from pipeline.schemas import labels_of, vectors_of
    from pipeline.stages.recognize import tune_classifier

    root, truth = vectors
    table, _ = read_shards(features_prefix(str(root / "db"), "global"))
    X, y = vectors_of(table), labels_of(table)
    model = NearestClassMean().fit(X, y)
    threshold, record = tune_classifier(model, str(root / "db"), TuneConfig())
    assert 0 < threshold < 1 and record["unseen_classes"] == 12 and record["unseen_queries"] > 0
    assert record["tuned"]["accuracy"] > record["untuned"]["accuracy"]
    path = tmp_path / "classifier.npz"
    model.save(str(path))
    ix = tmp_path / "ix"
    assert main(["index", "--features", str(root / "db"), "--out", str(ix), "--factory", "Flat"]) == 0
    runs = {}
    for name, extra in (("plain", ["--no-tune"]), ("tuned", [])):
        assert main(["recognize", "--index", str(ix), "--features", str(root / "queries"), "--out",
                     str(tmp_path / name), "--classifier", str(path), *extra]) == 0
        runs[name] = _predictions(tmp_path / name / "predictions.csv")
    rec = json.loads((tmp_path / "tuned" / "recognize.json").read_text())
    assert rec["tuning"]["rule"] == "classifier" and rec["tuning"]["tuned"]["min_confidence"] > 0
    # a classifier keeps its validation threshold: its validation copies' probabilities are not the queries'
    assert rec["tuning"]["tuned"]["threshold_from"] == "validation" and "skipped" in rec["tuning"]["query_threshold"]

    def accuracy(preds):
        return np.mean([(int(preds[q].split()[0]) if preds[q] else None) == t for q, t in truth.items()])

    assert accuracy(runs["tuned"]) > accuracy(runs["plain"])


def test_aligned_similarities_follow_the_reordered_neighbours():
    from pipeline.stages.recognize import aligned_similarities

    D = np.array([[0.9, 0.8, 0.7, -np.inf], [0.5, 0.4, 0.3, 0.2]], np.float32)
    I = np.array([[7, 3, 5, -1], [1, 2, 3, 4]])
    I2 = np.array([[5, 7, 3, -1], [4, 1, 3, 2]])  # re-ranked: each row a permutation of I's
    out = aligned_similarities(D, I, I2)
    np.testing.assert_array_equal(out[0, :3], np.float32([0.7, 0.9, 0.8]))
    assert np.isneginf(out[0, 3])
    np.testing.assert_array_equal(out[1], np.float32([0.2, 0.5, 0.3, 0.4]))


@pytest.mark.parametrize("part_rows", [20_000, 400])  # one part in memory, or parts split by id range on disk
def test_index_and_tuning_do_not_depend_on_how_workers_sharded_the_rows(tmp_path, monkeypatch, part_rows):
    """Which rows a job's workers write to which shard, and in which order, follows the number of workers: the
    same rows in 3 shards, or shuffled into 5, give the same index ids and the same tuned predictions."""
    monkeypatch.setattr(parquet_io, "ID_ORDER_BUCKET_ROWS", part_rows, raising=False)
    vs = VectorSet(VectorSetConfig(dim=16, classes=20, seed=7, spread=(0.4, 0.7)))
    xb, yb = vs.draw(1500, seed=1, distractors=0.15)
    xq, yq = vs.draw(100, seed=2, distractors=0.5)
    table = global_features_table([f"db{i:05d}" for i in range(len(xb))],
                                  [None if v < 0 else int(v) + 1000 for v in yb], xb,
                                  global_features_schema(xb.shape[1], META))
    write_table_shards(table, str(tmp_path / "a" / "features"), 3)
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    write_table_shards(shuffled, str(tmp_path / "b" / "features"), 5)
    _write(tmp_path / "q", xq, yq, 2)
    for name in ("a", "b"):
        assert main(["index", "--features", str(tmp_path / name), "--out", str(tmp_path / f"ix{name}"),
                     "--factory", "IVF8,Flat", "--search-params", "nprobe=2", "--shard-size", "300"]) == 0
        assert main(["recognize", "--index", str(tmp_path / f"ix{name}"), "--features", str(tmp_path / "q"),
                     "--out", str(tmp_path / f"r{name}"), "--neighbours", "10"]) == 0
    a, b = VectorIndex.load(str(tmp_path / "ixa")), VectorIndex.load(str(tmp_path / "ixb"))
    assert a.image_ids == b.image_ids == sorted(a.image_ids)
    assert (tmp_path / "ra" / "predictions.csv").read_bytes() == (tmp_path / "rb" / "predictions.csv").read_bytes()


def test_a_factory_that_would_abort_faiss_is_one_error_line(vectors, tmp_path):
    """`--factory HNSW0` passed FAISS's parser and aborted the process at the first add."""
    root, _ = vectors
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "index", "--features", str(root / "db"), "--out",
                             str(tmp_path / "ix"), "--factory", "HNSW0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("cairn index: error: factory 'HNSW0'")
    assert "at least 1" in result.stderr and "Traceback" not in result.stderr


def test_k_and_neighbours_beyond_the_database_are_clamped(tmp_path, caplog):
    """`--k 100000` made tuning ask for 186 GiB ([queries, k, k] class scores); k and the neighbours listed are
    now at most the database's images, with a log line."""
    vs = VectorSet(VectorSetConfig(dim=16, classes=12, seed=5, spread=(0.4, 0.7)))
    xb, yb = vs.draw(150, seed=1, distractors=0.15)
    xq, yq = vs.draw(30, seed=2, distractors=0.5)
    _write(tmp_path / "db", xb, yb, 1, "db")
    _write(tmp_path / "queries", xq, yq, 1)
    ix = tmp_path / "ix"
    assert main(["index", "--features", str(tmp_path / "db"), "--out", str(ix), "--factory", "Flat"]) == 0
    with caplog.at_level("INFO", logger="pipeline.stages.recognize"):
        assert main(["recognize", "--index", str(ix), "--features", str(tmp_path / "queries"), "--out",
                     str(tmp_path / "r"), "--k", "100000", "--neighbours", "100000"]) == 0
    assert "k=100000 is more than the 150 database images; voting with k=150" in caplog.text
    assert "listing the 150 database images per query" in caplog.text
    record = json.loads((tmp_path / "r" / "recognize.json").read_text())
    assert record["config"]["vote"]["k"] == 150 and record["config"]["neighbours"] == 150
    assert record["tuning"]["tuned"]["k"] == 150
    assert pq.read_table(tmp_path / "r" / "neighbours.parquet").num_rows == 30 * 150
    assert main(["neighbours", "--index", str(ix), "--features", str(tmp_path / "queries"), "--out",
                 str(tmp_path / "n"), "--k", "100000"]) == 0
    assert json.loads((tmp_path / "n" / "neighbours.json").read_text())["config"]["k"] == 150


def test_recognize_refuses_an_index_with_a_flipped_byte(vectors, tmp_path, capsys):
    """A flipped byte in index.faiss loaded fine and gave every query a confidence near 1e24."""
    root, _ = vectors
    ix = tmp_path / "ix"
    assert main(["index", "--features", str(root / "db"), "--out", str(ix), "--factory", "Flat"]) == 0
    data = bytearray((ix / "index.faiss").read_bytes())
    data[len(data) // 2 + 3] ^= 0x7F  # inside the stored vectors: FAISS itself reads the file without complaint
    (ix / "index.faiss").write_bytes(bytes(data))
    assert main(["recognize", "--index", str(ix), "--features", str(root / "queries"), "--out", str(tmp_path / "o"),
                 "--no-tune"]) == 2
    err = capsys.readouterr().err
    assert "index.faiss does not match the sha256 recorded when it was built" in err
    assert "rebuild the index with `cairn index`" in err and not (tmp_path / "o" / "predictions.csv").exists()
