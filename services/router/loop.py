"""The per-request speculative loop, run by the router against remote workers.

    register in Redis -> admit (prefill, KV to the target, features to the drafter) -> first token
    repeat: drafter.propose -> target.verify (batched, library verify+commit)
            -> append committed tokens to the Redis token log -> stream them
            (a round the target's draft gate skips verifies an empty draft, no drafter call)
    finish: free the target's KV slot and the drafter's state, record usage

The token log is the source of truth: a token is streamed only after it is in the log,
and after a replica failure the request is re-prefilled from prompt + logged tokens on a
healthy replica, so the client sees neither a gap nor a duplicate. The registry entry
also holds the prompt ids and sampling parameters (JSON, never pickle), so another router
can continue a request whose router died (`continue_request`, used by Resume).

`Router` is the orchestrator of one request's loop; each other idea has its module:

    request.py       the request's state machine (phases, drafter sub-state, transitions)
    admission.py     admission and failover: prefill, KV hand-off, re-prefill from the log
    drafter_link.py  the optional drafter: drop to plain rounds, re-attach in the background
    backpressure.py  how many requests run at once, the bounded queue, refusal
    faults.py        which worker failures a request survives
    context.py       what they share: config, Redis, worker pools, metrics, background tasks
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

from dspark.engine.sequence import finish_reason_of, stop_token_ids
from dspark.engine.stop import TextStream
from dspark.models.tokenizer import Tokenizer
from dspark.spec.logits import TokenLogprob
from dspark.spec.proposer import Draft
from dspark.spec.sampling import SamplingParams
from services.config import FleetConfig
from services.metrics import FleetMetrics
from services.router.admission import Admission
from services.router.backpressure import Backpressure
from services.router.context import RouterContext
from services.router.drafter_link import DrafterLink
from services.router.errors import RouterError
from services.router.faults import recoverable
from services.router.pools import WorkerPools
from services.router.request import Request
from services.router.validate import RequestSpec, params_from_json, params_to_json
from services.state.redis_state import FleetState, RequestStatus, StateConflict, UnknownRequest
from services.workers.messages import VerifyCall, VerifyReply

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_RECOVERIES = 5  # failovers one request survives before it fails


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
        self.ctx = RouterContext(cfg, state, pools, metrics)
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)  # the target's, to tell a finished log
        self.router_id = uuid.uuid4().hex[:12]  # names this instance in Redis (liveness, ownership)
        self.num_takeovers = 0  # requests continued here after their router died
        self.backpressure = Backpressure(self.ctx)
        self.drafters = DrafterLink(self.ctx)
        self.admission = Admission(self.ctx, self.drafters)

    # -- shared state --------------------------------------------------------------------------
    @property
    def cfg(self) -> FleetConfig:
        return self.ctx.cfg

    @cfg.setter
    def cfg(self, cfg: FleetConfig) -> None:  # a swapped config reaches every part
        self.ctx.cfg = cfg

    @property
    def state(self) -> FleetState:
        return self.ctx.state

    @property
    def pools(self) -> WorkerPools:
        return self.ctx.pools

    @property
    def metrics(self) -> FleetMetrics:
        return self.ctx.metrics

    @property
    def in_flight(self) -> int:
        return self.backpressure.in_flight

    @property
    def waiting(self) -> int:
        return self.backpressure.waiting

    def capacity(self) -> int:
        return self.backpressure.capacity()

    async def call_state(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking `FleetState` call, off the event loop; an unreachable store is UNAVAILABLE."""
        return await self.ctx.call_state(fn, *args)

    async def release_quietly(self, name: str, request_id: str) -> None:
        await self.ctx.release_quietly(name, request_id)

    async def release_everywhere(self, request_id: str) -> None:
        """Free the request on every target and drafter replica (its router died, so which
        ones hold it is unknown)."""
        names = self.pools.names
        await asyncio.gather(*(self.release_quietly(n, request_id) for n in names["target"] + names["drafter"]))

    def text_stream(self, params: SamplingParams) -> TextStream:
        """The library's stop-string detokenizer for a request (Resume replays through it too)."""
        return TextStream(self.tokenizer, params.stop)

    @staticmethod
    def params_of(meta: dict[str, Any]) -> SamplingParams | None:
        """A registered request's sampling parameters (None for entries without them)."""
        return params_from_json(meta["params"]) if "params" in meta else None

    # -- one request ---------------------------------------------------------------------------
    async def generate(self, spec: RequestSpec) -> AsyncIterator[StepEvent]:
        """The request's events. Closing the stream (a client gone) frees its workers and
        records CANCELLED before `aclose()` returns: every generator of the chain closes the
        one it reads (`aclosing`), none is left to the garbage collector to finish later."""
        async with contextlib.aclosing(self.backpressure.counted(self._generate(spec))) as events:
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
        async with contextlib.aclosing(self.backpressure.counted(self._drive(req, time.perf_counter()))) as events:
            async for event in events:
                yield event

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
                await self.admission.admit(req)  # ADMITTED -> PREFILLED
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
                    await self.admission.recover(req)
                else:
                    req.log_ended(reason)
                    yield self._finish_event(req, StepEvent(spec.request_id, len(req.committed), [],
                                                            req.text.flush()))
            while req.generating:
                offset = len(req.committed)
                reply = await self._step(req)
                r = reply.round
                ev = self._commit(req, r.tokens, reply.finish_reason, r.logprobs)
                ev.drafted, ev.accepted, ev.verify_tokens = r.drafted, r.accepted, r.verify_tokens
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

    # -- rounds --------------------------------------------------------------------------------
    async def _step(self, req: Request) -> VerifyReply:
        """One round; a lost target is recovered from the log and the round run again."""
        for attempt in range(MAX_RECOVERIES + 1):
            try:
                return await self._draft_and_verify(req)
            except Exception as e:
                if not recoverable(e) or attempt == MAX_RECOVERIES:
                    raise
                log.warning("request %s: replica failed (%s: %s); re-prefilling", req.request_id,
                            type(e).__name__, e)
                self.metrics.observe_recovery()
            req.target_lost()
            await self.admission.recover(req)
        raise AssertionError("unreachable")

    async def _draft_and_verify(self, req: Request) -> VerifyReply:
        """Propose (or not), verify on the request's target, record the round's metrics."""
        t0 = time.perf_counter()
        draft = await self.drafters.propose(req)
        t1 = time.perf_counter()
        # The drafter's time goes with the call: the target's draft gate weighs it as the
        # embedded engine weighs its proposer's. A failed verify is the target lost (`_step`).
        call = VerifyCall(req.request_id, Draft([]) if draft is None else draft,
                          None if draft is None else t1 - t0)
        reply = await self.ctx.client(req.target).verify(call)
        req.verified(reply)
        r = reply.round
        self.metrics.observe_step({
            "drafted": r.drafted, "accepted": r.accepted,
            "accepted_per_position": [1] * r.accepted + [0] * (r.drafted - r.accepted),
            "verify_tokens": r.verify_tokens, "propose_seconds": t1 - t0,
            "verify_seconds": time.perf_counter() - t1})
        self.metrics.count_tokens("target", 0, len(r.tokens))
        return reply

    # -- the end ---------------------------------------------------------------------------------
    async def _release(self, req: Request, status: RequestStatus, reason: str) -> None:
        await self.admission.release_workers(req)
        try:
            await asyncio.to_thread(self.state.set_status, req.request_id, status,
                                    {"finish_reason": reason, "completion_tokens": len(req.committed)})
        except Exception as e:  # Redis down or the entry gone: the TTL cleans up
            log.info("final status of %s not recorded: %s", req.request_id, e)
