"""The jobs between extraction and search: descriptor sampling, vocabulary/encoder training, encoding."""

import csv
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import CairnError
from pipeline.featuresets import features_prefix
from pipeline.parquet_io import find_shards, read_shards, write_table_shards
from pipeline.run import settings as classic
from pipeline.run.trainers import train
from pipeline.schemas import sparse_matrix_of, vectors_of
from pipeline.stages import encode as encode_stage
from pipeline.stages.encode import encode, iter_subset, read_sample, sample_descriptors
from pipeline.stages.extract import extract
from tests.conftest import rerecord_shards, side, write_manifest

SMALL_OVERRIDES = ["bovw.vocabulary.k=32", "vlad.vocabulary.k=4", "vlad.pca_dim=6", "vlad.pca_min_images=0",
                   "bovw.vocabulary.niter=5", "vlad.vocabulary.niter=5"]
SMALL = classic.parse_overrides(SMALL_OVERRIDES)


@pytest.fixture(scope="module")
def local(tmp_path_factory, tiny_synth):
    """SIFT features of the tiny set's database plus one flat grey image (no keypoints at all)."""
    root = tmp_path_factory.mktemp("local")
    flat = root / "flat.png"
    Image.new("RGB", (160, 120), (128, 128, 128)).save(flat)
    rows = [(r["id"], tiny_synth / r["path"], r["landmark_id"]) for r in csv.DictReader(open(tiny_synth / "train.csv"))]
    manifest = write_manifest(root / "train.csv", rows + [("flat", flat, rows[0][2])])
    extract(str(manifest), str(root / "sift"), method="sift", workers=1)
    return root


def test_sampling_is_reproducible_and_capped(local, tmp_path):
    a = sample_descriptors(str(local / "sift"), str(tmp_path / "a"), sample_size=340, subset_size=5, seed=3)
    b = sample_descriptors(str(local / "sift"), str(tmp_path / "b"), sample_size=340, subset_size=5, seed=3)
    da, db = read_sample(str(tmp_path / "a")), read_sample(str(tmp_path / "b"))
    ia, ib = list(iter_subset(str(tmp_path / "a"))), list(iter_subset(str(tmp_path / "b")))
    assert a["images"] == 21 and a["per_image"] == 17  # ceil(340 / 21)
    assert a == b and 0 < len(da) <= 340 and a["descriptors"] == len(da)
    assert sorted(map(bytes, da)) == sorted(map(bytes, db))  # same descriptors, whatever the bundle order
    assert sorted(f.width * 1000 + len(f) for f in ia) == sorted(f.width * 1000 + len(f) for f in ib)
    sample_descriptors(str(local / "sift"), str(tmp_path / "c"), sample_size=340, subset_size=5, seed=4)
    assert sorted(map(bytes, read_sample(str(tmp_path / "c")))) != sorted(map(bytes, da))  # the seed matters


@pytest.mark.parametrize("method", ["sift-bovw", "sift-vlad"])
def test_train_then_encode_gives_one_vector_per_image(local, tmp_path, method):
    record = train(method, str(local / "sift"), str(tmp_path / "model"), SMALL)
    assert record["counts"]["images"] == 21 and record["train_seconds"] > 0
    assert not list((tmp_path / "model").glob("sample*"))  # the sample is scratch
    out = encode(str(local / "sift"), str(tmp_path / "model" / "encoder.npz"), str(tmp_path / "vectors"))
    assert out["counts"] == {"inputs": 21, "outputs": 21}
    if method == "sift-bovw":
        table, meta = read_shards(features_prefix(str(tmp_path / "vectors"), "sparse"))
        x = sparse_matrix_of(table, meta["dim"])
        norms = np.sqrt(np.asarray(x.multiply(x).sum(1))).ravel()
    else:
        table, meta = read_shards(features_prefix(str(tmp_path / "vectors"), "global"))
        x = vectors_of(table)
        assert x.shape[1] == 6
        norms = np.linalg.norm(x, axis=1)
    ids = table.column("id").to_pylist()
    flat = ids.index("flat")
    assert norms[flat] == 0  # no keypoints: an empty / zero vector, not a dead letter and not NaN
    assert np.allclose(np.delete(norms, flat), 1, atol=1e-4)
    assert meta["method"] == method
    # a rerun reuses both the model and the vectors
    assert train(method, str(local / "sift"), str(tmp_path / "model"), SMALL)["train_seconds"] == \
        record["train_seconds"]
    assert encode(str(local / "sift"), str(tmp_path / "model" / "encoder.npz"),
                  str(tmp_path / "vectors"))["seconds"] == out["seconds"]


def test_mismatched_configs_are_refused(local, tmp_path):
    other = classic.parse_overrides(["bovw.sift.max_features=50", "bovw.vocabulary.k=8"])
    with pytest.raises(CairnError, match="extract with the same parameters"):
        train("sift-bovw", str(local / "sift"), str(tmp_path / "m"), other)
    with pytest.raises(CairnError, match="fewer than the"):
        train("sift-bovw", str(local / "sift"), str(tmp_path / "m"),
              classic.parse_overrides(["bovw.vocabulary.k=65536"]))
    with pytest.raises(CairnError, match="trains on global features"):
        train("hog-linear", str(local / "sift"), str(tmp_path / "m"), SMALL)
    train("sift-vlad", str(local / "sift"), str(tmp_path / "vlad"), SMALL)
    encoder = str(tmp_path / "vlad" / "encoder.npz")
    encode(str(local / "sift"), encoder, str(tmp_path / "vectors"))
    with pytest.raises(CairnError, match="reads local features"):
        encode(str(tmp_path / "vectors"), encoder, str(tmp_path / "x"))


def test_encode_never_writes_over_its_input_and_reuse_checks_the_artefact(local, tmp_path):
    train("sift-bovw", str(local / "sift"), str(tmp_path / "m"), SMALL)
    encoder = str(tmp_path / "m" / "encoder.npz")
    with pytest.raises(CairnError, match="is the --features folder"):
        encode(str(local / "sift"), encoder, str(local / "sift"))
    assert list((local / "sift").glob("local-*.parquet"))  # untouched
    # an artefact replaced behind the record's back is retrained, not reused
    (tmp_path / "m" / "encoder.npz").write_bytes(b"not the trained file")
    train("sift-bovw", str(local / "sift"), str(tmp_path / "m"), SMALL)
    assert (tmp_path / "m" / "encoder.npz").read_bytes()[:2] == b"PK"  # a real .npz again


def test_corrupt_artefacts_give_clear_errors(tmp_path):
    from features.artifacts import header, load

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CairnError, match="not a Cairn artefact"):
        load(str(bad), "bovw")
    with pytest.raises(CairnError, match="does not exist"):
        header(str(tmp_path / "missing.npz"))


def test_too_few_images_for_pca_whitening_keep_the_raw_vlad(local, tmp_path):
    config = classic.parse_overrides(["vlad.vocabulary.k=4", "vlad.vocabulary.niter=5", "vlad.pca_dim=6"])
    record = train("sift-vlad", str(local / "sift"), str(tmp_path / "m"), config)  # 21 images < 10 x 6
    assert record["dim"] == 4 * 128


def test_every_beam_job_runs_in_the_test_pipeline_it_is_given(local, tiny_synth, tmp_path):
    """`cairn train`, `cairn encode` and `cairn compare` give their Beam jobs the test pipeline they are handed
    (compare, which runs several, a new one from the function it is handed)."""
    from jobs import encode as encode_job
    from jobs import train as train_job
    from pipeline.options import make_pipeline, pipeline_options
    from pipeline.run.compare import compare

    ran = []

    def pipeline():
        p = make_pipeline(pipeline_options([], 1))
        run = p.run

        def counted(*args, **kwargs):
            ran.append(p)
            return run(*args, **kwargs)

        p.run = counted
        return p

    train_job.run(["--method", "sift-bovw", "--features", str(local / "sift"), "--out", str(tmp_path / "m"),
                   "--set", "bovw.vocabulary.k=32", "--set", "bovw.vocabulary.niter=5"], test_pipeline=pipeline())
    assert len(ran) == 1  # the descriptor sampling
    encode_job.run(["--features", str(local / "sift"), "--encoder", str(tmp_path / "m" / "encoder.npz"), "--out",
                    str(tmp_path / "v")], test_pipeline=pipeline())
    assert len(ran) == 2 and (side(tmp_path / "v") / "encode.json").exists()
    compare(str(tiny_synth / "train.csv"), str(tiny_synth / "queries.csv"), str(tmp_path / "run"), ["hog"],
            workers=1, report=None, test_pipeline=pipeline)
    assert len(ran) == 4 and len(set(map(id, ran))) == 4  # each extraction (database, queries) its own pipeline


def _reshard(src, dst, kind: str, shards: int, seed: int):
    """A copy of the features folder ``src`` whose rows are shuffled into ``shards`` shards: what another number
    of workers may write."""
    shutil.copytree(src, dst)
    shutil.copytree(side(src), side(dst))
    prefix = features_prefix(str(dst), kind)
    for path in find_shards(prefix):
        os.remove(path)
    table, _ = read_shards(features_prefix(str(src), kind))
    write_table_shards(table.take(np.random.default_rng(seed).permutation(table.num_rows)), prefix, shards)
    rerecord_shards(dst)


@pytest.mark.parametrize("method", ["sift-bovw", "sift-vlad"])
def test_vocabulary_and_encodings_do_not_depend_on_how_workers_sharded_the_rows(local, tmp_path, monkeypatch,
                                                                                method):
    """The same features in 1 shard, or shuffled into 3 (as 2 workers may write them), give the same
    vocabulary, encoder and encodings (sift-bovw's GAP moved from 0.757 to 0.814 between 1 and 2 workers)."""
    monkeypatch.setattr(encode_stage, "SUBSET_PART_IMAGES", 4, raising=False)  # the subset read in several parts
    _reshard(local / "sift", tmp_path / "other", "local", 3, seed=1)
    # VLAD's PCA learns from the first pca_sample images of a subset that sampled by id holds a few more
    config = classic.parse_overrides([*SMALL_OVERRIDES, "vlad.pca_sample=8"])
    trained = {}
    for name, features in (("one", local / "sift"), ("other", tmp_path / "other")):
        train(method, str(features), str(tmp_path / name / "model"), config, workers=1)
        encode(str(local / "sift"), str(tmp_path / name / "model" / "encoder.npz"), str(tmp_path / name / "vectors"))
        with np.load(tmp_path / name / "model" / "encoder.npz") as z:
            trained[name] = {k: z[k] for k in z.files}
    assert trained["one"].keys() == trained["other"].keys()
    for key, value in trained["one"].items():
        assert np.array_equal(value, trained["other"][key]), key
    kind = "sparse" if method == "sift-bovw" else "global"
    one = read_shards(features_prefix(str(tmp_path / "one" / "vectors"), kind))[0]
    other = read_shards(features_prefix(str(tmp_path / "other" / "vectors"), kind))[0]
    assert one.equals(other)


def test_encode_rerun_verifies_the_shards_it_would_reuse(local, tmp_path, caplog):
    """Issue 23 item 3: a truncated output shard is not reused (before: a traceback on every rerun)."""
    train("sift-bovw", str(local / "sift"), str(tmp_path / "m"), SMALL)
    encoder, out = str(tmp_path / "m" / "encoder.npz"), tmp_path / "bovw"
    first = encode(str(local / "sift"), encoder, str(out), workers=1)
    shard = "sparse-00000-of-00001.parquet"
    assert first["files"][shard]["rows"] == 21
    data = (out / shard).read_bytes()
    (out / shard).write_bytes(data[: len(data) // 2])
    caplog.set_level("INFO")
    again = encode(str(local / "sift"), encoder, str(out), workers=1)
    assert f"cannot reuse {out}: {shard} has" in caplog.text and again["counts"] == first["counts"]
    assert (out / shard).read_bytes() == data


def test_an_image_trainer_trains_again_when_an_image_changed_in_place(tmp_path, tiny_synth, caplog):
    """Issue 23 item 2: the trainers on images (cnn, delf, detector) are keyed on each image's size and
    modification time too, not on the manifest's bytes alone."""
    import os
    import shutil

    from pipeline.images import DecodeConfig
    from pipeline.stages.train import _open_on_images, _save_record

    rows = list(csv.DictReader(open(tiny_synth / "train.csv")))[:3]
    for r in rows:
        shutil.copy(tiny_synth / r["path"], tmp_path / f"{r['id']}.jpg")
    manifest = str(write_manifest(tmp_path / "m.csv", [(r["id"], f"{r['id']}.jpg", r["landmark_id"]) for r in rows]))
    out = tmp_path / "model"
    out.mkdir()

    def opened():
        return _open_on_images("cnn", manifest, str(out), "none", "w", DecodeConfig(), False)[2:]

    requested, reused = opened()
    assert reused is None
    (out / "model.keras").write_bytes(b"a trained model")
    _save_record(str(out), "model.keras", {"config": requested})
    assert opened()[1] is not None  # the same images: reused
    image = tmp_path / f"{rows[0]['id']}.jpg"
    shutil.copy(tmp_path / f"{rows[1]['id']}.jpg", image)  # replaced in place
    os.utime(image, ns=(0, os.stat(image).st_mtime_ns + 10**9))
    caplog.set_level("INFO")
    assert opened()[1] is None
    assert "the images (a size or modification time) changed since it was trained" in caplog.text
