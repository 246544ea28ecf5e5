#!/usr/bin/env python3
"""Mutation run: do the tests catch the bugs they are meant to catch?

Each mutant is one small deliberate bug in the real code (an exact text edit of one file).
The script copies the working tree to a scratch directory once (the checkout itself is
never edited), runs the relevant tests there unmutated (they must pass), then applies each
mutant in turn, runs its tests with -x, and reports the first failing test (the mutant is
"killed") or that every test passed (it "SURVIVED": the suite cannot see that bug). An edit
whose text is no longer in the file is reported as "stale" so the list keeps up with the
code. Not part of `make test`; see docs/testing.md for the latest result.

    .venv/bin/python scripts/mutation.py                 # all mutants, table on stdout
    .venv/bin/python scripts/mutation.py --only resume,gate   # mutants whose name contains "resume" or "gate"
    .venv/bin/python scripts/mutation.py --list

Exit status 1 when a mutant survived or a baseline failed. Runs with OMP_NUM_THREADS=1 and
takes a few minutes on 2 cores (the resume tests need redis-server: `make system-deps`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache",
                                "*.egg-info", "out", "runs", "tools", "node_modules", ".whl", ".gl")
TIMEOUT_S = 900

VERIFY = ["tests/unit/spec/test_verify.py"]
ENGINE = ["tests/unit/engine/test_engine.py", "tests/unit/spec/test_draft_model.py"]
DRAFT_MODEL = ["tests/unit/spec/test_draft_model.py"]
SCHEDULER = ["tests/unit/spec/test_scheduler.py", "tests/unit/engine/test_policies.py"]
GATE = ["tests/unit/spec/test_gate.py", "tests/unit/engine/test_policies.py"]
CALIBRATE = ["tests/unit/train/test_calibrate.py"]
RESUME = ["tests/integration/test_resume_from_log.py"]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: list[str]


MUTANTS = [
    Mutant("verify: acceptance off by one (the first rejected draft is kept)", "dspark/spec/verify.py",
           "num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)",
           "num_accepted = (accepted.long().cumprod(dim=-1).sum(dim=-1) + 1).clamp(max=num_drafts)", VERIFY),
    Mutant("verify: residual q - p instead of p - q", "dspark/spec/verify.py",
           "(p_t_n - q_n).clamp_min(0.0)", "(q_n - p_t_n).clamp_min(0.0)", VERIFY),
    Mutant("verify: acceptance ratio q/p instead of p/q", "dspark/spec/verify.py",
           "p_t_x / p_d_x.clamp_min(", "p_d_x / p_t_x.clamp_min(", VERIFY),
    Mutant("engine: KV rollback keeps one token too many", "dspark/engine/engine.py",
           "self.cache.rollback(seq.slot, self.cache.lengths[seq.slot] - n + res.num_accepted)",
           "self.cache.rollback(seq.slot, min(self.cache.lengths[seq.slot], "
           "self.cache.lengths[seq.slot] - n + res.num_accepted + 1))", ENGINE),
    Mutant("engine: KV rollback drops one token too many", "dspark/engine/engine.py",
           "self.cache.rollback(seq.slot, self.cache.lengths[seq.slot] - n + res.num_accepted)",
           "self.cache.rollback(seq.slot, self.cache.lengths[seq.slot] - n + res.num_accepted - 1)", ENGINE),
    Mutant("draft model: KV rollback keeps one token too many", "dspark/spec/draft_model.py",
           "self.cache.rollback(state.slot, keep)",
           "self.cache.rollback(state.slot, min(keep + 1, self.cache.lengths[state.slot]))", DRAFT_MODEL),
    Mutant("draft model: KV rollback drops one token too many", "dspark/spec/draft_model.py",
           "self.cache.rollback(state.slot, keep)", "self.cache.rollback(state.slot, max(keep - 1, 0))", DRAFT_MODEL),
    Mutant("scheduler: confidence policy looks ahead (c_{k+1} decides x_k)", "dspark/spec/scheduler.py",
           "survival = survival_products([confidences[r] for r in scored])",
           "survival = survival_products([torch.cat([confidences[r][1:], confidences[r][-1:]]) for r in scored])",
           SCHEDULER),
    Mutant("scheduler: threshold policy looks ahead (c_{k+1} decides x_k)", "dspark/spec/scheduler.py",
           "schedule_threshold([c[: max_lengths[r]]], threshold)",
           "schedule_threshold([torch.cat([c[1:], c[-1:]])[: max_lengths[r]]], threshold)", SCHEDULER),
    # Not listed: `continue` instead of the `break` after a non-improving admission is an
    # equivalent mutant. Candidates come in descending survival and a refusal leaves B and the
    # expected tokens unchanged, so no later (smaller) candidate can improve Theta either.
    Mutant("scheduler: takes admissions that do not improve Theta", "dspark/spec/scheduler.py",
           "if not new_theta > theta:", "if new_theta < theta:", SCHEDULER),
    Mutant("gate: never probes the drafter again once it backs off", "dspark/spec/gate.py",
           "self.skip_left = self.backoff", "self.skip_left = 10**9", GATE),
    Mutant("gate: never drafts", "dspark/spec/gate.py",
           "        self.drafted_rounds += 1\n        return True",
           "        self.skipped_rounds += 1\n        return False", GATE),
    Mutant("gate: never drafts (engine-level policy test alone)", "dspark/spec/gate.py",
           "        self.drafted_rounds += 1\n        return True",
           "        self.skipped_rounds += 1\n        return False", ["tests/unit/engine/test_policies.py"]),
    Mutant("calibrate: ECE unweighted (mean over bins)", "dspark/train/calibrate.py",
           'return float(gap.sum() / pred.numel()) if total.sum() else float("nan")',
           'return float((gap / total.clamp_min(1))[total > 0].mean()) if total.sum() else float("nan")', CALIBRATE),
    Mutant("calibrate: ECE unbinned (mean absolute error per round)", "dspark/train/calibrate.py",
           'return float(gap.sum() / pred.numel()) if total.sum() else float("nan")',
           'return float((pred - obs.float()).abs().mean())', CALIBRATE),
    Mutant("resume: replay starts one token past the offset", "services/router/resume.py",
           "tokens = await redis(self.state.read_tokens, request_id, offset)",
           "tokens = await redis(self.state.read_tokens, request_id, offset + 1)", RESUME),
    Mutant("resume: takeover replays from one token past the offset", "services/router/resume.py",
           "StepEvent(request_id, offset, committed[offset:]", "StepEvent(request_id, offset, committed[offset + 1:]",
           RESUME),
    Mutant("router: a complete log is not recognised after a takeover", "services/router/loop.py",
           "reason = self._finished_by_log(req)", "reason = None", RESUME),
]


def copy_tree(dest: Path) -> Path:
    work = dest / "repo"
    shutil.copytree(REPO, work, ignore=IGNORE, symlinks=True)
    return work


def run_tests(work: Path, tests: list[str], stop_first: bool) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=--import-mode=importlib",
           "-rf", *(["-x"] if stop_first else []), *tests]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(work)}
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return 124, "timeout", time.perf_counter() - t0
    return out.returncode, out.stdout + out.stderr, time.perf_counter() - t0


def first_failure(output: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return m.group(1).split("/")[-1] if m else output.strip().splitlines()[-1][:120] if output.strip() else "?"


def check_isolation(work: Path) -> None:
    """The copy's packages must be the ones imported (not the editable install's)."""
    code = "import dspark, services; print(dspark.__file__); print(services.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env={**os.environ, "PYTHONPATH": str(work)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).resolve().is_relative_to(work.resolve()) for p in out), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated texts: run the mutants whose name contains one")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the unmutated runs (only right after they passed on the same tree)")
    args = ap.parse_args()
    wanted = [w for w in args.only.split(",") if w] or [""]
    mutants = [m for m in MUTANTS if any(w in m.name for w in wanted)]
    if args.list:
        for m in mutants:
            print(f"{m.name}  [{m.path}]  tests: {' '.join(m.tests)}")
        return 0
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="dspark-mutation-") as tmp:
        work = copy_tree(Path(tmp))
        check_isolation(work)
        for tests in [] if args.no_baseline else sorted({tuple(m.tests) for m in mutants}):
            rc, out, secs = run_tests(work, list(tests), stop_first=False)
            print(f"baseline {' '.join(tests)}: {'pass' if rc == 0 else 'FAIL'} ({secs:.0f} s)", flush=True)
            if rc != 0:
                print(out[-3000:], file=sys.stderr)
                return 1
        for m in mutants:
            path = work / m.path
            original = path.read_text()
            if original.count(m.old) != 1:
                rows.append((m, "stale (edit no longer applies)", 0.0))
                failed = True
                continue
            path.write_text(original.replace(m.old, m.new))
            try:
                rc, out, secs = run_tests(work, m.tests, stop_first=True)
            finally:
                path.write_text(original)
            if rc == 0:
                result = "SURVIVED"
                failed = True
            elif rc in (1, 2):  # tests failed (or errored at collection)
                result = f"killed by {first_failure(out)}"
            else:
                result = f"killed (pytest exit {rc}: {first_failure(out)})"
            rows.append((m, result, secs))
            print(f"{m.name}: {result} ({secs:.0f} s)", flush=True)
    print("\n| mutant | file | tests | result | s |\n|---|---|---|---|---|")
    for m, result, secs in rows:
        tests = ", ".join(Path(t).name for t in m.tests)
        print(f"| {m.name} | `{m.path}` | {tests} | {result} | {secs:.0f} |")
    survived = sum(r == "SURVIVED" for _, r, _ in rows)
    print(f"\n{len(rows) - survived} of {len(rows)} mutants killed, {survived} survived.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
