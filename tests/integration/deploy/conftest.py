"""Fixtures for the deployment-artifact tests: tool binaries and the rendered chart."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "helm/dspark"
SCHEMAS = Path(__file__).resolve().parent / "schemas"


@pytest.fixture(scope="session")
def helm() -> Path:
    """The real helm binary installed by `make system-deps` (scripts/install-helm.sh tools)."""
    path = REPO / "tools/helm"
    if not path.is_file():
        pytest.skip("tools/helm absent: run `make system-deps` (scripts/install-helm.sh tools)")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool absent: run `make system-deps` (Debian package prometheus)")
    return path


def run(args: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture(scope="session")
def render_chart(helm: Path) -> Callable[..., list[dict[str, Any]]]:
    """render_chart("--set", "k=v", ...) -> the manifests of `helm template`, as dicts."""

    def render(*args: str) -> list[dict[str, Any]]:
        result = run([helm, "template", "rel", CHART, "--namespace", "llm", *args])
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return render
