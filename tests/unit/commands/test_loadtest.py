"""`dspark loadtest` against the fake fleet (grpc.aio + aiohttp, no model): metrics,
errors by code, leak check, bounds, and the loopback-only rule."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from dspark.cli import main
from dspark.commands.loadtest import is_loopback, parse_target, percentile
from dspark.errors import UserError
from services.security.admission import Admission
from services.security.auth import ApiKeyAuth, add_key
from tests.integration.fuzz.fake_fleet import FakeFleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeFleet, str]]:
    path = tmp_path_factory.mktemp("keys") / "keys"
    key = add_key(path, "load")
    with FakeFleet(Admission(auth=ApiKeyAuth.from_file(path))) as f:
        yield f, key


def loadtest(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    rc = main(["loadtest", "--json", *argv])
    return rc, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("http", [False, True])
def test_reports_latency_throughput_and_no_leaks(fleet: tuple[FakeFleet, str], capsys: pytest.CaptureFixture[str],
                                                  http: bool) -> None:
    f, key = fleet
    port = f.http_port if http else f.grpc_port
    rc, rep = loadtest(capsys, "--target", f"127.0.0.1:{port}", *(["--http"] if http else []),
                       "--streams", "4", "--duration", "20", "--max-requests", "12", "--max-new-tokens", "7",
                       "--api-key", key, "--leak-check-url", f"http://127.0.0.1:{f.http_port}/debug/kv")
    assert rc == 0, rep
    assert rep["requests"] == rep["ok"] == 12 and rep["errors"] == {}
    assert rep["tokens"] == 12 * 7 and rep["throughput_tok_s"] > 0
    assert 0 < rep["ttft_s"]["p50"] <= rep["ttft_s"]["p99"]
    assert 0 < rep["itl_s"]["p50"] <= rep["itl_s"]["p99"]
    assert rep["kv"] == {"used_slots_before": 0, "used_slots_after": 0, "leaked_slots": 0}


def test_errors_by_code_and_exit_status(fleet: tuple[FakeFleet, str], capsys: pytest.CaptureFixture[str]) -> None:
    f, _ = fleet
    rc, rep = loadtest(capsys, "--target", f"127.0.0.1:{f.grpc_port}", "--streams", "2", "--max-requests", "3",
                       "--api-key", "wrong")
    assert rc == 1 and rep["errors"] == {"UNAUTHENTICATED": 3} and rep["ok"] == 0
    rc, rep = loadtest(capsys, "--target", f"127.0.0.1:{f.http_port}", "--http", "--max-requests", "2")
    assert rc == 1 and rep["errors"] == {"401": 2}


def test_detects_leaked_slots(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dspark.commands.loadtest.LEAK_SETTLE_S", 0.2)
    with FakeFleet() as f:
        f.state.leak = True
        rc, rep = loadtest(capsys, "--target", f"localhost:{f.grpc_port}", "--max-requests", "3",
                           "--leak-check-url", f"http://localhost:{f.http_port}/debug/kv")
    assert rc == 1 and rep["errors"] == {} and rep["kv"]["leaked_slots"] == 3


def test_bounded_by_duration(fleet: tuple[FakeFleet, str], capsys: pytest.CaptureFixture[str]) -> None:
    f, key = fleet
    rc, rep = loadtest(capsys, "--target", f"127.0.0.1:{f.grpc_port}", "--streams", "2", "--duration", "0.3",
                       "--max-requests", "1000000", "--max-new-tokens", "3", "--api-key", key)
    assert rc == 0 and 0 < rep["requests"] < 1000000 and rep["duration_s"] < 5


def test_table_output(fleet: tuple[FakeFleet, str], capsys: pytest.CaptureFixture[str]) -> None:
    f, key = fleet
    assert main(["loadtest", "--target", f"127.0.0.1:{f.grpc_port}", "--max-requests", "2", "--api-key", key]) == 0
    out = capsys.readouterr().out
    assert "TTFT p50 / p99" in out and "throughput" in out


@pytest.mark.parametrize("target", ["10.0.0.1:80", "example.com:443", "0.0.0.0:1", "[2001:db8::1]:5",
                                    "192.168.1.1:50051", "127.0.0.1", "127.0.0.1:99999"])
def test_refuses_non_loopback_or_bad_targets(target: str) -> None:
    with pytest.raises(UserError):
        parse_target(target)


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", "--target", "8.8.8.8:53"]) == 2
    assert "non-loopback" in capsys.readouterr().err
    for argv in (["--streams", "0"], ["--duration", "0"], ["--max-requests", "0"],
                 ["--leak-check-url", "http://10.1.1.1/kv"]):
        assert main(["loadtest", "--target", "127.0.0.1:1", *argv]) == 2


def test_loopback_and_percentile() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert parse_target("[::1]:8080") == ("::1", 8080)
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([5.0], 99) == 5.0
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)

