"""The fleet end to end: exactness against the embedded engine, concurrency, backpressure,
cancellation, replica failover and Redis outage (real Ray, Redis, gRPC, HTTP on loopback)."""

from __future__ import annotations

import json
import threading

import grpc
import pytest
import ray

from dspark.spec.sampling import SamplingParams
from dspark.v1 import generation_pb2 as pb
from tests.integration.fleet.conftest import MAX_NEW, PROMPTS
from tests.integration.fleet.helpers import (
    Hold,
    collect,
    counter,
    fleet_reference,
    free_slots,
    http_post,
    replica_actor,
    request,
    stub,
    wait_free,
)

pytestmark = pytest.mark.integration


def test_grpc_greedy_equals_embedded(fleet, reference):
    s = stub(fleet)
    for prompt in PROMPTS:
        ids, msgs = collect(s.Generate(request(prompt, MAX_NEW), timeout=300))
        assert ids == reference[prompt]
        assert msgs[-1].usage.completion_tokens == len(ids)
        assert msgs[-1].finish_reason != 0


def test_http_greedy_equals_embedded(fleet, reference):
    prompt = PROMPTS[0]
    body = {"prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0}
    status, raw = http_post(fleet, "/v1/completions", body)
    assert status == 200, raw
    choice = json.loads(raw)["choices"][0]
    assert choice["token_ids"] == reference[prompt]
    status, raw = http_post(fleet, "/v1/completions", {**body, "stream": True})
    assert status == 200
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    ids = [t for e in events[:-1] for t in json.loads(e)["choices"][0]["token_ids"]]
    assert ids == reference[prompt]
    status, raw = http_post(fleet, "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"]


def test_eight_concurrent_streams(fleet, reference):
    s, results = stub(fleet), {}

    def one(i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        results[i] = (prompt, collect(s.Generate(request(prompt, MAX_NEW), timeout=300))[0])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    for prompt, ids in results.values():
        assert ids == reference[prompt]


def test_invalid_requests(fleet):
    s = stub(fleet)
    with pytest.raises(grpc.RpcError) as e:
        list(s.Generate(request("", 8)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        list(s.Generate(request("hi", 10**6)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status, _ = http_post(fleet, "/v1/completions", {"prompt": "hi", "temperature": -1})
    assert status == 400


def test_backpressure(fleet):
    router = fleet.server.router
    saved = router.cfg
    router.cfg = saved.model_copy(update={"max_in_flight": 1, "max_queued": 0})
    try:
        s = stub(fleet)
        stream = s.Generate(request(PROMPTS[1], 64), timeout=300)
        next(stream)  # admitted and running
        with pytest.raises(grpc.RpcError) as e:
            list(s.Generate(request("hi", 4)))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status, _ = http_post(fleet, "/v1/completions", {"prompt": "hi", "max_tokens": 4})
        assert status == 429
        stream.cancel()
    finally:
        router.cfg = saved
    wait_free(fleet)


def test_cancel_frees_kv(fleet):
    full = free_slots(fleet)
    stream = stub(fleet).Generate(request(PROMPTS[1], 200), timeout=300)
    next(stream)
    next(stream)
    assert free_slots(fleet) == full - 1
    stream.cancel()
    wait_free(fleet, full)


@pytest.mark.parametrize("deployment", ["DrafterWorker", "TargetWorker"])
def test_replica_killed_mid_stream(fleet, reference, deployment):
    """The replica is killed while the request is held between two steps (so it surely is
    mid-generation): a dead target costs exactly one failover (re-prefill from the log on
    the replacement), a dead drafter none (plain decoding until a drafter is attached
    again, counted as fallback steps). Either way the output is exact."""
    prompt, rid = PROMPTS[2], f"kill-{deployment}"
    failovers, fallbacks = counter(fleet, "request_failovers"), counter(fleet, "spec_decode_fallback")
    with Hold(fleet, rid, after=2) as hold:
        stream = stub(fleet).Generate(request(prompt, MAX_NEW, request_id=rid), timeout=300)
        hold.wait()
        victim = replica_actor(deployment)
        ray.kill(victim, no_restart=True)  # Serve replaces it; its state is gone
    ids, msgs = collect(stream)
    assert ids == reference[prompt]
    with pytest.raises(ray.exceptions.RayActorError):  # the replica it was on is really gone
        ray.get(victim.__ray_ready__.remote(), timeout=60)
    if deployment == "TargetWorker":
        assert counter(fleet, "request_failovers") == failovers + 1
        assert counter(fleet, "spec_decode_fallback") == fallbacks
    else:
        assert counter(fleet, "request_failovers") == failovers
        assert counter(fleet, "spec_decode_fallback") > fallbacks
    assert msgs[-1].usage.completion_tokens == len(ids) == MAX_NEW
    wait_free(fleet)


def test_sampled_requests_with_a_seed_are_reproducible(fleet, embedded):
    """Same seed, same tokens: twice through the fleet, and as the embedded engine computes
    them (the prefill and the target replica each start a fresh RNG from the seed)."""
    target, engine = embedded
    prompt = PROMPTS[0]
    req = pb.GenerateRequest(text=prompt, sampling=pb.SamplingOptions(temperature=0.8, seed=11,
                                                                      max_new_tokens=MAX_NEW))
    first, _ = collect(stub(fleet).Generate(req, timeout=300))
    again, _ = collect(stub(fleet).Generate(req, timeout=300))
    params = SamplingParams(temperature=0.8, seed=11, max_new_tokens=MAX_NEW)
    assert first == again == fleet_reference(engine, target.tokenizer.encode(prompt), params)
    wait_free(fleet)


def test_redis_down_is_unavailable(fleet):
    port = fleet.redis.port
    fleet.redis.stop(cleanup=False)
    try:
        with pytest.raises(grpc.RpcError) as e:
            list(stub(fleet).Generate(request("hi", 4), timeout=60))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        status, _ = http_post(fleet, "/v1/completions", {"prompt": "hi", "max_tokens": 4})
        assert status == 503
        wait_free(fleet)
    finally:
        from services.state.server import RedisServer

        fleet.redis = RedisServer(port=port).start()
