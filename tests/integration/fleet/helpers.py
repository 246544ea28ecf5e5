"""Small clients for the fleet tests (gRPC and HTTP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import grpc
import ray

from dspark.models.runner import SeqInput
from dspark.v1 import generation_pb2 as pb
from dspark.v1 import generation_pb2_grpc as pb_grpc


def stub(fleet: Any) -> pb_grpc.GenerationStub:
    return pb_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{fleet.ports['grpc']}"))


def request(prompt: str, max_new: int, **kw: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=prompt, sampling=pb.SamplingOptions(temperature=0, max_new_tokens=max_new),
                              **kw)


def collect(messages: Any) -> tuple[list[int], list[Any]]:
    """Token ids of a stream, asserting offsets are contiguous (no gap, no duplicate)."""
    ids, msgs = [], []
    for m in messages:
        assert m.offset == len(ids), f"offset {m.offset} after {len(ids)} tokens"
        ids += m.token_ids
        msgs.append(m)
    return ids, msgs


def http_post(fleet: Any, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{fleet.ports['http']}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def replica_actor(deployment: str) -> Any:
    """The Ray actor behind a deployment's (single) Serve replica."""
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]:
            return ray.get_actor(a["name"], namespace=a["namespace"])
    raise LookupError(deployment)


def free_slots(fleet: Any, deployment: str = "TargetWorker") -> int:
    from ray import serve

    return serve.get_deployment_handle(deployment, fleet.cfg.app_name).num_free_slots.remote().result()


def chain(first: Any, rest: Any) -> Any:
    yield from first
    yield from rest


def wait_free(fleet: Any, expected: int | None = None, timeout_s: float = 30) -> None:
    """Every KV slot back (cancellation and failover free state on the workers)."""
    expected = expected or fleet.cfg.pool("target").max_batch_size
    deadline = time.monotonic() + timeout_s
    while free_slots(fleet) != expected:
        assert time.monotonic() < deadline, f"{free_slots(fleet)} of {expected} KV slots free"
        time.sleep(0.2)


def fallback_steps(fleet: Any) -> float:
    """dspark:spec_decode_fallback_total of the router (all label sets)."""
    return sum(s.value for m in fleet.metrics.registry.collect() for s in m.samples
               if s.name == "dspark:spec_decode_fallback_total")


# -- proving that a fault hit ------------------------------------------------------------------

def counter(fleet: Any, name: str) -> float:
    """A counter of the fleet's router, summed over its label sets (`name` without _total)."""
    return sum(s.value for m in fleet.metrics.registry.collect() for s in m.samples
               if s.name == f"dspark:{name}_total")


class Hold:
    """Holds one request inside the router right before its step number `after + 1` (its
    prefill and `after` steps are logged and streamed), so a fault injected meanwhile
    surely lands mid-generation: `with Hold(fleet, rid, 2) as hold: hold.wait(); <fault>`,
    and the step runs when the block exits. Wraps the router instance's
    `_draft_and_verify`, the call every step (and every retry after a failover) makes."""

    def __init__(self, fleet: Any, request_id: str, after: int) -> None:
        self.router, self.request_id, self.after = fleet.server.router, request_id, after
        self.steps = 0
        self.reached, self.released = threading.Event(), threading.Event()

    def __enter__(self) -> Hold:
        original = self.router._draft_and_verify

        async def held(job: Any) -> Any:
            if job.spec.request_id == self.request_id:
                self.steps += 1
                if self.steps == self.after + 1:
                    self.reached.set()
                    while not self.released.is_set():
                        await asyncio.sleep(0.01)
            return await original(job)

        self.router._draft_and_verify = held
        return self

    def wait(self, timeout_s: float = 120) -> None:
        assert self.reached.wait(timeout_s), f"request {self.request_id} never reached step {self.after + 1}"

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        del self.router._draft_and_verify  # the class's method again (the held call finishes)


# -- the fleet's exact output, greedy or sampled ----------------------------------------------

def continue_from(engine: Any, prompt_ids: list[int], committed: list[int], params: Any) -> list[int]:
    """What the fleet generates after `committed` tokens: a target replica admits the request
    with the KV of prompt + committed[:-1] and a fresh RNG from the request's seed
    (TargetWorker._receive), then runs engine rounds; mirrored here on the embedded engine."""
    seq = engine.new_sequence(prompt_ids, params)
    seq.slot = engine.cache.allocate()
    engine.runner.forward([SeqInput(seq.slot, prompt_ids + committed[:-1])], engine.taps)
    seq.output_ids = list(committed)
    if engine.proposer is not None:
        engine.proposer.start(seq.seq_id, prompt_ids)
    engine.running.append(seq)
    while engine.has_work:
        engine.step()
    return engine.pop_finished(seq.seq_id).token_ids[len(committed):]


def fleet_reference(engine: Any, prompt_ids: list[int], params: Any) -> list[int]:
    """The fleet's whole output for a request: the prefill replica samples the first token
    with a fresh RNG from the seed (PrefillWorker), the target continues with another
    fresh one. Greedy, this is the embedded engine's output; sampled with a seed, it is
    what the same seed must give every time, failovers and takeovers included."""
    from dspark.engine.engine import StepStats

    seq = engine.new_sequence(prompt_ids, params)
    seq.slot = engine.cache.allocate()
    try:
        engine.prefill([seq], StepStats())
    finally:
        engine.cache.free(seq.slot)
    first = seq.output_ids[:1]
    return first if seq.finished else first + continue_from(engine, prompt_ids, first, params)
