"""Imports point down: stream/ (event contract, state table, statistics, Kafka and file adapters) <- models/
(features, the model, the update step, training, evaluation) <- consumers/ (the daemon, replay, CLI, bench,
demo and the runners). A module may import its own package and the ones below it, never one above: the
core can be read, tested and reused without the applications."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("stream", "models", "consumers")  # lowest first


def project_imports(path: Path) -> set[str]:
    """Every project package a module imports, at the top or inside a function (a lazy import still
    couples the layers)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in LAYERS)
    return found


MODULES = sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_module_imports_only_its_own_layer_and_those_below(path: Path):
    own = LAYERS.index(path.relative_to(ROOT).parts[0])
    upward = sorted(p for p in project_imports(path) if LAYERS.index(p) > own)
    assert not upward, f"{path.relative_to(ROOT)} imports {', '.join(upward)}, a layer above it"


def test_the_check_sees_a_lazy_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from consumers.daemon import ProfileDaemon\n")
    assert project_imports(module) == {"consumers"}
