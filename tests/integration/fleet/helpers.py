"""Small clients for the fleet tests (gRPC and HTTP on 127.0.0.1)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import grpc
import ray

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
