"""The method registry (pipeline/run/methods.py): a method is one record, and a new one is one register() call."""

import json

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline import fs
from pipeline.errors import CairnError
from pipeline.run import methods, recipes
from pipeline.run.compare import compare
from pipeline.run.settings import MethodsConfig
from pipeline.submission import read_submission
from tests.conftest import side


def _tiny_hog(config: MethodsConfig, ctx: recipes.RunContext) -> dict:
    """A method of the test's own: HoG of 32-pixel thumbnails, indexed raw, built from the public recipe parts."""
    folder = fs.join("tiny-hog", "hog")
    extracted = recipes.extract_both(ctx, "hog", {"size": 32, "cell": 8}, folder)
    return recipes.build_global(ctx, fs.join(ctx.work, "tiny-hog"), fs.join(ctx.work, folder), extracted, None,
                                {"train_seconds": 0.0})


TOY = methods.Method("tiny-hog", "baseline", "HoG of 32-pixel thumbnails (a test's own method)", _tiny_hog,
                     sections=("hog",), trainer="hog", index_of="")


@pytest.fixture
def toy(monkeypatch):
    """The toy method registered for one test (the registry is a dict: monkeypatch takes it out again)."""
    monkeypatch.setitem(methods.METHODS, TOY.name, TOY)
    return TOY


def test_a_method_registered_through_the_registry_runs_through_cairn_compare(toy, tiny_synth, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["compare", "--train", str(tiny_synth / "train.csv"), "--queries", str(tiny_synth / "queries.csv"),
                 "--out", str(out), "--methods", "tiny-hog", "hog", "--workers", "1", "--gradcam", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "tiny-hog" in printed  # the summary table and the records
    metrics = json.loads((out / "metrics.json").read_text())
    entry = metrics["methods"]["tiny-hog"]
    assert entry["family"] == "baseline" and entry["summary"] == TOY.summary
    assert set(entry["config"]["params"]) == {"hog"}  # its config sections, from its record
    assert entry["cost"]["dim"] == 9 * 3 * 3 * 4  # 32 px / 8 px cells: 3 x 3 blocks of 2 x 2 cells, 9 bins
    queries = [line.split(",")[0] for line in (tiny_synth / "queries.csv").read_text().splitlines()[1:]]
    assert sorted(read_submission(str(out / "predictions" / "tiny-hog.csv"))) == sorted(queries)
    assert pq.read_table(out / "neighbours" / "tiny-hog.parquet").num_rows > 0
    accounting = json.loads((out / "accounting.json").read_text())
    assert accounting["tiny-hog"]["index"].endswith("work/tiny-hog/index")
    assert "tiny-hog" in (out / "report.html").read_text()
    # its own features, not hog's: the same extractor at another size is another folder
    assert (side(out / "work" / "tiny-hog" / "hog" / "train") / "extract.json").exists()
    # the run says what its methods are: a report drawn again without the toy registered still knows it
    del methods.METHODS["tiny-hog"]
    assert main(["report", str(out), "--gradcam", "0"]) == 0
    again = json.loads((out / "metrics.json").read_text())["methods"]["tiny-hog"]
    assert again["summary"] == TOY.summary and again["config"]["params"] == entry["config"]["params"]


def test_the_registry_is_what_the_cli_lists_checks_and_trains(toy):
    assert "tiny-hog" in methods.describe() and "tiny-hog" in methods.available()
    assert methods.check(["tiny-hog", "hog", "tiny-hog"]) == ["tiny-hog", "hog"]
    assert methods.index_owner("tiny-hog") == "tiny-hog" and methods.index_owner("hog-linear") == "hog"
    assert methods.trains_on("tiny-hog") == "features" and methods.trains_on("cnn") == "images"
    assert methods.trainable()[-1] == "tiny-hog"  # after the trainers of the built-in methods
    with pytest.raises(CairnError, match="unknown method 'magic'; known methods: .*tiny-hog"):
        methods.check(["magic"])
    assert methods.descriptions()["tiny-hog"] == {"family": "baseline", "summary": TOY.summary,
                                                  "sections": ["hog"], "classifier": False,
                                                  "keras_embedding": "", "variant_of": ""}


def test_every_built_in_method_says_what_it_needs():
    m = methods.METHODS
    assert [n for n in m if m[n].needs_model] == ["cnn-pretrained", "cnn-pretrained+det"]
    assert [n for n in m if m[n].needs_boxes] == ["cnn+det", "cnn-pretrained+det"]
    assert methods.defaults(False) == [n for n in m if n not in ("cnn-pretrained", "cnn-pretrained+det", "cnn+det")]
    assert {n: m[n].index_of for n in m if m[n].index_of} == {
        "sift-bovw+sv": "sift-bovw", "hog-linear": "hog", "sift-vlad-linear": "sift-vlad", "cnn+delf": "cnn"}
    assert [n for n in m if m[n].classifier] == ["hog-linear", "sift-vlad-linear"]
    assert [n for n in m if m[n].rerank] == ["sift-bovw+sv", "cnn+delf", "delf+sv"]
    config = MethodsConfig()
    assert m["sift-bovw+sv"].rerank_config(config) == config.sv
    assert m["cnn+delf"].rerank_config(config) == config.delf.sv and m["hog"].rerank_config(config) is None
    for method in m.values():
        method.check_sections(config)  # every section it names exists


def test_a_record_names_a_family_a_trainer_and_config_sections_that_exist(monkeypatch, tiny_synth, tmp_path):
    with pytest.raises(ValueError, match="family must be one of"):
        methods.Method("x", "classic", "x", _tiny_hog)
    with pytest.raises(ValueError, match="no trainer 'hogg'"):
        methods.Method("x", "baseline", "x", _tiny_hog, trainer="hogg")
    typo = methods.Method("typo", "baseline", "x", _tiny_hog, sections=("hogg",))
    monkeypatch.setitem(methods.METHODS, typo.name, typo)
    with pytest.raises(CairnError, match="names config sections \\['hogg'\\]"):  # before any work
        compare(str(tiny_synth / "train.csv"), str(tiny_synth / "queries.csv"), str(tmp_path / "o"), ["typo"])
    assert not (tmp_path / "o").exists()


def test_a_recipe_may_be_named_as_module_and_function():
    assert methods.resolve("pipeline.run.recipes:hog") is recipes.hog
    assert methods.resolve(_tiny_hog) is _tiny_hog
