"""`RayWorkerClient` calls the worker method each protocol call stands for, with arguments
that bind to that method's real signature (`InProcessWorkerClient` shares the mapping and
runs end to end in tests/integration/fleet/test_dspark_fleet.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from typing import Any

import pytest

from dspark.spec.proposer import Draft
from dspark.spec.sampling import SamplingParams
from services.workers.client import InProcessWorkerClient, RayWorkerClient
from services.workers.drafter import DrafterWorker
from services.workers.messages import PrefillCall, ProposeCall, ReceiveCall, StartCall, VerifyCall
from services.workers.prefill import PrefillWorker
from services.workers.target import TargetWorker

WORKERS = {"prefill": PrefillWorker, "target": TargetWorker, "drafter": DrafterWorker}
P = SamplingParams(max_new_tokens=3)


class FakeHandle:
    """The call shape of a Serve handle: `await handle.method.remote(*args)`; records calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, method: str) -> Any:
        handle = self

        class Method:
            @staticmethod
            async def remote(*args: Any) -> str:
                handle.calls.append((method, args))
                return method
        return Method


PREFILL = PrefillCall("r", [1, 2], P, "t-peer", "d-peer", (1, 2))
RECEIVE = ReceiveCall("r", "p-peer", [1, 2], P, [5, 6], (1,))
START = StartCall("r", [1, 2], P, "p-peer")
CASES = [  # role, protocol method, its argument, the worker method it must reach
    ("prefill", "health", None, "info"),
    ("prefill", "prefill", PREFILL, "prefill"),
    ("target", "receive", RECEIVE, "receive"),
    ("target", "verify", VerifyCall("r", Draft([3])), "verify"),
    ("target", "release", "r", "free"),
    ("drafter", "start", START, "start"),
    ("drafter", "draft", ProposeCall("r", [1, 2], 4), "propose"),
    ("drafter", "release", "r", "finish"),
]


@pytest.mark.parametrize(("role", "name", "arg", "method"), CASES)
def test_ray_client_reaches_the_worker_method_with_its_arguments_in_place(role: str, name: str, arg: Any,
                                                                         method: str) -> None:
    handle = FakeHandle()
    client = RayWorkerClient("W", role, handle)  # type: ignore[arg-type]
    asyncio.run(getattr(client, name)(*([] if arg is None else [arg])))
    ((called, args),) = handle.calls
    assert called == method
    bound = inspect.signature(getattr(WORKERS[role], method)).bind(None, *args).arguments  # self first
    if dataclasses.is_dataclass(arg) and "call" not in bound:  # unpacked: every field lands on its parameter
        assert {k: v for k, v in bound.items() if k != "self"} == dataclasses.asdict(arg) | {"params": P}


def test_release_on_a_prefill_replica_holds_nothing() -> None:
    handle = FakeHandle()
    assert asyncio.run(RayWorkerClient("P", "prefill", handle).release("r")) is False
    assert handle.calls == []


def test_in_process_client_runs_batched_methods_with_a_batch_of_one_and_raises_their_errors() -> None:
    class Worker:
        def _verify(self, calls: list[VerifyCall]) -> list[Any]:
            return [RuntimeError("lost") if c.request_id == "gone" else ("ok", len(calls)) for c in calls]

        def free(self, request_id: str) -> bool:
            return request_id == "r"

    client = InProcessWorkerClient("T", "target", Worker())
    assert asyncio.run(client.verify(VerifyCall("r", Draft([])))) == ("ok", 1)
    with pytest.raises(RuntimeError, match="lost"):
        asyncio.run(client.verify(VerifyCall("gone", Draft([]))))
    assert asyncio.run(client.release("r")) is True
