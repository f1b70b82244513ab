"""The layers' import contracts (pyproject.toml, checked by `make lint`) cover every module of the project."""

import ast
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


PACKAGES = ("jobs", "pipeline", "index", "models", "reports", "features")
HEAVY = ("tensorflow", "keras")  # what a lazy import may keep out of a command's start-up


def _modules() -> dict[str, ast.Module]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = ast.parse(path.read_text())
    return found


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]


def test_project_imports_inside_functions_only_keep_tensorflow_out_of_start_up():
    """A project module imported inside a function must load Keras or TensorFlow when imported (directly or
    through the modules it imports at its top); any other import belongs at the top of the module."""
    modules = _modules()

    def own(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    top = {m: [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))] for m, tree in modules.items()}
    heavy: dict[str, bool] = {}

    def is_heavy(m: str) -> bool:
        if m not in heavy:
            heavy[m] = False  # an import circle would stop here (there is none: see `make lint`)
            names = [x for n in top[m] for x in _imported(n)]
            heavy[m] = any(x.split(".")[0] in HEAVY for x in names) or \
                any(own(x) not in (None, m) and is_heavy(own(x)) for x in names)
        return heavy[m]

    lazy = []
    for m, tree in modules.items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        lazy += [(m, node.lineno, own(x)) for x in _imported(node) if own(x)]
    light = sorted({(m, line, target) for m, line, target in lazy if not is_heavy(target)})
    assert not light, f"imports to move to the top of their module: {light}"
    assert lazy, "the check found no lazy import at all: it no longer sees them"
