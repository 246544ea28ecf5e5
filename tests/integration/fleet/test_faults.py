"""Fault injection on the real fleet: a prefill replica dies, a target replica dies under a
sampled request, Redis restarts, the router dies and the client resumes elsewhere (greedy
and sampled), the whole drafter pool is down.

Each test proves its fault hit: the request is held between two steps while the fault is
injected (`helpers.Hold`), or frozen in Redis while its router is killed, and a counter
that only a recovery moves (failovers, takeovers, fallback steps) must move by exactly the
expected amount. Outputs are compared exactly: greedy with the embedded engine, sampled
with what the request's seed must give (`helpers.fleet_reference`); offsets must be
contiguous (no token lost or repeated) and every KV slot must come back."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import ray
from ray import serve

from dspark.spec.sampling import SamplingParams
from dspark.v1 import generation_pb2 as pb
from dspark.v1 import generation_pb2_grpc as pb_grpc
from services.state.redis_state import RequestStatus, UnknownRequest
from services.state.server import RedisServer
from tests.integration.fleet.conftest import MAX_NEW, PROMPTS
from tests.integration.fleet.helpers import (
    Hold,
    collect,
    continue_from,
    counter,
    fallback_steps,
    fleet_reference,
    replica_actor,
    request,
    stub,
    wait_free,
)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[3]
LONG_PROMPT = "Count on: 1, 2, 3, 4, 5,"
LONG = 64  # long enough that a fault lands while the request is still generating
SAMPLED = SamplingParams(temperature=0.8, seed=5, max_new_tokens=32)  # shorter: its reference costs two runs


def sampled_request(prompt: str, request_id: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(text=prompt, request_id=request_id, sampling=pb.SamplingOptions(
        temperature=SAMPLED.temperature, seed=SAMPLED.seed, max_new_tokens=SAMPLED.max_new_tokens))


@pytest.fixture(scope="module")
def long_reference(fleet: Any) -> list[int]:
    """The undisturbed greedy output of LONG_PROMPT (the fleet equals the embedded engine,
    test_fleet checks that)."""
    ids, _ = collect(stub(fleet).Generate(request(LONG_PROMPT, LONG), timeout=300))
    assert len(ids) == LONG, "the reference must span many speculative steps"
    return ids


@pytest.fixture(scope="module")
def long_prompt_ids(embedded: tuple[Any, Any]) -> list[int]:
    return embedded[0].tokenizer.encode(LONG_PROMPT)


# -- prefill ----------------------------------------------------------------------------------

def test_prefill_replica_killed(fleet: Any, reference: dict[str, list[int]]) -> None:
    """Killed while a running stream is held mid-generation: that stream goes on without a
    failover (its KV already moved to the target); a request sent after the kill can only
    be prefilled by the replacement, and is exact too."""
    s, rid = stub(fleet), "prefill-kill-1"
    failovers = counter(fleet, "request_failovers")
    with Hold(fleet, rid, after=1) as hold:
        running = s.Generate(request(PROMPTS[0], MAX_NEW, request_id=rid), timeout=300)
        hold.wait()
        victim = replica_actor("PrefillWorker")
        ray.kill(victim, no_restart=True)
    late, _ = collect(s.Generate(request(PROMPTS[1], MAX_NEW), timeout=300))
    assert late == reference[PROMPTS[1]]
    with pytest.raises(ray.exceptions.RayActorError):  # so the late prefill ran on the replacement
        ray.get(victim.__ray_ready__.remote(), timeout=60)
    assert collect(running)[0] == reference[PROMPTS[0]]
    assert counter(fleet, "request_failovers") == failovers
    wait_free(fleet)


# -- target failover of a sampled request -----------------------------------------------------

def test_target_killed_under_a_sampled_request(fleet: Any, embedded: tuple[Any, Any],
                                               long_prompt_ids: list[int]) -> None:
    """A sampled request (seed 5) loses its target replica between two steps: one failover,
    no token lost or repeated, the tokens before the fault are the undisturbed run's, and
    the rest is exactly what the seed gives from the logged tokens on (the replacement
    re-prefills them and starts a fresh RNG from the seed)."""
    engine = embedded[1]
    rid, failovers = "sampled-failover-1", counter(fleet, "request_failovers")
    with Hold(fleet, rid, after=3) as hold:
        stream = stub(fleet).Generate(sampled_request(LONG_PROMPT, rid), timeout=300)
        hold.wait()
        logged = fleet.state.read_tokens(rid)  # what the client has been sent before the fault
        ray.kill(replica_actor("TargetWorker"), no_restart=True)
    ids, _ = collect(stream)
    assert counter(fleet, "request_failovers") == failovers + 1
    assert 1 < len(logged) < SAMPLED.max_new_tokens and ids[:len(logged)] == logged
    assert logged == fleet_reference(engine, long_prompt_ids, SAMPLED)[:len(logged)]
    assert ids == logged + continue_from(engine, long_prompt_ids, logged, SAMPLED)
    assert len(ids) == SAMPLED.max_new_tokens and fleet.state.read_tokens(rid) == ids
    wait_free(fleet)


# -- Redis --------------------------------------------------------------------------------------

def test_redis_restart_mid_stream(fleet: Any, long_reference: list[int]) -> None:
    """redis-server stops and starts again (empty: no persistence) while a stream is held
    between two steps: the stream's next log append finds its request gone, so it ends
    UNAVAILABLE after exactly the tokens sent before; nothing of it is left half-written in
    the state; a retried request is exact; no KV slot is lost."""
    s, rid = stub(fleet), "redis-restart-1"
    with Hold(fleet, rid, after=2) as hold:
        stream = s.Generate(request(LONG_PROMPT, LONG, request_id=rid), timeout=300)
        hold.wait()
        sent = fleet.state.read_tokens(rid)
        port = fleet.redis.port
        fleet.redis.stop(cleanup=False)
        fleet.redis = RedisServer(port=port).start()
    got = []
    with pytest.raises(grpc.RpcError) as e:
        for m in stream:
            assert m.offset == len(got)
            got += m.token_ids
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    assert got == sent == long_reference[:len(sent)] and 1 < len(sent) < LONG
    with pytest.raises(UnknownRequest):  # the restarted Redis holds nothing of it
        fleet.state.get(rid)
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


@contextlib.contextmanager
def redis_writes_paused(fleet: Any) -> Iterator[None]:
    """Every Redis write (a router's token-log append, its status update) blocks until the
    block exits; reads go on. A router cannot finish a request meanwhile."""
    fleet.state.client.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
    try:
        yield
    finally:
        fleet.state.client.execute_command("CLIENT", "UNPAUSE")


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_router_killed_client_resumes(fleet: Any, embedded: tuple[Any, Any], long_reference: list[int],
                                      long_prompt_ids: list[int], second_router: tuple[subprocess.Popen, str],
                                      sampled: bool) -> None:
    """The router driving a request is SIGKILLed mid-stream (its Redis writes frozen, so it
    cannot have finished); the client calls Resume(request_id, offset) on another router,
    which replays the log from the offset, sees the owner is dead, claims the request (one
    takeover) and generates the rest from the log. Sampled with a seed, the continuation is
    what the seed gives from the logged tokens on."""
    proc, addr = second_router
    rid = f"router-restart-{'sampled' if sampled else 'greedy'}"
    req = sampled_request(LONG_PROMPT, rid) if sampled else request(LONG_PROMPT, LONG, request_id=rid)
    length = SAMPLED.max_new_tokens if sampled else LONG
    with grpc.insecure_channel(addr) as channel:
        stream = pb_grpc.GenerationStub(channel).Generate(req, timeout=300)
        got: list[int] = []
        for m in stream:
            assert m.offset == len(got)
            got += m.token_ids
            if len(got) >= 2:
                break
        with redis_writes_paused(fleet):
            proc.send_signal(signal.SIGKILL)  # no cleanup runs: its worker state is orphaned
            proc.wait(timeout=30)
            record, logged = fleet.state.get(rid), fleet.state.read_tokens(rid)
    assert record.status is RequestStatus.RUNNING, "the router finished the request before it died"
    assert len(got) <= len(logged) < length and logged[:len(got)] == got
    takeovers, metric = fleet.server.router.num_takeovers, counter(fleet, "request_takeovers")
    for m in stub(fleet).Resume(pb.ResumeRequest(request_id=rid, offset=len(got)), timeout=300):
        assert m.offset == len(got), f"offset {m.offset} after {len(got)} tokens"
        got += m.token_ids
        last = m
    engine = embedded[1]
    if sampled:
        assert logged == fleet_reference(engine, long_prompt_ids, SAMPLED)[:len(logged)]
        assert got == logged + continue_from(engine, long_prompt_ids, logged, SAMPLED)
    else:
        assert got == long_reference
    assert len(got) == length and last.finish_reason == pb.FINISH_REASON_LENGTH
    assert fleet.server.router.num_takeovers == takeovers + 1
    assert counter(fleet, "request_takeovers") == metric + 1
    # A second Resume only replays: the whole log, once, and takes nothing over.
    assert collect(stub(fleet).Resume(pb.ResumeRequest(request_id=rid, offset=0), timeout=60))[0] == got
    assert counter(fleet, "request_takeovers") == metric + 1
    wait_free(fleet)


def test_resume_rejects_bad_offsets_and_unknown_ids(fleet: Any) -> None:
    s = stub(fleet)
    for req, code in ((pb.ResumeRequest(request_id="no-such-request", offset=0), grpc.StatusCode.NOT_FOUND),
                      (pb.ResumeRequest(request_id="x", offset=-1), grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as e:
            list(s.Resume(req, timeout=30))
        assert e.value.code() == code


# -- drafter pool down ------------------------------------------------------------------------

@ray.remote(num_cpus=0)
class _PoolSeat:
    """Holds a share of a pool's Ray resource, so no replica of that pool can be placed."""

    def ready(self) -> bool:
        return True


def _replicas(deployment: str) -> list[Any]:
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]]


def _free(resource: str, wait_s: float) -> float:
    deadline = time.monotonic() + wait_s
    while (free := ray.available_resources().get(resource, 0.0)) <= 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    return free


@contextlib.contextmanager
def pool_down(fleet: Any, pool: str, deployment: str) -> Iterator[None]:
    """Kill the replicas of `pool` (ray.kill) and keep Serve from placing new ones: seats
    take the pool's custom resource share by share as the replicas release it, until they
    hold all of it (then no replica of the pool can run anywhere)."""
    resource = next(iter(fleet.cfg.pool(pool).resources))
    total = ray.cluster_resources()[resource]
    seats, held = [], 0.0
    deadline = time.monotonic() + 120
    try:
        while held < total:
            assert time.monotonic() < deadline, f"could not take the {pool} pool down"
            free = _free(resource, 0.0)
            if free <= 0:  # all of it placed: kill a replica and seat its share before Serve
                for replica in _replicas(deployment):
                    with contextlib.suppress(ValueError):
                        ray.kill(replica, no_restart=True)
                free = _free(resource, 10.0)
                if free <= 0:
                    continue
            seat = _PoolSeat.options(resources={resource: free}).remote()
            try:
                ray.get(seat.ready.remote(), timeout=10)
                seats.append(seat)
                held += free
            except ray.exceptions.GetTimeoutError:  # a replacement replica was faster: again
                ray.kill(seat)
        yield
    finally:
        for seat in seats:
            ray.kill(seat)
        deadline = time.monotonic() + 180  # Serve places the replacements again
        while serve.status().applications[fleet.cfg.app_name].deployments[deployment].status != "HEALTHY":
            assert time.monotonic() < deadline, f"{deployment} did not come back"
            time.sleep(0.5)


def test_drafter_pool_down_falls_back_to_plain_decoding(fleet: Any, reference: dict[str, list[int]]) -> None:
    """Every drafter replica killed, none can be placed: requests decode plainly from
    admission on (each step counted as a fallback step), exactly; once the pool is back,
    requests speculate again."""
    router, prompt = fleet.server.router, PROMPTS[2]  # "1, 2, 3, 4, 5,": n-gram drafts find matches
    saved = router.cfg
    before = fallback_steps(fleet)
    try:
        router.cfg = saved.model_copy(update={"drafter_timeout_s": 1.0})  # a missing drafter costs 1 s
        with pool_down(fleet, "drafter", "DrafterWorker"):
            ids, msgs = collect(stub(fleet).Generate(request(prompt, MAX_NEW), timeout=300))
    finally:
        router.cfg = saved
    assert ids == reference[prompt]
    usage = msgs[-1].usage
    assert usage.mean_accepted_length == pytest.approx(1.0)  # one token per target forward
    assert sum(m.step.drafted for m in msgs) == 0
    assert fallback_steps(fleet) - before == usage.num_target_forwards == len(ids) - 1
    # The pool is back: the same request speculates again, and nothing falls back.
    before = fallback_steps(fleet)
    ids, msgs = collect(stub(fleet).Generate(request(prompt, MAX_NEW), timeout=300))
    assert ids == reference[prompt] and sum(m.step.drafted for m in msgs) > 0
    assert fallback_steps(fleet) == before
    wait_free(fleet)
