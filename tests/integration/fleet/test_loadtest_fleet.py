"""The load test in CI, at small scale, against the session fleet: 32 concurrent gRPC
streams for DSPARK_LOADTEST_S seconds (default 60) of short requests (8 new tokens, so
the 2-core CI machine completes many of them), zero errors, zero leaked KV slots (the
router's /debug/kv before and after). Set DSPARK_LOADTEST_REPORT=FILE to keep the JSON
report (docs/reliability.md quotes one)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from dspark.commands.loadtest import LoadConfig, format_table, run_loadtest

pytestmark = pytest.mark.integration
STREAMS = 32
MAX_NEW = 8
PROMPT = "Once upon a time, a lighthouse keeper"  # raw text the instruct model continues (no early EOS)


def test_loadtest_32_streams(fleet: Any) -> None:
    cfg = LoadConfig(host="127.0.0.1", port=fleet.ports["grpc"], streams=STREAMS,
                     duration_s=float(os.environ.get("DSPARK_LOADTEST_S", "60")), max_requests=100_000,
                     prompt=PROMPT, max_new_tokens=MAX_NEW, timeout_s=900,
                     leak_check_url=f"http://127.0.0.1:{fleet.ports['http']}/debug/kv")
    report = asyncio.run(run_loadtest(cfg))
    print("\n" + format_table(report))
    if path := os.environ.get("DSPARK_LOADTEST_REPORT"):
        Path(path).write_text(json.dumps(report, indent=2))
    assert report["errors"] == {}, report
    assert report["kv"]["leaked_slots"] == 0 and report["kv"]["used_slots_after"] == 0, report["kv"]
    assert report["requests"] >= STREAMS and report["tokens"] == report["requests"] * MAX_NEW, report
