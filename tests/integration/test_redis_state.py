"""FleetState against a real redis-server on 127.0.0.1."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from services.state.redis_state import (
    FleetState,
    RequestStatus,
    StateConfig,
    StateConflict,
    StateUnavailable,
    TokenOffsetMismatch,
    UnknownRequest,
)
from services.state.server import RedisServer, free_port, process_alive

pytestmark = pytest.mark.integration


@pytest.fixture
def state(redis_server: RedisServer) -> Iterator[FleetState]:
    fs = FleetState.from_url(redis_server.url, StateConfig(namespace=f"t{uuid.uuid4().hex[:8]}",
                                                           request_ttl_s=120, rendezvous_ttl_s=30))
    yield fs
    fs.close()


def test_register_get_and_duplicate(state: FleetState) -> None:
    rec = state.register("r1", {"model": "smol", "prompt_tokens": 7})
    assert rec.status is RequestStatus.QUEUED
    got = state.get("r1")
    assert got.meta == {"model": "smol", "prompt_tokens": "7"} and got.created_at == rec.created_at
    with pytest.raises(StateConflict):
        state.register("r1")
    with pytest.raises(UnknownRequest):
        state.get("nope")
    state.update_meta("r1", {"target": "t0"})
    assert state.get("r1").meta["target"] == "t0"
    with pytest.raises(UnknownRequest):
        state.update_meta("nope", {"x": 1})
    assert state.client.exists(state._key("req", "nope")) == 0


def test_status_transitions_and_active(state: FleetState) -> None:
    for rid in ("a", "b", "c"):
        state.register(rid)
    assert state.list_active() == ["a", "b", "c"]
    assert state.set_status("a", RequestStatus.PREFILLING) is RequestStatus.QUEUED
    state.set_status("a", RequestStatus.RUNNING)
    state.set_status("a", RequestStatus.PREFILLING)  # failover re-prefill
    with pytest.raises(StateConflict):
        state.set_status("b", RequestStatus.RUNNING)  # must prefill first
    state.set_status("b", RequestStatus.CANCELLED)
    state.set_status("a", RequestStatus.FINISHED, {"finish_reason": "stop", "completion_tokens": 5})
    with pytest.raises(StateConflict):
        state.set_status("a", RequestStatus.RUNNING)  # terminal is final
    rec = state.get("a")
    assert rec.status is RequestStatus.FINISHED and rec.meta["finish_reason"] == "stop"
    assert state.list_active() == ["c"]
    with pytest.raises(UnknownRequest):
        state.set_status("zz", RequestStatus.FAILED)
    state.delete("c")
    assert state.list_active() == []


def test_token_log_exactly_once(state: FleetState) -> None:
    state.register("r")
    assert state.append_tokens("r", 0, [5, 6, 7]) == 3
    assert state.append_tokens("r", 3, [8]) == 4
    assert state.append_tokens("r", 3, [8]) == 4  # identical retry: no-op
    with pytest.raises(TokenOffsetMismatch) as gap:
        state.append_tokens("r", 6, [9])
    assert gap.value.expected == 4
    with pytest.raises(TokenOffsetMismatch):
        state.append_tokens("r", 2, [1, 2])  # overlapping, different tokens
    assert state.read_tokens("r") == [5, 6, 7, 8]
    assert state.read_tokens("r", 2) == [7, 8] and state.num_tokens("r") == 4
    with pytest.raises(UnknownRequest):
        state.append_tokens("never", 0, [1])
    big = list(range(2500))  # more than one Lua unpack chunk
    assert state.append_tokens("r", 4, big) == 4 + len(big)
    assert state.read_tokens("r", 4) == big


def test_concurrent_appenders_never_duplicate(state: FleetState) -> None:
    """Three writers race for the next offset until each has landed 20 tokens: every
    success is in the log exactly once, at its offset, and nothing else is."""
    state.register("r")
    landed: dict[int, list[int]] = {0: [], 1: [], 2: []}
    conflicts = [0]

    def writer(tag: int) -> None:
        while len(landed[tag]) < 20:
            n = state.num_tokens("r")
            try:
                assert state.append_tokens("r", n, [tag * 1000 + n]) == n + 1
                landed[tag].append(n)
            except TokenOffsetMismatch as e:
                assert e.expected > n  # only ever lost to another writer's append
                conflicts[0] += 1

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    tokens = state.read_tokens("r")
    assert len(tokens) == state.num_tokens("r") == 60
    assert [t % 1000 for t in tokens] == list(range(60))  # one token per offset
    assert sorted(n for offsets in landed.values() for n in offsets) == list(range(60))
    for tag, offsets in landed.items():
        assert [tokens[n] for n in offsets] == [tag * 1000 + n for n in offsets]


def test_every_key_has_a_ttl(state: FleetState) -> None:
    state.register("r", {"m": 1})
    state.append_tokens("r", 0, [1])
    state.set_status("r", RequestStatus.PREFILLING)
    state.publish_rendezvous("p->t", {"port": 1, "generation": 1})
    keys = list(state.client.scan_iter(f"{state.config.namespace}:*"))
    assert len(keys) == 4
    for key in keys:
        assert state.client.ttl(key) > 0, key


def test_rendezvous(state: FleetState) -> None:
    assert state.lookup_rendezvous("p->t") is None
    first = state.publish_rendezvous("p->t", {"host": "127.0.0.1", "port": 1, "generation": 1})
    kept = state.publish_rendezvous("p->t", {"port": 2, "generation": 2}, replace=False)
    assert kept == first and state.lookup_rendezvous("p->t") == first
    state.publish_rendezvous("p->t", {"port": 3, "generation": 3})
    assert not state.clear_rendezvous("p->t", generation=2)  # stale generation: kept
    assert state.lookup_rendezvous("p->t")["port"] == 3
    assert state.refresh_rendezvous("p->t", ttl_s=5) and state.client.ttl(state._key("rdv", "p->t")) <= 5
    assert state.clear_rendezvous("p->t", generation=3) and state.lookup_rendezvous("p->t") is None


def test_unreachable_redis_raises_state_unavailable() -> None:
    config = StateConfig(socket_timeout_s=0.5, retries=0)
    state = FleetState.from_url(f"redis://127.0.0.1:{free_port()}/0", config)
    t0 = time.monotonic()
    for call in (state.ping, lambda: state.register("r"), lambda: state.read_tokens("r"),
                 lambda: state.append_tokens("r", 0, [1]), lambda: state.lookup_rendezvous("x")):
        with pytest.raises(StateUnavailable):
            call()
    assert time.monotonic() - t0 < 5


def test_server_dies_mid_session() -> None:
    with RedisServer() as server:
        state = FleetState.from_url(server.url, StateConfig(socket_timeout_s=0.5, retries=0))
        state.register("r")
        pid = server.pid
        server.stop(cleanup=False)
        assert pid is not None and not process_alive(pid)
        with pytest.raises(StateUnavailable):
            state.append_tokens("r", 0, [1])
        state.close()


def test_router_liveness_and_claim(state: FleetState) -> None:
    state.heartbeat("r1", ttl_s=0.3)
    assert state.router_alive("r1") and not state.router_alive("r2") and not state.router_alive("")
    time.sleep(0.5)
    assert not state.router_alive("r1")  # a dead router's key expires
    state.register("q", {"router": "r1"})
    assert not state.claim("q", "r0", "r2")  # wrong current owner: no change
    assert state.claim("q", "r1", "r2")  # exactly one of several claimers wins
    assert not state.claim("q", "r1", "r3")
    assert state.get("q").meta["router"] == "r2"
    assert not state.claim("missing", "", "r2")
