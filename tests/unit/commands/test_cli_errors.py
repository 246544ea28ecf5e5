"""Bad input gets one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dspark.cli import main


def dspark(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dspark.cli", *args], capture_output=True, text=True,
                          timeout=300)


def run_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args, needle", [
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["--prompt", "hi", "--top-p", "0"], "top-p"),
    (["--prompt", "hi", "--top-p", "1.5"], "top-p"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
    (["--prompt", "hi", "--model", "no-such-model"], "no-such-model"),
    (["--prompt", "hi", "--temperature", "abc"], "temperature"),
    (["--prompt", "hi " * 200, "--max-seq-len", "64", "--method", "ar"], "context"),
    (["--prompt", "hi", "--method", "nope"], "nope"),
])
def test_generate_rejects_bad_input(capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    code, out, err = run_in_process(capsys, "generate", *args)
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("dspark: convert")]
    assert len(lines) == 1 and needle in lines[0], err
    assert out == ""


def test_error_is_one_line_from_a_real_process() -> None:
    r = dspark("generate", "--prompt", "hi", "--top-p", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "top-p" in r.stderr


def test_one_shot_generate_runs_eager_and_benchmarks_compile() -> None:
    import argparse

    from dspark.commands import bench, generate

    defaults = {}
    for name, module in (("generate", generate), ("bench", bench)):
        p = argparse.ArgumentParser()
        module.add_arguments(p)
        defaults[name] = p.get_default("compile")
    assert defaults == {"generate": False, "bench": True}
