"""The package's layers: imports go downward only, and the public names stay."""

import ast
import importlib
import pathlib

import pytest

import kprune

ROOT = pathlib.Path(kprune.__file__).parent

# Bottom to top. A module may import from its own layer and from those below.
LAYERS = ["errors", "layers", "models", "graph", "surgeon", "profile", "latency", "select",
          "pruning", "search", "train", "methods", "tools"]
FACADE = {"kprune/__init__.py", "kprune/__main__.py"}


def layer_of(module: str) -> str:
    """The layer of a dotted module name inside kprune (`kprune.graph.walk` -> `graph`)."""
    parts = module.split(".")
    assert parts[0] == "kprune" and len(parts) > 1, module
    return parts[1]


def imports_of(path: pathlib.Path):
    """(line, imported kprune module) for every import in `path`, lazy ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kprune."):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "kprune":
                for alias in node.names:
                    yield node.lineno, f"kprune.{alias.name}"
            elif node.module.startswith("kprune."):
                yield node.lineno, node.module


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).as_posix()
        if rel not in FACADE:
            yield rel, path


def test_every_module_has_a_layer():
    for rel, _ in modules():
        name = rel[:-3].replace("/", ".")
        assert layer_of(name) in LAYERS, f"{rel} is in no layer; add its folder to LAYERS"


def test_imports_go_downward_only():
    upward = []
    for rel, path in modules():
        own = LAYERS.index(layer_of(rel[:-3].replace("/", ".")))
        for line, target in imports_of(path):
            if LAYERS.index(layer_of(target)) > own:
                upward.append(f"{rel}:{line} imports {target}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from kprune.methods.resrep import attach\n")
    assert [t for _, t in imports_of(bad)] == ["kprune.methods.resrep"]
    assert LAYERS.index(layer_of("kprune.methods.resrep")) > LAYERS.index("graph")


@pytest.mark.parametrize("name", ["prune", "profile", "latency", "export", "resrep", "slimming",
                                  "condense", "sfp", "repr", "agp", "criteria", "pruners",
                                  "masking", "rules", "regularizers", "datasets", "surgeon",
                                  "layers", "models", "Trainer", "DependencyGraph", "KprunError",
                                  "search", "lowrank", "plot"])
def test_public_names_stay(name):
    assert hasattr(kprune, name)


@pytest.mark.parametrize("old, new", [("kprune.criteria", "kprune.select.criteria"),
                                      ("kprune.pruners", "kprune.select.pruners"),
                                      ("kprune.rules", "kprune.train.rules"),
                                      ("kprune.masking", "kprune.train.masking"),
                                      ("kprune.resrep", "kprune.methods.resrep"),
                                      ("kprune.slimming", "kprune.methods.slimming"),
                                      ("kprune.regularizers", "kprune.layers.regularizers"),
                                      ("kprune.export", "kprune.tools.export"),
                                      ("kprune.cli", "kprune.tools.cli")])
def test_old_module_paths_import(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)
