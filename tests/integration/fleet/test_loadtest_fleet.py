"""The load test in CI, at small scale, against the session fleet: 32 concurrent gRPC
streams for DSPARK_LOADTEST_S seconds (default 60) of short requests (8 new tokens, so
the 2-core CI machine completes many of them), zero errors, zero leaked KV slots (the
router's /debug/kv before and after), and every stream's offsets and tokens exactly the
embedded engine's greedy output (the client's stub is tapped to see them). Set
DSPARK_LOADTEST_REPORT=FILE to keep the JSON report (docs/reliability.md quotes one)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from dspark.commands.loadtest import LoadConfig, format_table, run_loadtest
from dspark.spec.sampling import SamplingParams
from dspark.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
STREAMS = 32
MAX_NEW = 8
PROMPT = "Once upon a time, a lighthouse keeper"  # raw text the instruct model continues (no early EOS)


class TappedStub(pb_grpc.GenerationStub):
    """The load test's own stub, recording every Generate stream it reads."""

    streams: list[dict[str, Any]] = []

    def __init__(self, channel: Any) -> None:
        super().__init__(channel)
        generate = self.Generate

        def tapped(*args: Any, **kwargs: Any) -> Any:
            record: dict[str, Any] = {"offsets": [], "ids": [], "complete": False}
            TappedStub.streams.append(record)

            async def messages() -> Any:
                async for m in generate(*args, **kwargs):
                    assert m.offset == len(record["ids"]), (m.offset, record)  # no gap, no repeat
                    record["offsets"].append(m.offset)
                    record["ids"] += list(m.token_ids)
                    yield m
                record["complete"] = True
            return messages()
        self.Generate = tapped


def test_loadtest_32_streams(fleet: Any, embedded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    target, engine = embedded
    expected = engine.generate([target.tokenizer.encode(PROMPT)], SamplingParams(max_new_tokens=MAX_NEW))[0].token_ids
    assert len(expected) == MAX_NEW
    monkeypatch.setattr(pb_grpc, "GenerationStub", TappedStub)
    monkeypatch.setattr(TappedStub, "streams", [])
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
    # What each stream carried: every request's stream complete, contiguous, and exact.
    streams = TappedStub.streams
    assert len(streams) == report["requests"] == report["ok"]
    for s in streams:
        assert s["complete"] and s["ids"] == expected, s
        assert s["offsets"][0] == 0, s["offsets"]
    assert sum(len(s["ids"]) for s in streams) == report["tokens"]
