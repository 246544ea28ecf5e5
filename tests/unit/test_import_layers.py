"""The import layers of docs ARCHITECTURE.md, as `make lint` checks them.

`lint-imports` reads the contracts in pyproject.toml ([tool.importlinter]). These tests run it
on a copy of the sources with one deliberate violation each, so a contract that silently
stopped biting (a typo in a layer name, a package left out) fails here. The last test covers
what import-linter cannot see: a lower floor naming a higher one by string (an
`importlib.import_module("dspark.drafter...")`); registries are filled from above instead.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
# Floors from the bottom up (pyproject.toml's layers contract, ARCHITECTURE.md "Suggested layout").
FLOORS = ["kv", "models", "spec", "drafter", "engine"]
ABOVE_ENGINE = ["train", "bench", "commands", "cli"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the Python sources and pyproject.toml that `lint-imports` can check."""
    for pkg in ("dspark", "services"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg,
                        ignore=lambda d, names: [n for n in names if not (n.endswith(".py") or (Path(d) / n).is_dir())
                                                 or n == "__pycache__"])
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "NO_COLOR": "1"}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300)


def add_import(tree: Path, module: str, line: str) -> None:
    path = tree / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n{line}  # deliberate violation\n")


def test_sources_keep_both_contracts(tree: Path) -> None:
    out = lint(tree)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(("module", "line", "expected"), [
    ("dspark.kv.cache", "import dspark.engine.engine", "dspark.kv.cache -> dspark.engine.engine"),
    ("dspark.spec.proposer", "import dspark.drafter.proposer", "dspark.spec.proposer -> dspark.drafter.proposer"),
    ("services.workers.base", "import dspark.commands.common", "services.workers.base -> dspark.commands.common"),
])
def test_an_upward_import_breaks_the_layers(tree: Path, module: str, line: str, expected: str) -> None:
    add_import(tree, module, line)
    out = lint(tree)
    assert out.returncode != 0
    assert "BROKEN" in out.stdout and expected in out.stdout, out.stdout


def test_a_cycle_between_siblings_breaks_the_acyclic_contract(tree: Path) -> None:
    # transport -> handshake already; handshake -> transport closes the loop (the old kv cycle's shape)
    add_import(tree, "dspark.kv.handshake", "import dspark.kv.transport")
    out = lint(tree)
    assert out.returncode != 0
    assert "No cycles are allowed in dspark.kv" in out.stdout, out.stdout


def _named_modules(path: Path) -> set[str]:
    """Every string constant in `path`'s code (docstrings may describe who calls it) that
    looks like a dotted dspark/services module name."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            names.update(re.findall(r"\b((?:dspark|services)(?:\.\w+)+)", node.value))
    return names


def test_no_floor_names_a_higher_one_by_string() -> None:
    bad = []
    for i, floor in enumerate(FLOORS):
        higher = FLOORS[i + 1:] + ABOVE_ENGINE
        for path in sorted((ROOT / "dspark" / floor).rglob("*.py")):
            for name in _named_modules(path):
                parts = name.split(".")
                if parts[0] == "services" or parts[1] in higher:
                    bad.append(f"{path.relative_to(ROOT)} names {name}")
    assert not bad, "\n".join(bad)
