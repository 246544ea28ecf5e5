"""scripts/system-deps.sh against a fake PATH: only missing tools are installed, one package
per apt-get call, and a failing package is named with a by-hand fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

SCRIPT = REPO / "scripts/system-deps.sh"
BASH = "/bin/bash"
# A fake apt-get: logs its arguments; `install PKG` drops stub commands for PKG on PATH,
# except for packages listed in $FAKE_APT_BROKEN, which fail like a held-back package.
FAKE_APT = f"""#!{sys.executable}
import os, sys
from pathlib import Path
bin_dir = Path(sys.argv[0]).parent
with open(os.environ["FAKE_APT_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
provides = {{"redis-server": ["redis-server"], "prometheus": ["prometheus", "promtool"], "npm": ["npm"]}}
if sys.argv[1] == "install":
    pkg = sys.argv[-1]
    if pkg in os.environ.get("FAKE_APT_BROKEN", "").split():
        print("E: Unable to correct problems, you have held broken packages.")
        sys.exit(100)
    for cmd in provides[pkg]:
        (bin_dir / cmd).write_text("#!/bin/sh\\n")
        (bin_dir / cmd).chmod(0o755)
"""


def fake_bin(tmp_path: Path, *commands: str) -> Path:
    """A PATH folder holding only `commands` (stubs) and the fake apt-get and sudo."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in commands:
        (bin_dir / name).write_text("#!/bin/sh\n")
    (bin_dir / "apt-get").write_text(FAKE_APT)
    (bin_dir / "sudo").write_text('#!/bin/bash\nexec "$@"\n')
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    return bin_dir


def run_script(bin_dir: Path, tmp_path: Path, *args: str, broken: str = "") -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(bin_dir), "FAKE_APT_LOG": str(tmp_path / "apt.log"), "FAKE_APT_BROKEN": broken,
           "TMPDIR": str(tmp_path), "HOME": str(tmp_path)}
    return subprocess.run([BASH, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=60)


def apt_calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "apt.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture(autouse=True)
def _bash() -> None:
    if not os.access(BASH, os.X_OK):
        pytest.skip("needs /bin/bash")


def test_dry_run_plans_only_missing_tools(tmp_path: Path) -> None:
    """npm from another source (nodesource, say) is kept; Redis and Prometheus are planned."""
    bin_dir = fake_bin(tmp_path, "npm")
    result = run_script(bin_dir, tmp_path, "--dry-run")
    assert result.returncode == 0, result.stderr
    plan = result.stdout.splitlines()
    assert plan == [
        "install redis-server (for redis-server)",
        "install prometheus (for prometheus promtool)",
        f"keep npm ({bin_dir / 'npm'})",
    ]
    assert apt_calls(tmp_path) == []


def test_installs_each_missing_package_on_its_own(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, "npm", "promtool")  # prometheus half there: the package is installed
    result = run_script(bin_dir, tmp_path)
    assert result.returncode == 0, result.stderr
    installs = [call for call in apt_calls(tmp_path) if call.startswith("install")]
    assert installs == ["install -y -qq --no-install-recommends redis-server",
                        "install -y -qq --no-install-recommends prometheus"]
    assert (bin_dir / "redis-server").exists() and (bin_dir / "prometheus").exists()


def test_one_failing_package_is_named_and_does_not_block_the_others(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path)  # nothing present; Debian's npm conflicts here
    result = run_script(bin_dir, tmp_path, broken="npm")
    assert result.returncode == 1
    assert (bin_dir / "redis-server").exists() and (bin_dir / "promtool").exists()
    assert "could not install npm" in result.stderr
    assert "held broken packages" in result.stderr  # the apt error is shown
    assert "tools/helm" in result.stderr  # and the way around it
    assert "still missing: npm" in result.stderr


def test_nothing_to_do(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, "redis-server", "prometheus", "promtool", "npm")
    result = run_script(bin_dir, tmp_path)
    assert result.returncode == 0, result.stderr
    assert apt_calls(tmp_path) == []
