"""Fault injection on the real fleet: a prefill replica dies, Redis restarts, the router
dies and the client resumes elsewhere, the drafter pool is down. Each asserts exact
equality with an undisturbed greedy run, contiguous offsets (no token lost or repeated)
and that every KV slot comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import ray

from dspark.v1 import generation_pb2 as pb
from services.state.redis_state import UnknownRequest
from services.state.server import RedisServer
from tests.integration.fleet.conftest import MAX_NEW, PROMPTS
from tests.integration.fleet.helpers import (
    chain,
    collect,
    fallback_steps,
    replica_actor,
    request,
    stub,
    wait_free,
)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[3]
LONG_PROMPT = "Count on: 1, 2, 3, 4, 5,"
LONG = 64  # long enough that a fault lands while the request is still generating


@pytest.fixture(scope="module")
def long_reference(fleet: Any) -> list[int]:
    """The undisturbed greedy output of LONG_PROMPT (the fleet equals the embedded engine,
    test_fleet checks that)."""
    ids, _ = collect(stub(fleet).Generate(request(LONG_PROMPT, LONG), timeout=300))
    assert len(ids) > 2 * 8, "the reference must span several speculative steps"
    return ids


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except Exception as e:  # handed to the test thread
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


# -- prefill ----------------------------------------------------------------------------------

def test_prefill_replica_killed(fleet: Any, reference: dict[str, list[int]]) -> None:
    """Killed right after it prefilled one stream: that stream goes on (its KV already moved
    to the target); a request admitted while the replica is dead or restarting retries its
    admission on the replacement and is exact too."""
    s = stub(fleet)
    running = s.Generate(request(PROMPTS[0], MAX_NEW), timeout=300)
    first = next(running)
    ray.kill(replica_actor("PrefillWorker"), no_restart=True)
    t, late = _in_thread(lambda: collect(s.Generate(request(PROMPTS[1], MAX_NEW), timeout=300))[0])
    assert collect(chain([first], running))[0] == reference[PROMPTS[0]]
    t.join()
    assert "error" not in late, late.get("error")
    assert late["value"] == reference[PROMPTS[1]]
    wait_free(fleet)


# -- Redis --------------------------------------------------------------------------------------

def test_redis_restart_mid_stream(fleet: Any, long_reference: list[int]) -> None:
    """redis-server stops and starts again on its port while a stream runs: the stream
    either completes exactly or ends UNAVAILABLE after a clean prefix; the state holds no
    half-written request; a retried request is exact; no KV slot is lost."""
    s, rid = stub(fleet), "redis-restart-1"
    stream = s.Generate(request(LONG_PROMPT, LONG, request_id=rid), timeout=300)
    got = list(next(stream).token_ids)
    port = fleet.redis.port
    fleet.redis.stop(cleanup=False)
    time.sleep(1.0)  # long enough for the stream's next log append to meet the outage
    fleet.redis = RedisServer(port=port).start()
    try:
        for m in stream:
            assert m.offset == len(got)
            got += m.token_ids
        assert got == long_reference  # it may have completed
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        assert got == long_reference[:len(got)]  # what was streamed is an exact prefix
    # Nothing half-written: the restarted Redis (no persistence) holds nothing of it, or a
    # record whose log is an exact prefix.
    try:
        fleet.state.get(rid)
        assert long_reference[:fleet.state.num_tokens(rid)] == fleet.state.read_tokens(rid)
    except UnknownRequest:
        assert fleet.state.read_tokens(rid) == []
    ids, _ = collect(s.Generate(request(LONG_PROMPT, LONG), timeout=300))  # the retry
    assert ids == long_reference
    wait_free(fleet)


# -- router restart ---------------------------------------------------------------------------

def _node_ip() -> str:
    """This machine's address as the Ray cluster knows it (what a second driver must give)."""
    me = ray.get_runtime_context().get_node_id()
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == me)


@pytest.fixture
def second_router(fleet: Any) -> Iterator[tuple[subprocess.Popen, str]]:
    """A router in its own process on the same fleet (Ray, Serve app, Redis)."""
    cmd = [sys.executable, "-m", "services.router.main", "--ray-address",
           ray.get_runtime_context().gcs_address, "--node-ip", _node_ip(),
           "--redis-url", fleet.cfg.redis_url,
           "--config-json", fleet.cfg.model_dump_json()]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert "router ready" in line, f"router did not start: {line!r}"
        yield proc, line.split("grpc=")[1].split()[0]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def test_router_killed_client_resumes(fleet: Any, long_reference: list[int],
                                      second_router: tuple[subprocess.Popen, str]) -> None:
    """The router driving a request is SIGKILLed mid-stream; the client calls
    Resume(request_id, offset) on another router, which replays the log from the offset,
    sees the owner is dead, claims the request and generates the rest from the log."""
    proc, addr = second_router
    rid = "router-restart-1"
    from dspark.v1 import generation_pb2_grpc as pb_grpc

    with grpc.insecure_channel(addr) as channel:
        stream = pb_grpc.GenerationStub(channel).Generate(request(LONG_PROMPT, LONG, request_id=rid), timeout=300)
        got = []
        for m in stream:
            assert m.offset == len(got)
            got += m.token_ids
            if len(got) >= 2:
                break
        proc.send_signal(signal.SIGKILL)  # no cleanup runs: its worker state is orphaned
        proc.wait(timeout=30)
    assert len(got) < len(long_reference), "the request finished before the router died"
    takeovers = fleet.server.router.num_takeovers
    for m in stub(fleet).Resume(pb.ResumeRequest(request_id=rid, offset=len(got)), timeout=300):
        assert m.offset == len(got), f"offset {m.offset} after {len(got)} tokens"
        got += m.token_ids
        last = m
    assert got == long_reference
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert fleet.server.router.num_takeovers == takeovers + 1
    # A second Resume only replays: the whole log, once.
    assert collect(stub(fleet).Resume(pb.ResumeRequest(request_id=rid, offset=0), timeout=60))[0] == long_reference
    wait_free(fleet)


def test_resume_rejects_bad_offsets_and_unknown_ids(fleet: Any) -> None:
    s = stub(fleet)
    for req, code in ((pb.ResumeRequest(request_id="no-such-request", offset=0), grpc.StatusCode.NOT_FOUND),
                      (pb.ResumeRequest(request_id="x", offset=-1), grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as e:
            list(s.Resume(req, timeout=30))
        assert e.value.code() == code


# -- drafter pool down ------------------------------------------------------------------------

class _DeadHandle:
    """Stands in for every drafter replica of a pool that is down: each call fails as a call
    to a dead actor does (Serve would instead queue calls while it replaces replicas)."""

    def __getattr__(self, method: str) -> Any:
        async def fail(*args: Any) -> Any:
            raise ray.exceptions.RayActorError()
        return type("Method", (), {"remote": staticmethod(fail)})


def test_drafter_pool_down_falls_back_to_plain_decoding(fleet: Any, reference: dict[str, list[int]]) -> None:
    pools = fleet.server.router.pools
    saved = dict(pools.handles)
    before = fallback_steps(fleet)
    try:
        for name in pools.names["drafter"]:
            pools.handles[name] = _DeadHandle()
        ids, msgs = collect(stub(fleet).Generate(request(PROMPTS[0], MAX_NEW), timeout=300))
    finally:
        pools.handles.update(saved)
    assert ids == reference[PROMPTS[0]]
    usage = msgs[-1].usage
    assert usage.mean_accepted_length == pytest.approx(1.0)  # one token per target forward
    assert fallback_steps(fleet) - before == usage.num_target_forwards > 0
    wait_free(fleet)
