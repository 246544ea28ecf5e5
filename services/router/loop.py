"""The per-request speculative loop, run by the router against remote workers.

    register in Redis -> prefill (KV to the target, features to the drafter) -> first token
    repeat: drafter.propose -> target.verify (batched, library verify+commit)
            -> append committed tokens to the Redis token log -> stream them
    finish: free the target's KV slot and the drafter's state, record usage

The token log is the source of truth: a token is streamed only after it is in the log,
and after a replica failure the request is re-prefilled from prompt + logged tokens on a
healthy replica, so the client sees neither a gap nor a duplicate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import ray.exceptions

from dspark.kv.transport import PeerLost, TransferFailed
from dspark.models.tokenizer import Tokenizer
from dspark.spec.proposer import Draft
from services.config import FleetConfig
from services.metrics import FleetMetrics
from services.router.errors import RouterError
from services.router.pools import WorkerPools
from services.router.validate import RequestSpec
from services.state.redis_state import (
    FleetState,
    RequestStatus,
    StateConflict,
    StateUnavailable,
)
from services.workers.messages import ProposeCall, StateLost, VerifyCall, VerifyReply, WorkerInfo

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_RECOVERIES = 5  # failovers one request survives before it fails
# A replica died, restarted (its state is gone) or a KV hand-off broke: re-prefill elsewhere.
RECOVERABLE = (ray.exceptions.RayActorError, StateLost, PeerLost, TransferFailed, TimeoutError,
               ConnectionError)


@dataclasses.dataclass
class StepEvent:
    request_id: str
    offset: int  # index of token_ids[0] in the output
    token_ids: list[int]
    text: str = ""
    drafted: int = 0
    accepted: int = 0
    verify_tokens: int = 0
    finish_reason: str | None = None  # stop | length | abort, on the last event
    num_target_forwards: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def mean_accepted_length(self) -> float:
        # First token comes from prefill; every later one from a target forward (tau).
        steps = self.num_target_forwards
        return (self.completion_tokens - 1) / steps if steps else 0.0


@dataclasses.dataclass
class _Job:
    spec: RequestSpec
    committed: list[int] = dataclasses.field(default_factory=list)
    target: str = ""
    drafter: str = ""
    drafter_info: WorkerInfo | None = None
    max_drafts: int = 0
    features: Any = None  # tapped target features not yet handed to the drafter
    avoid: set[str] = dataclasses.field(default_factory=set)
    num_forwards: int = 0
    finish_reason: str | None = None


class Router:
    def __init__(self, cfg: FleetConfig, state: FleetState, pools: WorkerPools, tokenizer: Tokenizer,
                 metrics: FleetMetrics) -> None:
        self.cfg, self.state, self.pools, self.tokenizer, self.metrics = cfg, state, pools, tokenizer, metrics
        self.in_flight = 0

    # -- helpers -----------------------------------------------------------------------------
    async def _redis(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except StateUnavailable as e:
            raise RouterError("UNAVAILABLE", f"fleet state store unavailable: {e}") from e

    async def _call(self, name: str, method: str, *args: Any) -> Any:
        return await getattr(self.pools.handle(name), method).remote(*args)

    # -- one request ---------------------------------------------------------------------------
    async def generate(self, spec: RequestSpec) -> AsyncIterator[StepEvent]:
        if self.in_flight >= self.cfg.max_in_flight:
            self.metrics.observe_error("RESOURCE_EXHAUSTED")
            raise RouterError("RESOURCE_EXHAUSTED", f"{self.in_flight} requests in flight; retry later")
        self.in_flight += 1
        self.metrics.set_queue(self.in_flight, 0)
        try:
            async for event in self._generate(spec):
                yield event
        finally:
            self.in_flight -= 1
            self.metrics.set_queue(self.in_flight, 0)

    async def _generate(self, spec: RequestSpec) -> AsyncIterator[StepEvent]:
        t0 = time.perf_counter()
        try:
            await self._redis(self.state.register, spec.request_id,
                              {"prompt_tokens": len(spec.prompt_ids), "model": self.cfg.model})
        except StateConflict:
            raise RouterError("ALREADY_EXISTS", f"request {spec.request_id} is already running") from None
        job, decoder = _Job(spec), self.tokenizer.stream_decoder()
        stamps: list[float] = []
        status, reason = RequestStatus.FAILED, "error"
        try:
            await self._redis(self.state.set_status, spec.request_id, RequestStatus.PREFILLING)
            await self._admit(job)
            await self._redis(self.state.set_status, spec.request_id, RequestStatus.RUNNING)
            first = job.committed[:]
            await self._redis(self.state.append_tokens, spec.request_id, 0, first)
            stamps.append(time.perf_counter())
            yield self._event(job, 0, first, decoder, StepEvent(spec.request_id, 0, []))
            while job.finish_reason is None:
                offset = len(job.committed)
                reply = await self._step(job)
                await self._redis(self.state.append_tokens, spec.request_id, offset, reply.tokens)
                job.committed += reply.tokens
                job.num_forwards += 1
                job.finish_reason = reply.finish_reason
                stamps.append(time.perf_counter())
                yield self._event(job, offset, reply.tokens, decoder, StepEvent(
                    spec.request_id, offset, [], drafted=reply.drafted, accepted=reply.accepted,
                    verify_tokens=reply.verify_tokens))
            status, reason = RequestStatus.FINISHED, job.finish_reason
        except (asyncio.CancelledError, GeneratorExit):
            status, reason = RequestStatus.CANCELLED, "abort"
            raise
        except RouterError as e:
            self.metrics.observe_error(e.code)
            raise
        except Exception as e:
            log.exception("request %s failed", spec.request_id)
            self.metrics.observe_error("INTERNAL")
            raise RouterError("INTERNAL", f"request failed: {type(e).__name__}: {e}") from e
        finally:
            # Shielded: a cancelled stream must still free the KV slot and drafter state.
            await asyncio.shield(self._release(job, status, reason))
            gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            self.metrics.observe_request(stamps[0] - t0 if stamps else None, gaps,
                                         time.perf_counter() - t0, 0.0, reason)

    def _event(self, job: _Job, offset: int, tokens: list[int], decoder: Any, ev: StepEvent) -> StepEvent:
        ev.offset, ev.token_ids = offset, list(tokens)
        ev.text = decoder.push(tokens) + (decoder.flush() if job.finish_reason else "")
        if job.finish_reason:
            ev.finish_reason = job.finish_reason
            ev.num_target_forwards = job.num_forwards
            ev.prompt_tokens, ev.completion_tokens = len(job.spec.prompt_ids), len(job.committed)
        return ev

    # -- admission and failover ------------------------------------------------------------------
    async def _admit(self, job: _Job) -> None:
        """Prefill on a prefill replica, KV to a target replica, features to a drafter
        replica. With committed tokens (failover) the prefill covers prompt + committed[:-1]
        and the target resumes with the logged tokens; otherwise the prefill's first token
        starts the output."""
        spec, committed = job.spec, list(job.committed)
        prefill = self.pools.pick("prefill")
        job.target = self.pools.pick("target", job.avoid)
        job.drafter = self.pools.pick("drafter", job.avoid)
        self.pools.load[job.target] += 1
        self.pools.load[job.drafter] += 1
        pinfo, tinfo, dinfo = await asyncio.gather(
            self._call(prefill, "info"), self._call(job.target, "info"), self._call(job.drafter, "info"))
        job.drafter_info = dinfo
        layers = dinfo.feature_layers
        tokens = spec.prompt_ids + committed[:-1]
        t0 = time.perf_counter()
        async with self.pools.send_lock(prefill):
            # return_exceptions: every side finishes (or times out) before the lock is freed.
            results = await asyncio.gather(
                self._call(prefill, "prefill", spec.request_id, tokens, spec.params, tinfo.peer_id,
                           dinfo.peer_id if layers else None, layers),
                self._call(job.target, "receive", spec.request_id, pinfo.peer_id, spec.prompt_ids,
                           spec.params, committed or None, layers),
                self._call(job.drafter, "start", spec.request_id, spec.prompt_ids, spec.params,
                           pinfo.peer_id if layers else None),
                return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        pres, job.max_drafts, _ = results
        self.metrics.observe_prefill(time.perf_counter() - t0)
        self.metrics.observe_kv_transfer(pres.kv_bytes, pres.transfer_s)
        self.metrics.count_tokens("prefill", len(tokens), 0 if committed else 1)
        if not committed:
            job.committed = [pres.first_token]
            job.finish_reason = pres.finish_reason

    async def _step(self, job: _Job) -> VerifyReply:
        for attempt in range(MAX_RECOVERIES + 1):
            try:
                return await self._draft_and_verify(job)
            except Exception as e:
                if not _recoverable(e) or attempt == MAX_RECOVERIES:
                    raise
                log.warning("request %s: replica failed (%s: %s); re-prefilling", job.spec.request_id,
                            type(e).__name__, e)
            await self._recover(job)
        raise AssertionError("unreachable")

    async def _draft_and_verify(self, job: _Job) -> VerifyReply:
        t0 = time.perf_counter()
        draft = Draft([])
        if job.drafter_info is not None and job.drafter_info.has_proposer and job.max_drafts > 0:
            try:
                draft = await self._call(job.drafter, "propose", ProposeCall(
                    job.spec.request_id, job.spec.prompt_ids + job.committed, job.max_drafts, job.features))
            except Exception:
                job.avoid = {job.drafter}
                raise
            job.features = None
        t1 = time.perf_counter()
        try:
            reply: VerifyReply = await self._call(job.target, "verify", VerifyCall(job.spec.request_id, draft))
        except Exception:
            job.avoid = {job.target}
            raise
        job.max_drafts, job.features = reply.max_drafts, reply.features
        self.metrics.observe_step({
            "drafted": reply.drafted, "accepted": reply.accepted,
            "accepted_per_position": [1] * reply.accepted + [0] * (reply.drafted - reply.accepted),
            "verify_tokens": reply.verify_tokens, "propose_seconds": t1 - t0,
            "verify_seconds": time.perf_counter() - t1})
        self.metrics.count_tokens("target", 0, len(reply.tokens))
        return reply

    async def _recover(self, job: _Job) -> None:
        deadline = time.monotonic() + self.cfg.recovery_timeout_s
        await self._release_workers(job)
        # The log, not local memory, says what the client has been sent.
        job.committed = await self._redis(self.state.read_tokens, job.spec.request_id)
        job.features = None
        await self._redis(self.state.set_status, job.spec.request_id, RequestStatus.PREFILLING)
        while True:
            try:
                await self._admit(job)
                break
            except Exception as e:
                if not _recoverable(e) or time.monotonic() > deadline:
                    raise
                log.info("request %s: re-prefill failed (%s); retrying", job.spec.request_id, e)
                await asyncio.sleep(0.5)
        await self._redis(self.state.set_status, job.spec.request_id, RequestStatus.RUNNING)

    # -- release -------------------------------------------------------------------------------
    async def _release_workers(self, job: _Job) -> None:
        for name, method in ((job.target, "free"), (job.drafter, "finish")):
            if not name:
                continue
            self.pools.load[name] -= 1
            try:
                await asyncio.wait_for(self._call(name, method, job.spec.request_id), 10)
            except Exception as e:  # a dead replica's state died with it
                log.info("freeing %s on %s: %s", job.spec.request_id, name, e)
        job.target = job.drafter = ""

    async def _release(self, job: _Job, status: RequestStatus, reason: str) -> None:
        await self._release_workers(job)
        try:
            await asyncio.to_thread(self.state.set_status, job.spec.request_id, status,
                                    {"finish_reason": reason, "completion_tokens": len(job.committed)})
        except Exception as e:  # Redis down or the entry gone: the TTL cleans up
            log.info("final status of %s not recorded: %s", job.spec.request_id, e)


def _recoverable(e: BaseException) -> bool:
    if isinstance(e, RECOVERABLE):
        return True
    cause = getattr(e, "cause", None)
    return isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, RECOVERABLE)
