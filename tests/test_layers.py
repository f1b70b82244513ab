"""The layers' import contracts (pyproject.toml, checked by `make lint`) cover every module of the project."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _contracts() -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def test_every_data_contract_module_is_in_the_bottom_layer():
    """A module added directly under pipeline/ is a data contract: it must be listed in the bottom layer, or the
    layers contract would not see what it imports."""
    bottom = {m.strip() for m in _contracts()["layers"]["layers"][-1].split(":")}
    found = {f"pipeline.{p.stem}" for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__"}
    assert found == bottom


def test_every_command_module_is_independent_of_the_others():
    shared = {"__init__", "cli", "common", "logs"}  # the CLI helpers every command may import
    commands = {f"jobs.{p.stem}" for p in (ROOT / "jobs").glob("*.py") if p.stem not in shared}
    assert commands == set(_contracts()["commands-independent"]["modules"])


def test_the_layers_are_every_package_of_the_project():
    layers = _contracts()["layers"]["layers"]
    named = {part.strip() for layer in layers[:-1] for part in layer.replace(":", "|").split("|")}
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() and p.name not in ("tests", "bench")}
    subpackages = {f"pipeline.{p.name}" for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").exists()}
    assert named == (packages - {"pipeline"}) | subpackages
