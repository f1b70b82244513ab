import subprocess
import sys

import pytest

from jobs import cli
from tests.conftest import PRETRAINED, SMALL_DEMO, side


def _cairn(*args, **kw):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=300, **kw)


def test_help_lists_every_command_and_method(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("synth", "extract", "train", "index", "recognize", "report", "compare", "demo"):
        assert f"  {name}" in out
    assert "hog" in out and "cnn+delf" in out and "delf+sv" in out and "cnn-pretrained" in out and "cnn+det" in out


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_has_help(command):
    result = _cairn(command, "--help")
    assert result.returncode == 0 and "usage: cairn " + command in result.stdout


def test_user_mistakes_end_in_one_line_and_exit_2(tmp_path, tiny_synth):
    compare = ["compare", "--train", str(tiny_synth / "train.csv"), "--queries", str(tiny_synth / "queries.csv"),
               "--out", str(tmp_path / "o")]
    extract = ["extract", "--manifest", str(tiny_synth / "train.csv"), "--out", str(tmp_path / "o")]
    cases = [
        (["compare", "--train", str(tmp_path / "no.csv"), "--queries", "q.csv", "--out", str(tmp_path / "o")],
         "does not exist"),
        ([*compare, "--methods", "delf+sv", "--set", "delf.max_features=0"], "max_features and batch_size >= 1"),
        ([*compare, "--methods", "cnn-pretrained"], "needs a frozen model"),
        (["train", "--method", "cnn", "--features", str(tmp_path), "--out", str(tmp_path / "m")],
         "needs --manifest"),
        ([*compare, "--set", "cnn.finetune.backbone.name=vgg"], "unknown backbone"),
        ([*compare, "--methods", "magic"], "unknown method 'magic'"),
        (["train", "--method", "sift-bovw+sv", "--features", str(tmp_path), "--out", str(tmp_path / "m")],
         "learns nothing"),
        (["train", "--method", "sift-vlad", "--features", str(tmp_path), "--out", str(tmp_path / "m")],
         "holds no features"),
        ([*compare, "--set", "bovw.vocabulary.k=many"], "is not an integer"),
        ([*compare, "--set", "bovw.vocabulary.kk=3"], "has no field 'kk'"),
        ([*compare, "--set", "bovw.sift.dtype=int4"], "dtype"),
        (["report", str(tmp_path)], "has no run.json"),
        (["frobnicate"], "unknown command"),
        ([*compare, "--k", "0"], "--k must be >= 1"),
        ([*compare, "--min-confidence", "nan"], "--min-confidence"),
        ([*compare, "--set", "hog.hog.nbins=0"], "nbins must be between 1 and 180"),  # was a segmentation fault
        ([*compare, "--set", "hog.hog.cell=0"], "cell must be between 1 and size"),  # was a ZeroDivisionError
        ([*compare, "--set", "hog.hog.power=inf"], "'inf' is not a finite number"),  # was all-zero vectors, exit 0
        ([*compare, "--nonlandmark-weight", "inf"], "--nonlandmark-weight: 'inf' is not a finite number"),
        (["extract", "--manifest", str(tiny_synth / "train.csv"), "--out", str(tiny_synth / "train.csv")],
         "is a file"),
        ([*extract, "--runner=Bogus"], "use --runner=DirectRunner"),
        ([*extract, "--method", "sift-bovw"], "is not an extractor"),
        ([*extract, "--method", "cnn"], "cnn needs a model"),
        ([*extract, "--num-shards", "-1"], "--num-shards"),
        ([*extract, "--threads-per-worker", "100000000000"], "between 0 (automatic) and 1024"),
        (["demo", "--out", str(tmp_path / "d"), "--classes", "0"], "--classes"),
        (["synth", str(tmp_path / "s"), "--width", "100000"], "--width"),
        ([*compare, "--methods", "cnn+det"], "need a detector: --boxes FILE"),
        ([*compare, "--boxes", str(tmp_path / "nope.csv")], "--boxes"),
        ([*extract, "--method", "cnn", "--param", f"model={tiny_synth / 'x.keras'}"], "CNN model not found"),
        ([*extract, "--detect", "max_boxes=2"], "needs --detector"),
        (["train", "--method", "detector", "--manifest", str(tiny_synth / "train.csv"), "--out", str(tmp_path / "m")],
         "needs --boxes"),
        (["train", "--method", "detector", "--manifest", str(tiny_synth / "train.csv"), "--boxes",
          str(tiny_synth / "train.csv"), "--out", str(tmp_path / "m")], "needs id (or image_path) and xmin"),
        (["synth", str(tiny_synth / "train.csv")], "is a file"),
        ([*extract, "--max-pixels", "0"], "--max-pixels must be >= 1"),
        (["extract", "--manifest", str(tiny_synth / "train.csv"), "--out", str(tiny_synth / "train.csv" / "sub")],
         "check the path, its permissions"),
        ([*extract, "--runner=DataflowRunner"], "--runner=DataflowRunner needs more options"),
    ]
    for args, message in cases:
        result = _cairn(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert len([line for line in result.stderr.splitlines() if line.startswith("cairn")]) == 1


def test_argparse_errors_exit_2_with_usage(tiny_synth, tmp_path):
    result = _cairn("extract", "--manifest")
    assert result.returncode == 2 and "usage: cairn extract" in result.stderr
    result = _cairn("extract", "--manifest", str(tiny_synth / "train.csv"), "--out", str(tmp_path), "--max_side=64")
    assert result.returncode == 2 and "did you mean --max-side" in result.stderr


def test_index_factory_that_cannot_fit_the_data_is_a_user_error(tiny_synth, tmp_path):
    assert _cairn("extract", "--manifest", str(tiny_synth / "train.csv"), "--out", str(tmp_path / "f")).returncode == 0
    result = _cairn("index", "--features", str(tmp_path / "f"), "--out", str(tmp_path / "i"), "--factory", "IVF4096,Flat")
    assert result.returncode == 2 and "IVF index with 4096 lists needs at least that many training vectors, " \
        "there are 20; use a smaller IVF or Flat" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_synth_then_demo_end_to_end(small_demo):
    stdout = (small_demo / "stdout.txt").read_text()
    assert "metrics:" in stdout and "hog" in stdout and "cnn-untrained" in stdout and "report.html" in stdout
    run = small_demo / "run"
    for name in ("metrics.json", "report.html", "per_class.csv", "predictions/cnn.csv", "predictions/cnn+delf.csv",
                 "predictions/delf+sv.csv", "work/delf/model/model.keras", "work/delf/model/pca.npz",
                 "predictions/cnn+det.csv", "work/detector/model.keras"):
        assert (run / name).is_file(), name
    import json

    metrics = json.loads((run / "metrics.json").read_text())
    detection = metrics["methods"]["cnn+det"]["detection"]
    assert 0 <= detection["ap_50"] <= 1 and detection["annotated_images"] > 0 and detection["regions_per_image"] >= 1

    # every trainer writes TensorBoard logs, on one axis for all its stages (DELF: 1 epoch each here)
    from tests.conftest import tensorboard_scalars

    assert sorted(tensorboard_scalars(run / "work" / "delf" / "model" / "logs")["train"]["epoch_loss"]) == [0, 1]
    assert tensorboard_scalars(run / "work" / "detector" / "logs")["train"]["epoch_loss"]
    delf = json.loads((side(run / "work" / "delf" / "local" / "train") / "extract.json").read_text())
    assert delf["counts"]["inputs"] == delf["counts"]["outputs"] + delf["counts"]["dead_letters"]
    assert delf["dim"] == 40 and delf["kind"] == "local"  # PCA-projected DELF descriptors
    again = _cairn("demo", "--out", str(small_demo), "--bad-inputs", *SMALL_DEMO,
                   *(["--pretrained", str(PRETRAINED)] if PRETRAINED.is_file() else []))
    assert again.returncode == 0 and "reusing" in again.stderr


def test_known_harmless_worker_warnings_stay_off_the_terminal(capsys):
    """Beam forwards every worker's warnings to the launching process through a logger below the root one; a
    filter on the root logger never saw them (it only filters records logged there), a handler filter does."""
    import logging

    from jobs.logs import setup_logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    setup_logging()
    try:
        worker = logging.getLogger("apache_beam.runners.portability.local_job_service")
        for message in ("Resource module is not available for current platform, memory usage cannot be fetched.",
                        "No semi_persistent_directory found:  User registered objects ..."):
            worker.warning('Worker: severity: WARN timestamp { seconds: 1 } message: "%s"', message)
        worker.warning("Worker: severity: WARN message: \"something that matters\"")
        err = capsys.readouterr().err
    finally:  # pytest's own logging again
        root.handlers[:] = handlers
        root.setLevel(level)
    assert "something that matters" in err
    assert "Resource module" not in err and "semi_persistent_directory" not in err
