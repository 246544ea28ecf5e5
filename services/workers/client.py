"""`WorkerClient`: the one seam between the router and a worker replica, typed over the
dataclasses of `services.workers.messages`.

The router never names a worker method by string; it holds one client per replica and
calls the role's methods on it:

    role      admission               per step          end
    prefill   prefill(PrefillCall)    -                 -
    target    receive(ReceiveCall)    verify(VerifyCall) release(request_id)
    drafter   start(StartCall)        draft(ProposeCall) release(request_id)

`health()` (every role) returns the replica's `WorkerInfo`. Two implementations:
`RayWorkerClient` over a Ray Serve deployment handle (the fleet), and `InProcessWorkerClient`
over a worker object in this process (tests, and a fleet without Serve). A failure reaches
the caller as the worker raised it (`StateLost`, `PeerLost`, ...) or, over Ray, as the
`RayActorError` of a dead replica; the router decides which ones it recovers from.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Literal, Protocol

from dspark.spec.proposer import Draft
from services.workers.messages import (
    PrefillCall,
    PrefillResult,
    ProposeCall,
    ReceiveCall,
    ReceiveReply,
    StartCall,
    VerifyCall,
    VerifyReply,
    WorkerInfo,
)

Role = Literal["prefill", "target", "drafter"]
_RELEASE = {"target": "free", "drafter": "finish"}  # the worker method that drops a request


class WorkerClient(Protocol):
    name: str  # the replica's deployment name (sticky routing, logs)
    role: Role

    async def health(self) -> WorkerInfo: ...

    async def prefill(self, call: PrefillCall) -> PrefillResult: ...

    async def receive(self, call: ReceiveCall) -> ReceiveReply:
        """Drafts the first step may use, and whether it drafts."""

    async def start(self, call: StartCall) -> None: ...

    async def draft(self, call: ProposeCall) -> Draft: ...

    async def verify(self, call: VerifyCall) -> VerifyReply: ...

    async def release(self, request_id: str) -> bool:
        """Free what the replica holds for the request (KV slot, drafter state); False if
        it held nothing."""


class _Client:
    """Maps the typed calls onto a worker's methods; subclasses say how a method is called."""

    def __init__(self, name: str, role: Role) -> None:
        self.name, self.role = name, role

    async def _invoke(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    async def health(self) -> WorkerInfo:
        return await self._invoke("info")

    async def prefill(self, call: PrefillCall) -> PrefillResult:
        return await self._invoke("prefill", call.request_id, call.token_ids, call.params, call.target_peer,
                                  call.drafter_peer, call.feature_layers)

    async def receive(self, call: ReceiveCall) -> ReceiveReply:
        return await self._invoke("receive", call.request_id, call.prefill_peer, call.prompt_ids, call.params,
                                  call.committed, call.feature_layers)

    async def start(self, call: StartCall) -> None:
        await self._invoke("start", call.request_id, call.prompt_ids, call.params, call.prefill_peer)

    async def draft(self, call: ProposeCall) -> Draft:
        return await self._invoke("propose", call)

    async def verify(self, call: VerifyCall) -> VerifyReply:
        return await self._invoke("verify", call)

    async def release(self, request_id: str) -> bool:
        if self.role not in _RELEASE:
            return False
        return await self._invoke(_RELEASE[self.role], request_id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.role!r})"


class RayWorkerClient(_Client):
    """A replica behind a Ray Serve deployment handle (`await handle.method.remote(...)`)."""

    def __init__(self, name: str, role: Role, handle: Any) -> None:
        super().__init__(name, role)
        self.handle = handle

    async def _invoke(self, method: str, *args: Any) -> Any:
        return await getattr(self.handle, method).remote(*args)


class InProcessWorkerClient(_Client):
    """A worker object in this process (`PrefillWorker`, `TargetWorker`, `DrafterWorker`,
    each running the embedded engine's pieces). Blocking methods run in a thread, as in a
    replica; `verify` / `propose` go to the batched implementation with a batch of one
    (`@serve.batch` only runs inside a Serve replica)."""

    _BATCHED = {"verify": "_verify", "propose": "_propose"}

    def __init__(self, name: str, role: Role, worker: Any) -> None:
        super().__init__(name, role)
        self.worker = worker

    async def _invoke(self, method: str, *args: Any) -> Any:
        if method in self._BATCHED:
            batched = getattr(self.worker, self._BATCHED[method])
            (result,) = await asyncio.to_thread(batched, list(args))
            if isinstance(result, Exception):
                raise result
            return result
        fn = getattr(self.worker, method)
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        return await asyncio.to_thread(fn, *args)
