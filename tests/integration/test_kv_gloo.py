"""KV transfer between processes over gloo on 127.0.0.1, rendezvous through Redis, and
rebuilding the pair after the receiving process dies."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from dspark.kv.cache import KVCache
from dspark.kv.handshake import KVSpec
from dspark.kv.transport import TransferMeta, create_transport
from services.state.redis_state import FleetState, StateConfig
from services.state.server import RedisServer

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"


def start_receiver(redis_url: str, namespace: str, out: Path, hold: bool) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(Path(__file__).with_name("kv_peer.py")), "--redis-url", redis_url,
           "--namespace", namespace, "--self-id", "target-0", "--peer", "prefill-0",
           "--out", str(out), "--model", MODEL, *(["--hold"] if hold else [])]
    env = {**os.environ, "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)


def wait_line(proc: subprocess.Popen[str], prefix: str, timeout_s: float = 90) -> str:
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and proc.poll() is not None:
            raise AssertionError(f"receiver exited with {proc.returncode} before {prefix!r}")
    raise AssertionError(f"no {prefix!r} from receiver within {timeout_s}s")


def source_cache(n: int, seed: int) -> tuple[KVCache, int]:
    cache = KVCache(num_layers=4, num_slots=1, max_len=64, num_kv_heads=2, head_dim=8)
    slot = cache.allocate()
    gen = torch.Generator().manual_seed(seed)
    for layer in range(4):
        cache.k[layer][slot, :n] = torch.randn(n, 2, 8, generator=gen)
        cache.v[layer][slot, :n] = torch.randn(n, 2, 8, generator=gen)
    cache.set_length(slot, n)
    return cache, slot


def assert_received(path: Path, cache: KVCache, slot: int, request_id: str,
                    features: torch.Tensor) -> None:
    got = torch.load(path)
    n = cache.lengths[slot]
    assert got["request_id"] == request_id and got["order"] == [0, 1, 2, 3]
    for layer in range(4):
        assert torch.equal(got["k"][layer], cache.k[layer][slot, :n])  # bit-exact
        assert torch.equal(got["v"][layer], cache.v[layer][slot, :n])
    assert torch.equal(got["extras"][0], features)


def test_cross_process_round_trip_and_rebuild_after_receiver_dies(
        redis_server: RedisServer, tmp_path: Path) -> None:
    namespace = f"kv{uuid.uuid4().hex[:8]}"
    state = FleetState.from_url(redis_server.url, StateConfig(namespace=namespace))
    sender = create_transport("gloo", "prefill-0", state, connect_timeout_s=90.0)
    first = start_receiver(redis_server.url, namespace, tmp_path / "r1", hold=True)
    second: subprocess.Popen[str] | None = None
    try:
        cache, slot = source_cache(n=11, seed=1)
        features = torch.randn(11, 2, 16)
        meta = TransferMeta(KVSpec.of_cache(cache, MODEL), "req-1", 11)
        sender.send_kv("target-0", cache.export_layers(slot), meta, [features])
        wait_line(first, "received req-1")
        assert_received(tmp_path / "r1.0", cache, slot, "req-1", features)
        assert state.lookup_rendezvous("prefill-0->target-0")["generation"] == 1

        first.kill()  # the receiving worker dies; the sender still holds the old group
        first.wait(timeout=30)
        second = start_receiver(redis_server.url, namespace, tmp_path / "r2", hold=False)
        wait_line(second, "ready")
        cache2, slot2 = source_cache(n=7, seed=2)
        features2 = torch.randn(7, 2, 16)
        meta2 = TransferMeta(KVSpec.of_cache(cache2, MODEL), "req-2", 7)
        sender.send_kv("target-0", cache2.export_layers(slot2), meta2, [features2])
        wait_line(second, "received req-2")
        assert second.wait(timeout=60) == 0
        assert_received(tmp_path / "r2.0", cache2, slot2, "req-2", features2)
        assert state.lookup_rendezvous("prefill-0->target-0")["generation"] == 2
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        sender.close()
        state.close()
