"""The per-request speculative loop, run by the router against remote workers.

    register in Redis -> prefill (KV to the target, features to the drafter) -> first token
    repeat: drafter.propose -> target.verify (batched, library verify+commit)
            -> append committed tokens to the Redis token log -> stream them
            (a round the target's draft gate skips verifies an empty draft, no drafter call)
    finish: free the target's KV slot and the drafter's state, record usage

The token log is the source of truth: a token is streamed only after it is in the log,
and after a replica failure the request is re-prefilled from prompt + logged tokens on a
healthy replica, so the client sees neither a gap nor a duplicate. The registry entry
also holds the prompt ids and sampling parameters (JSON, never pickle), so another router
can continue a request whose router died (`continue_request`, used by Resume).

A failed or slow drafter does not fail the request: it continues as plain decoding (an
empty draft; counted in `dspark:spec_decode_fallback_total`) and, for drafters that read
only token ids, a replacement drafter is attached in the background when one answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import ray.exceptions

from dspark.engine.sequence import finish_reason_of, stop_token_ids
from dspark.engine.stop import TextStream
from dspark.kv.transport import PeerLost, TransferFailed
from dspark.models.tokenizer import Tokenizer
from dspark.spec.logits import TokenLogprob
from dspark.spec.proposer import Draft
from dspark.spec.sampling import SamplingParams
from services.config import FleetConfig
from services.metrics import FleetMetrics
from services.router.errors import RouterError
from services.router.pools import WorkerPools
from services.router.request import DrafterState, Request
from services.router.validate import RequestSpec, params_from_json, params_to_json
from services.state.redis_state import (
    FleetState,
    RequestStatus,
    StateConflict,
    StateUnavailable,
    UnknownRequest,
)
from services.workers.client import WorkerClient
from services.workers.messages import (
    PrefillCall,
    ProposeCall,
    ReceiveCall,
    StartCall,
    StateLost,
    VerifyCall,
    VerifyReply,
    WorkerInfo,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_RECOVERIES = 5  # failovers one request survives before it fails
DRAFTER_RETRY_S = 2.0  # in fallback, how often to try attaching a drafter again
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
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when the request asks

    @property
    def mean_accepted_length(self) -> float:
        # First token comes from prefill; every later one from a target forward (tau).
        steps = self.num_target_forwards
        return (self.completion_tokens - 1) / steps if steps else 0.0


class Router:
    def __init__(self, cfg: FleetConfig, state: FleetState, pools: WorkerPools, tokenizer: Tokenizer,
                 metrics: FleetMetrics, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.cfg, self.state, self.pools, self.tokenizer, self.metrics = cfg, state, pools, tokenizer, metrics
        self.eos_token_ids = tuple(eos_token_ids)  # the target's, to tell a finished log
        self.router_id = uuid.uuid4().hex[:12]  # names this instance in Redis (liveness, ownership)
        self.in_flight = self.waiting = 0
        self._room = asyncio.Condition()  # notified whenever a request ends
        self.num_takeovers = 0  # requests continued here after their router died
        self._background: set[asyncio.Task] = set()

    # -- helpers -----------------------------------------------------------------------------
    async def call_state(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking `FleetState` call, off the event loop; an unreachable store is UNAVAILABLE."""
        try:
            return await asyncio.to_thread(fn, *args)
        except StateUnavailable as e:
            raise RouterError("UNAVAILABLE", f"fleet state store unavailable: {e}") from e

    def _client(self, name: str) -> WorkerClient:
        return self.pools.client(name)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def release_everywhere(self, request_id: str) -> None:
        """Free the request on every target and drafter replica (its router died, so which
        ones hold it is unknown)."""
        names = self.pools.names
        await asyncio.gather(*(self.release_quietly(n, request_id) for n in names["target"] + names["drafter"]))

    async def release_quietly(self, name: str, request_id: str) -> None:
        """Free what replica `name` holds for the request; a failure is only logged (a dead
        replica's state died with it)."""
        try:
            await asyncio.wait_for(self._client(name).release(request_id), 10)
        except Exception as e:
            log.info("release(%s) on %s: %s", request_id, name, e)

    # -- one request ---------------------------------------------------------------------------
    async def generate(self, spec: RequestSpec) -> AsyncIterator[StepEvent]:
        """The request's events. Closing the stream (a client gone) frees its workers and
        records CANCELLED before `aclose()` returns: every generator of the chain closes the
        one it reads (`aclosing`), none is left to the garbage collector to finish later."""
        async with contextlib.aclosing(self._counted(self._generate(spec))) as events:
            async for event in events:
                yield event

    async def continue_request(self, record: Any, committed: list[int]) -> AsyncIterator[StepEvent]:
        """Continue a request whose router died (this router has claimed it): free whatever
        the dead router's replicas still hold, re-prefill prompt + `committed` (the log) on
        healthy replicas and generate the rest. Events start at offset len(committed)."""
        meta = record.meta
        if "prompt_ids" not in meta or "params" not in meta:
            raise RouterError("NOT_FOUND", f"request {record.request_id} cannot be continued")
        block = meta.get("block_size")
        spec = RequestSpec(record.request_id, json.loads(meta["prompt_ids"]), params_from_json(meta["params"]),
                           meta.get("owner", ""), None if block in (None, "") else int(block))
        self.num_takeovers += 1
        self.metrics.observe_recovery(takeover=True)
        await self.release_everywhere(spec.request_id)
        req = Request(spec, self.text_stream(spec.params), committed)
        async with contextlib.aclosing(self._counted(self._drive(req, time.perf_counter()))) as events:
            async for event in events:
                yield event

    def text_stream(self, params: SamplingParams) -> TextStream:
        """The library's stop-string detokenizer for a request (Resume replays through it too)."""
        return TextStream(self.tokenizer, params.stop)

    @staticmethod
    def params_of(meta: dict[str, Any]) -> SamplingParams | None:
        """A registered request's sampling parameters (None for entries without them)."""
        return params_from_json(meta["params"]) if "params" in meta else None

    def capacity(self) -> int:
        """Requests generating at once: the configured limit, and never more than the
        target pool's KV slots (an admission beyond them would fail)."""
        target = self.cfg.pool("target")
        return min(self.cfg.max_in_flight, target.max_batch_size * target.replicas)

    async def _counted(self, events: AsyncIterator[StepEvent]) -> AsyncIterator[StepEvent]:
        """Backpressure: run when there is room, else wait in a bounded queue, else refuse."""
        if self.in_flight >= self.capacity():
            if self.waiting >= self.cfg.max_queued:
                self.metrics.observe_error("RESOURCE_EXHAUSTED")
                raise RouterError("RESOURCE_EXHAUSTED", f"{self.in_flight} requests in flight and "
                                  f"{self.waiting} waiting; retry later")
            self.waiting += 1
            self.metrics.set_queue(self.in_flight, self.waiting)
            try:
                async with self._room:
                    await self._room.wait_for(lambda: self.in_flight < self.capacity())
            finally:
                self.waiting -= 1
        self.in_flight += 1
        self.metrics.set_queue(self.in_flight, self.waiting)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            self.in_flight -= 1
            self.metrics.set_queue(self.in_flight, self.waiting)
            async with self._room:
                self._room.notify()

    def _meta(self, spec: RequestSpec) -> dict[str, Any]:
        """Registry metadata: enough for any router to continue the request (JSON only)."""
        meta = {"prompt_tokens": len(spec.prompt_ids), "model": self.cfg.model, "router": self.router_id,
                "owner": spec.owner, "prompt_ids": json.dumps(spec.prompt_ids),
                "params": params_to_json(spec.params)}
        return meta if spec.block_size is None else {**meta, "block_size": spec.block_size}

    async def _generate(self, spec: RequestSpec) -> AsyncIterator[StepEvent]:
        t0 = time.perf_counter()
        try:
            await self.call_state(self.state.register, spec.request_id, self._meta(spec))
        except StateConflict:
            raise RouterError("ALREADY_EXISTS", f"request {spec.request_id} already exists") from None
        async with contextlib.aclosing(self._drive(Request(spec, self.text_stream(spec.params)), t0)) as events:
            async for event in events:
                yield event

    async def _drive(self, req: Request, t0: float) -> AsyncIterator[StepEvent]:
        """Admission (or re-admission from the log), then speculative steps until done."""
        spec = req.spec
        stamps: list[float] = []
        try:
            if not req.committed:
                await self._publish(req)  # PREFILLING
                await self._admit_until_deadline(req)
                await self._publish(req)  # RUNNING
                pres = req.first
                assert pres is not None
                ev = self._commit(req, [pres.first_token], pres.finish_reason, pres.logprobs)
                await self.call_state(self.state.append_tokens, spec.request_id, 0, ev.token_ids)
                req.first_token_committed(ev.token_ids, ev.finish_reason)
                stamps.append(time.perf_counter())
                yield self._finish_event(req, ev)
            else:  # continuing from the log: the client already has (or replays) those tokens
                reason = self._finished_by_log(req)
                if reason is None:
                    req.taken_over()
                    await self._recover(req)
                else:
                    req.log_ended(reason)
                    yield self._finish_event(req, StepEvent(spec.request_id, len(req.committed), [],
                                                            req.text.flush()))
            while req.generating:
                offset = len(req.committed)
                reply = await self._step(req)
                ev = self._commit(req, reply.tokens, reply.finish_reason, reply.logprobs)
                ev.drafted, ev.accepted, ev.verify_tokens = reply.drafted, reply.accepted, reply.verify_tokens
                await self.call_state(self.state.append_tokens, spec.request_id, offset, ev.token_ids)
                req.step_committed(ev.token_ids, ev.finish_reason)
                stamps.append(time.perf_counter())
                yield self._finish_event(req, ev)
            req.finished()
        except (asyncio.CancelledError, GeneratorExit):
            req.cancelled()
            self.metrics.observe_error("CANCELLED")
            raise
        except RouterError as e:
            req.failed()
            self.metrics.observe_error(e.code)
            raise
        except UnknownRequest:  # its registry entry vanished: Redis restarted without its data
            req.failed()
            self.metrics.observe_error("UNAVAILABLE")
            raise RouterError("UNAVAILABLE", f"the state of request {spec.request_id} was lost "
                              "(state store restarted); retry the request") from None
        except Exception as e:
            req.failed()
            log.exception("request %s failed", spec.request_id)
            self.metrics.observe_error("INTERNAL")
            raise RouterError("INTERNAL", f"request failed: {type(e).__name__}: {e}") from e
        finally:
            # Shielded: a cancelled stream must still free the KV slot and drafter state.
            status, reason = req.outcome()
            await asyncio.shield(self._release(req, status, reason))
            gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            self.metrics.observe_request(stamps[0] - t0 if stamps else None, gaps,
                                         time.perf_counter() - t0, 0.0, reason)

    def _finished_by_log(self, req: Request) -> str | None:
        """The engine's stop rules applied to the log (a router may die after logging the
        last token but before recording the finish); also primes the text stream."""
        p = req.spec.params
        if req.text.push(req.committed).stopped:
            return "stop"
        reason = finish_reason_of(req.committed, stop_token_ids(p, self.eos_token_ids), p.max_new_tokens)
        return None if reason is None else reason.value

    async def _publish(self, req: Request) -> None:
        """Record the request's phase in the registry (`Phase.status`)."""
        status = req.phase.status
        try:
            await self.call_state(self.state.set_status, req.request_id, status)
        except StateConflict:  # already PREFILLING: a request taken over mid-admission
            if status is not RequestStatus.PREFILLING:
                raise

    def _commit(self, req: Request, tokens: list[int], finish_reason: str | None,
                logprobs: list[TokenLogprob] | None) -> StepEvent:
        """A step's tokens as the client sees them: through the library's stop-string check
        (tokens a speculative round accepted past a stop string are dropped, never logged),
        with their text and log-probs. The event's finish reason ends the output once the
        tokens are logged (`Request.*_committed`)."""
        delta = req.text.push(tokens)
        tokens = list(tokens[: delta.num_tokens])
        finish_reason = "stop" if delta.stopped else finish_reason
        text = delta.text + (req.text.flush() if finish_reason else "")
        return StepEvent(req.request_id, len(req.committed), tokens, text, finish_reason=finish_reason,
                         logprobs=None if logprobs is None else list(logprobs[: len(tokens)]))

    def _finish_event(self, req: Request, ev: StepEvent) -> StepEvent:
        """The last event of a request carries its totals."""
        if req.finish_reason:
            ev.finish_reason = req.finish_reason
            ev.num_target_forwards = req.num_forwards
            ev.prompt_tokens, ev.completion_tokens = len(req.spec.prompt_ids), len(req.committed)
        return ev

    # -- admission and failover ------------------------------------------------------------------
    async def _admit(self, req: Request) -> None:
        """Prefill on a prefill replica, KV to a target replica, features to a drafter
        replica. With committed tokens (failover) the prefill covers prompt + committed[:-1]
        and the target resumes with the logged tokens; otherwise the prefill's first token
        starts the output. A drafter that does not answer leaves the request drafter-less
        (plain decoding) unless the prefill must stream features to it."""
        spec, committed = req.spec, list(req.committed)
        prefill = self.pools.pick("prefill")
        req.target_placed(self.pools.pick("target", req.avoid))
        self.pools.load[req.target] += 1
        pinfo, tinfo = await asyncio.gather(self._client(prefill).health(), self._client(req.target).health())
        dinfo = await self._drafter_info(req)
        layers = dinfo.feature_layers if dinfo is not None else ()
        tokens = spec.prompt_ids + committed[:-1]
        params = spec.worker_params
        calls = [self._client(prefill).prefill(PrefillCall(spec.request_id, tokens, params, tinfo.peer_id,
                                                           dinfo.peer_id if layers else None, layers)),
                 self._client(req.target).receive(ReceiveCall(spec.request_id, pinfo.peer_id, spec.prompt_ids,
                                                              params, committed or None, layers))]
        if dinfo is not None:
            start = self._client(req.drafter).start(StartCall(spec.request_id, spec.prompt_ids, params,
                                                              pinfo.peer_id if layers else None))
            # A feature-reading drafter must take the prefill's stream: no timeout of our own.
            calls.append(start if layers else asyncio.wait_for(start, self.cfg.drafter_timeout_s))
        t0 = time.perf_counter()
        async with self.pools.send_lock(prefill):
            # return_exceptions: every side finishes (or times out) before the lock is freed.
            results = await asyncio.gather(*calls, return_exceptions=True)
        for r in results[:2]:
            if isinstance(r, BaseException):
                raise r
        if len(results) > 2 and isinstance(results[2], BaseException):
            if layers or not _recoverable(results[2]):
                raise results[2]
            self._drop_drafter(req, results[2])
        pres, received = results[0], results[1]
        req.target_ready(received.max_drafts, received.draft_next)
        self.metrics.observe_prefill(time.perf_counter() - t0)
        self.metrics.observe_kv_transfer(pres.kv_bytes, pres.transfer_s)
        self.metrics.count_tokens("prefill", len(tokens), 0 if committed else 1)
        if not committed:
            req.prefilled(pres)  # its token is committed by _drive, through the stop-string check

    async def _admit_until_deadline(self, req: Request) -> None:
        """`_admit`, retried while replicas die or restart (e.g. a prefill replica killed
        mid-transfer), until `recovery_timeout_s`."""
        deadline = time.monotonic() + self.cfg.recovery_timeout_s
        while True:
            try:
                await self._admit(req)
                return
            except Exception as e:
                if not _recoverable(e) or time.monotonic() > deadline:
                    raise
                log.info("request %s: admission failed (%s: %s); retrying", req.request_id,
                         type(e).__name__, e)
            await self._release_workers(req)
            await asyncio.sleep(0.5)

    # -- the drafter: optional, by design ------------------------------------------------------
    async def _drafter_info(self, req: Request) -> WorkerInfo | None:
        req.drafter_placed(self.pools.pick("drafter", req.avoid))
        self.pools.load[req.drafter] += 1
        try:
            info = await asyncio.wait_for(self._client(req.drafter).health(), self.cfg.drafter_timeout_s)
        except Exception as e:
            if not _recoverable(e):
                raise
            self._drop_drafter(req, e)
            return None
        req.drafter_answered(info)
        return info

    def _drop_drafter(self, req: Request, error: BaseException) -> None:
        """Continue without a drafter (plain decoding); its state is freed in the background
        so a dead replica cannot stall the request."""
        log.warning("request %s: drafter %s failed (%s: %s); continuing without drafts",
                    req.request_id, req.drafter, type(error).__name__, error)
        name = req.drafter_lost(time.monotonic() + DRAFTER_RETRY_S)
        self.pools.load[name] -= 1
        self._spawn(self.release_quietly(name, req.request_id))

    def _maybe_attach_drafter(self, req: Request) -> None:
        """In fallback, try a drafter again now and then. Only drafters that read token ids
        alone can join mid-request; one that reads target features would need the whole
        context's features (a re-prefill) and stays off for this request."""
        if req.drafter_state is not DrafterState.FALLBACK or req.attach is not None \
                or time.monotonic() < req.retry_at:
            return
        if req.drafter_info is not None and req.drafter_info.feature_layers:
            return
        req.attach_started(asyncio.ensure_future(self._attach_drafter(req)))

    async def _attach_drafter(self, req: Request) -> None:
        name = self.pools.pick("drafter", req.avoid)
        spec, started = req.spec, False
        try:
            info = await asyncio.wait_for(self._client(name).health(), self.cfg.drafter_timeout_s)
            if info.feature_layers:
                req.drafter_refused(info)  # stays in fallback: see _maybe_attach_drafter
                return
            started = True
            await asyncio.wait_for(self._client(name).start(StartCall(spec.request_id, spec.prompt_ids,
                                                                      spec.worker_params)),
                                   self.cfg.drafter_timeout_s)
        except asyncio.CancelledError:
            if started:
                self._spawn(self.release_quietly(name, spec.request_id))
            raise
        except Exception as e:
            log.info("request %s: drafter %s still unavailable: %s", spec.request_id, name, e)
            req.attach_failed(time.monotonic() + DRAFTER_RETRY_S)
            return
        finally:
            req.attach_ended()
        req.drafter_attached(name, info)
        self.pools.load[name] += 1
        log.info("request %s: drafter %s attached; speculating again", spec.request_id, name)

    # -- steps and failover ----------------------------------------------------------------------
    async def _step(self, req: Request) -> VerifyReply:
        for attempt in range(MAX_RECOVERIES + 1):
            try:
                return await self._draft_and_verify(req)
            except Exception as e:
                if not _recoverable(e) or attempt == MAX_RECOVERIES:
                    raise
                log.warning("request %s: replica failed (%s: %s); re-prefilling", req.request_id,
                            type(e).__name__, e)
                self.metrics.observe_recovery()
            req.target_lost()
            await self._recover(req)
        raise AssertionError("unreachable")

    async def _propose(self, req: Request) -> Draft | None:
        """The drafter's proposal; None when the round runs without one (plain decoding):
        no drafter, no room for drafts, or the target's draft gate skips the round (a gated
        round is no fallback: the drafter is there, and its features keep accumulating)."""
        speculating = self.cfg.method != "ar" and self.cfg.block_size > 0
        if not req.drafter and speculating:
            self._maybe_attach_drafter(req)
        info = req.drafter_info
        if req.drafter and info is not None and info.has_proposer and req.max_drafts > 0 and req.draft_next:
            try:
                return await asyncio.wait_for(self._client(req.drafter).draft(ProposeCall(
                    req.request_id, req.spec.prompt_ids + req.committed, req.max_drafts,
                    req.take_features())), self.cfg.drafter_timeout_s)
            except Exception as e:
                if not _recoverable(e):
                    raise
                self._drop_drafter(req, e)
        if not req.drafter and speculating:
            self.metrics.observe_fallback(1)
        return None

    async def _draft_and_verify(self, req: Request) -> VerifyReply:
        t0 = time.perf_counter()
        draft = await self._propose(req)
        t1 = time.perf_counter()
        # The drafter's time goes with the call: the target's draft gate weighs it as the
        # embedded engine weighs its proposer's. A failed verify is the target lost (`_step`).
        call = VerifyCall(req.request_id, Draft([]) if draft is None else draft,
                          None if draft is None else t1 - t0)
        reply = await self._client(req.target).verify(call)
        req.verified(reply)
        self.metrics.observe_step({
            "drafted": reply.drafted, "accepted": reply.accepted,
            "accepted_per_position": [1] * reply.accepted + [0] * (reply.drafted - reply.accepted),
            "verify_tokens": reply.verify_tokens, "propose_seconds": t1 - t0,
            "verify_seconds": time.perf_counter() - t1})
        self.metrics.count_tokens("target", 0, len(reply.tokens))
        return reply

    async def _recover(self, req: Request) -> None:
        """RECOVERING: free its replicas, re-prefill prompt + the log elsewhere, RUNNING again."""
        await self._release_workers(req)
        req.restarted_from_log(await self.call_state(self.state.read_tokens, req.request_id))
        await self._publish(req)  # PREFILLING
        await self._admit_until_deadline(req)
        req.recovered()
        await self._publish(req)  # RUNNING

    # -- release -------------------------------------------------------------------------------
    async def _release_workers(self, req: Request) -> None:
        for name in req.workers_released():
            self.pools.load[name] -= 1
            await self.release_quietly(name, req.request_id)

    async def _release(self, req: Request, status: RequestStatus, reason: str) -> None:
        await self._release_workers(req)
        try:
            await asyncio.to_thread(self.state.set_status, req.request_id, status,
                                    {"finish_reason": reason, "completion_tokens": len(req.committed)})
        except Exception as e:  # Redis down or the entry gone: the TTL cleans up
            log.info("final status of %s not recorded: %s", req.request_id, e)


def _recoverable(e: BaseException) -> bool:
    if isinstance(e, RECOVERABLE):
        return True
    cause = getattr(e, "cause", None)
    return isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, RECOVERABLE)
