"""Scale-out: the jobs give the same records whatever runs them.

- DirectRunner with worker processes (multi_processing) against in-process, record for record, for every Beam
  job: extraction (tests/jobs/test_extract.py), descriptor encoding, the index build with its adds on workers,
  and the Beam search + vote;
- the portable runners' path: FlinkRunner and SparkRunner submitted to Beam's embedded job service (the job API
  and the pipeline proto that a Flink or Spark cluster receives; the cluster itself is not reachable here);
- packaging for workers: the staged sdist holds every package and installs;
- models and indices on a Beam filesystem other than the local one, downloaded once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.io.localfilesystem import LocalFileSystem

from index.faiss_index import IndexConfig, VectorIndex
from pipeline.errors import CairnError
from pipeline.parquet_io import read_shards, write_table_shards
from pipeline.run.settings import parse_overrides
from pipeline.run.trainers import train
from pipeline.schemas import vectors_of
from pipeline.stages.encode import encode
from pipeline.stages.extract import extract
from pipeline.stages.index import build_index
from tests.conftest import rerecord_shards, side

pytestmark = pytest.mark.slow

LOOPBACK = ["--job_endpoint=embed", "--environment_type=LOOPBACK"]


def _table(folder, prefix="features"):
    table, meta = read_shards(f"{folder}/{prefix}")
    return table.sort_by("id"), meta


def _same_rows(a, b, prefix="features"):
    ta, _ = _table(a, prefix)
    tb, _ = _table(b, prefix)
    assert ta.num_rows == tb.num_rows > 0
    assert ta.column("id").to_pylist() == tb.column("id").to_pylist()
    assert ta.column("landmark_id").to_pylist() == tb.column("landmark_id").to_pylist()
    np.testing.assert_array_equal(vectors_of(ta), vectors_of(tb))


@pytest.fixture(scope="module")
def hog(tmp_path_factory, tiny_synth):
    """HoG features of the tiny set (train in 3 shards, queries) and a PCA encoder trained on them."""
    root = tmp_path_factory.mktemp("scale")
    for split in ("train", "queries"):
        extract(str(tiny_synth / f"{split}.csv"), str(root / split), workers=1, num_shards=3)
    # one in-process bundle fills one shard: spread the database over three, as a cluster's workers would
    table, _ = read_shards(str(root / "train" / "features"))
    for old in (root / "train").glob("features-*"):
        old.unlink()
    write_table_shards(table, str(root / "train" / "features"), 3)
    rerecord_shards(root / "train")
    config = parse_overrides(["hog.pca_dim=8", "hog.pca_min_images=0"])
    train("hog", str(root / "train"), str(root / "pca"), config)
    return root


def test_encode_multi_process_equals_in_process(tmp_path, hog):
    encoder = str(hog / "pca" / "encoder.npz")
    a = encode(str(hog / "train"), encoder, str(tmp_path / "a"), workers=1)
    b = encode(str(hog / "train"), encoder, str(tmp_path / "b"), workers=2)
    _same_rows(tmp_path / "a", tmp_path / "b")
    assert a["counts"] == b["counts"]


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "IVF4,PQ12x4"])
def test_index_built_on_workers_equals_the_local_build(tmp_path, hog, factory):
    config = IndexConfig(factory=factory, train_size=60)
    local = build_index(str(hog / "train"), str(tmp_path / "local"), config, beam="off")
    one = build_index(str(hog / "train"), str(tmp_path / "one"), config, beam="on", workers=1)
    two = build_index(str(hog / "train"), str(tmp_path / "two"), config, beam="on", workers=2)
    assert local["count"] == one["count"] == two["count"] > 0
    indices = [VectorIndex.load(str(tmp_path / n)) for n in ("local", "one", "two")]
    xq = vectors_of(_table(hog / "queries")[0])
    reference = indices[0].search(xq, 10)
    for built in indices[1:]:
        assert built.image_ids == indices[0].image_ids
        np.testing.assert_array_equal(built.labels, indices[0].labels)
        assert built.build_info["beam"] is True and built.build_info["shards"] == 3
        D, I = built.search(xq, 10)
        np.testing.assert_array_equal(I, reference[1])
        np.testing.assert_allclose(D, reference[0], rtol=1e-5, atol=1e-5)
        assert (built.nonlandmarks is None) == (indices[0].nonlandmarks is None)
        if built.nonlandmarks is not None:
            assert built.nonlandmarks.image_ids == indices[0].nonlandmarks.image_ids
    assert not (tmp_path / "two" / "shards").exists()


def test_unmergeable_index_kinds_are_refused_on_workers(tmp_path, hog):
    with pytest.raises(CairnError, match="cannot be merged"):
        build_index(str(hog / "train"), str(tmp_path / "h"), IndexConfig(factory="HNSW8,Flat"), beam="on",
                    workers=1)


def test_beam_search_multi_process_equals_in_process(tmp_path, hog):
    from index.recognize import VoteConfig
    from pipeline.stages.search import recognize_beam

    build_index(str(hog / "train"), str(tmp_path / "index"), IndexConfig(factory="Flat"))
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"rec{workers}"
        record = recognize_beam(str(tmp_path / "index"), str(hog / "queries"), str(out), VoteConfig(), 5,
                                workers=workers)
        assert record["counts"]["queries"] == _table(hog / "queries")[0].num_rows
        outs[workers] = out
    lines = [sorted((outs[w] / "predictions.csv").read_text().splitlines()) for w in (1, 2)]
    assert lines[0] == lines[1] and len(lines[0]) > 1
    tables = [pq.read_table(sorted(outs[w].glob("neighbours-*.parquet"))).sort_by([("query_id", "ascending"),
                                                                                 ("rank", "ascending")])
              for w in (1, 2)]
    assert tables[0].column("id").to_pylist() == tables[1].column("id").to_pylist()
    np.testing.assert_allclose(tables[0].column("score").to_numpy(), tables[1].column("score").to_numpy(), atol=1e-6)


@pytest.mark.parametrize("runner", ["FlinkRunner", "SparkRunner"])
def test_portable_runners_give_the_direct_runners_records(tmp_path, tiny_synth, hog, runner):
    """The job goes through the portable job API that Flink and Spark clusters use (the pipeline proto, the job
    service), run by Beam's embedded job service with LOOPBACK workers (which need nothing staged: the staged
    sdist is checked by the next test)."""
    out = tmp_path / runner
    record = extract(str(tiny_synth / "train.csv"), str(out), workers=1, num_shards=3,
                     beam_args=[f"--runner={runner}", *LOOPBACK])
    assert record["runner"] == runner
    _same_rows(hog / "train", out)
    built = build_index(str(out), str(tmp_path / "index"), IndexConfig(factory="IVF4,Flat", train_size=60),
                        beam="auto", beam_args=[f"--runner={runner}", *LOOPBACK,
                                                f"--temp_location={tmp_path / 'temp'}"])
    local = build_index(str(hog / "train"), str(tmp_path / "local"), IndexConfig(factory="IVF4,Flat", train_size=60))
    assert built["count"] == local["count"]
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert meta["build"]["beam"] is True and meta["build"]["runner"] == runner
    a, b = VectorIndex.load(str(tmp_path / "index")), VectorIndex.load(str(tmp_path / "local"))
    assert sorted(a.image_ids) == sorted(b.image_ids)
    xq = vectors_of(_table(hog / "queries")[0])
    ids_a = [[a.image_ids[i] if i >= 0 else None for i in row] for row in a.search(xq, 5)[1]]
    ids_b = [[b.image_ids[i] if i >= 0 else None for i in row] for row in b.search(xq, 5)[1]]
    assert ids_a == ids_b  # the same neighbours (the rows are in another order: ids, not row numbers, compare)


def test_cluster_runners_stage_cairn_for_their_workers(tmp_path):
    """Without packaging flags a cluster runner gets Cairn's setup.py; Beam's stager builds it into the sdist
    the workers install, and that sdist holds every package of Cairn."""
    from apache_beam.runners.portability.stager import Stager

    from pipeline.options import SETUP_FILE, pipeline_options

    options = pipeline_options(["--runner=FlinkRunner", "--flink_master=flink:8081", "--environment_type=DOCKER"])
    assert options.get_all_options()["setup_file"] == SETUP_FILE
    given = pipeline_options(["--runner=DataflowRunner", "--sdk_container_image=example/cairn:1"])
    assert not given.get_all_options()["setup_file"]
    Stager.create_job_resources(options, str(tmp_path))
    sdists = list(tmp_path.glob("cairn-*.tar.gz")) or list(tmp_path.glob("workflow.tar.gz"))
    assert sdists, f"no sdist staged: {sorted(p.name for p in tmp_path.iterdir())}"
    with tarfile.open(sdists[0]) as tar:
        names = tar.getnames()
    for package in ("pipeline", "features", "index", "models", "reports", "jobs"):
        assert any(n.endswith(f"/{package}/__init__.py") for n in names), package
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(sdists[0])], check=True, timeout=300)
    check = subprocess.run([sys.executable, "-c", "import jobs.cli, pipeline.stages.index_build, pipeline.options as o; "
                            "print(o.__file__)"], cwd=str(tmp_path), env={"PYTHONPATH": str(target)},
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().startswith(str(target))


_REMOTE_ROOT: list = []  # the local folder behind cairntest:// in the running test
_PREFIX = "cairntest://"


def _to_local(path):
    return str(_REMOTE_ROOT[-1] / path[len(_PREFIX):]) if path.startswith(_PREFIX) else path


def _to_remote(path):
    root = str(_REMOTE_ROOT[-1])
    return _PREFIX + str(path)[len(root) + 1:] if str(path).startswith(root) else path


class _ObjectStore(LocalFileSystem):
    """A Beam filesystem under cairntest:// over a local folder, with an object store's listing (no folders):
    a stand-in for gs:// or s3://."""

    @classmethod
    def scheme(cls):
        return "cairntest"

    def join(self, base, *paths):
        return "/".join([base.rstrip("/"), *paths])

    def split(self, path):
        head, _, tail = path.rpartition("/")
        return head, tail

    def mkdirs(self, path):
        super().mkdirs(_to_local(path))

    def has_dirs(self):
        return False

    def match(self, patterns, limits=None):
        results = super().match([_to_local(p) for p in patterns], limits)
        for r in results:
            r.pattern = _to_remote(r.pattern)
            r.metadata_list = [type(m)(_to_remote(m.path), m.size_in_bytes, m.last_updated_in_seconds)
                               for m in r.metadata_list if not os.path.isdir(m.path)]
        return results

    def create(self, path, *a, **kw):
        os.makedirs(os.path.dirname(_to_local(path)), exist_ok=True)
        return super().create(_to_local(path), *a, **kw)

    def open(self, path, *a, **kw):
        return super().open(_to_local(path), *a, **kw)

    def copy(self, sources, destinations):
        return super().copy([_to_local(x) for x in sources], [_to_local(x) for x in destinations])

    def rename(self, sources, destinations):
        return super().rename([_to_local(x) for x in sources], [_to_local(x) for x in destinations])

    def exists(self, path):
        return super().exists(_to_local(path))

    def size(self, path):
        return super().size(_to_local(path))

    def delete(self, paths):
        return super().delete([_to_local(x) for x in paths])


@pytest.fixture()
def remote_fs(tmp_path):
    root = tmp_path / "bucket"
    root.mkdir()
    _REMOTE_ROOT.append(root)
    yield _PREFIX, root
    _REMOTE_ROOT.pop()


def test_index_and_models_on_a_beam_filesystem_are_loaded_once_per_process(tmp_path, hog, remote_fs, monkeypatch):
    from pipeline import fs

    prefix, root = remote_fs
    record = build_index(str(hog / "train"), prefix + "indices/hog", IndexConfig(factory="Flat"))
    assert (root / "indices" / "hog" / "index.json").is_file()
    assert not fs.is_local_dir(prefix + "indices/hog")
    downloads = []
    real_copy = fs.copy_file
    monkeypatch.setattr(fs, "copy_file", lambda s, t: (downloads.append(s), real_copy(s, t))[1])
    monkeypatch.setattr(fs, "_LOCAL_COPIES", {})
    first = VectorIndex.load(prefix + "indices/hog")
    count = len(downloads)
    again = VectorIndex.load(prefix + "indices/hog")
    assert first.ntotal == again.ntotal == record["count"]
    assert count >= 3 and len(downloads) == count  # index.faiss, ids.parquet, index.json: once
    encoder = prefix + "models/encoder.npz"
    fs.copy_file(str(hog / "pca" / "encoder.npz"), encoder)
    out = encode(str(hog / "train"), encoder, str(tmp_path / "encoded"), workers=1)
    assert out["counts"]["outputs"] == record["count"]
    with pytest.raises(CairnError, match="no such file or folder"):
        fs.local_path(prefix + "models/missing.keras")


def _dataflow_available() -> bool:
    try:
        from apache_beam.runners.dataflow.internal import apiclient  # noqa: F401
    except ImportError:
        return False
    return True


DATAFLOW = ["--runner=DataflowRunner", "--dry_run=true", "--project=cairn-test-project", "--region=europe-west1",
            "--temp_location=gs://cairn-test-bucket/tmp", "--machine_type=n2-standard-8", "--max_num_workers=50"]


@pytest.mark.skipif(not _dataflow_available(), reason="the Dataflow client libraries are not installed (`make setup` "
                    "installs requirements-dataflow.lock)")
def test_dataflow_command_lines_translate_and_validate_offline(tmp_path, tiny_synth, hog, capsys):
    """--dry_run=true: Dataflow's translation of the job and its option checks, with Cairn's sdist staged
    locally; nothing is submitted and no account is needed."""
    from jobs.cli import main

    out = tmp_path / "extract"
    extract(str(tiny_synth / "train.csv"), str(out), workers=1)
    before = {p.name: p.stat().st_mtime_ns for p in (*out.iterdir(), *side(out).iterdir())}
    assert main(["extract", "--manifest", str(tiny_synth / "train.csv"), "--out", str(out), "--method", "hog",
                 "--force", *DATAFLOW]) == 0  # --force: not reused, even on a dry run
    assert "dry run: the pipeline was built and validated for --runner=DataflowRunner" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in (*out.iterdir(), *side(out).iterdir())}
    assert after == before  # the outputs, and the record, manifest and dead letters beside them, were left alone
    build_index(str(hog / "train"), str(tmp_path / "index"), IndexConfig(factory="Flat"))
    assert main(["recognize", "--index", str(tmp_path / "index"), "--features", str(hog / "queries"), "--out",
                 str(tmp_path / "rec"), "--beam", "on", *DATAFLOW]) == 0
    assert "dry run" in capsys.readouterr().out
    assert not (tmp_path / "rec").exists()
    assert main(["index", "--features", str(hog / "train"), "--out", str(tmp_path / "idx"), "--beam", "on",
                 *DATAFLOW]) == 0
    assert "nothing was trained" in capsys.readouterr().out and not (tmp_path / "idx").exists()
    assert main(["extract", "--manifest", str(tiny_synth / "train.csv"), "--out", str(out), "--method", "hog",
                 "--force", "--runner=DataflowRunner", "--dry_run=true", "--project=cairn-test-project"]) == 2
    assert "needs more options" in capsys.readouterr().err


def _download(path):
    from pipeline import fs

    fs._LOCAL_COPIES.clear()  # as a fresh worker process
    return fs.local_path(path)


def test_worker_processes_share_one_finished_download(tmp_path, hog, remote_fs, monkeypatch):
    """Several processes of one machine ask for the same index at once: each gets a complete copy, and a copy
    in use is never replaced under a reader."""
    import multiprocessing
    import tempfile

    prefix, _ = remote_fs
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    build_index(str(hog / "train"), prefix + "indices/shared", IndexConfig(factory="Flat"))
    with multiprocessing.get_context("fork").Pool(3) as pool:
        folders = pool.map(_download, [prefix + "indices/shared"] * 6)
    assert len(set(folders)) == 1
    record = json.loads((tmp_path / "bucket" / "indices" / "shared" / "index.json").read_text())
    assert VectorIndex.load(folders[0]).ntotal == record["count"] > 0
    assert folders[0].startswith(str(tmp_path / "tmp" / "cairn-models"))
    assert len(os.listdir(tmp_path / "tmp" / "cairn-models")) == 1  # one finished copy, no staging left


def test_dry_run_is_dataflows_and_leaves_outputs_alone(tmp_path, tiny_synth):
    from pipeline.options import is_dry_run, pipeline_options

    assert not is_dry_run(pipeline_options(["--runner=DataflowRunner", "--dry_run=false"]))
    with pytest.raises(CairnError, match="--dry_run is DataflowRunner's"):
        pipeline_options(["--runner=DirectRunner", "--dry_run=true"])
    with pytest.raises(CairnError, match="use true or false"):
        pipeline_options(["--runner=DataflowRunner", "--dry_run=maybe"])


def test_compare_on_a_portable_runner_gives_the_direct_runners_results(tmp_path, tiny_synth):
    """`cairn compare` unchanged on FlinkRunner (Beam's embedded job service): every Beam step (extraction,
    descriptor sampling, encoding, the index adds on workers) goes through the portable job API, and the
    predictions and neighbours are the DirectRunner's."""
    from pipeline.run.compare import compare

    methods = ["hog", "sift-bovw", "sift-vlad"]
    args = {"train": str(tiny_synth / "train.csv"), "queries": str(tiny_synth / "queries.csv"), "report": None}
    direct = compare(out=str(tmp_path / "direct"), method_names=methods, **args)
    flink = compare(out=str(tmp_path / "flink"), method_names=methods, **args,
                    beam_args=["--runner=FlinkRunner", *LOOPBACK, f"--temp_location={tmp_path / 'temp'}"])
    for m in methods:
        assert (tmp_path / "flink" / "predictions" / f"{m}.csv").read_text() == \
            (tmp_path / "direct" / "predictions" / f"{m}.csv").read_text(), m
        a, b = (pq.read_table(tmp_path / run / "neighbours" / f"{m}.parquet") for run in ("direct", "flink"))
        assert a.column("id").to_pylist() == b.column("id").to_pylist(), m
        assert direct["methods"][m]["quality"]["gap"] == flink["methods"][m]["quality"]["gap"]
    built = json.loads((tmp_path / "flink" / "work" / "sift-vlad" / "index" / "index.json").read_text())["build"]
    assert built["beam"] is True and built["runner"] == "FlinkRunner"
