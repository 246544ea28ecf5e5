"""Admission and failover: placing a request on replicas, and placing it again.

`admit` (ADMITTED -> PREFILLED): prefill on a prefill replica, its KV handed off to a target
replica, its features (if the drafter reads them) to a drafter replica; retried while
replicas die or restart, until `recovery_timeout_s`. `recover` (RECOVERING -> RUNNING): free
the request's replicas and re-prefill prompt + the token log on healthy ones; the log, not
local memory, says what the client has been sent, so it sees neither a gap nor a duplicate.
Each phase's status is recorded in Redis as the request enters it (`publish`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.router.context import RouterContext
from services.router.drafter_link import DrafterLink
from services.router.faults import recoverable
from services.router.request import Request
from services.state.redis_state import RequestStatus, StateConflict
from services.workers.messages import PrefillCall, ReceiveCall, StartCall

log = logging.getLogger(__name__)


class Admission:
    def __init__(self, ctx: RouterContext, drafters: DrafterLink) -> None:
        self.ctx, self.drafters = ctx, drafters

    async def admit(self, req: Request) -> None:
        """A new request's admission: PREFILLING in Redis, placed and prefilled, RUNNING."""
        await self.publish(req)  # PREFILLING
        await self._admit_until_deadline(req)
        await self.publish(req)  # RUNNING

    async def recover(self, req: Request) -> None:
        """RECOVERING: free its replicas, re-prefill prompt + the log elsewhere, RUNNING again."""
        await self.release_workers(req)
        req.restarted_from_log(await self.ctx.call_state(self.ctx.state.read_tokens, req.request_id))
        await self.publish(req)  # PREFILLING
        await self._admit_until_deadline(req)
        req.recovered()
        await self.publish(req)  # RUNNING

    async def publish(self, req: Request) -> None:
        """Record the request's phase in the registry (`Phase.status`)."""
        status = req.phase.status
        try:
            await self.ctx.call_state(self.ctx.state.set_status, req.request_id, status)
        except StateConflict:  # already PREFILLING: a request taken over mid-admission
            if status is not RequestStatus.PREFILLING:
                raise

    async def release_workers(self, req: Request) -> None:
        """Free the replicas the request is pinned to (before a re-admission, or at its end)."""
        for name in req.workers_released():
            self.ctx.pools.load[name] -= 1
            await self.ctx.release_quietly(name, req.request_id)

    async def _admit_until_deadline(self, req: Request) -> None:
        """`_admit`, retried while replicas die or restart (e.g. a prefill replica killed
        mid-transfer), until `recovery_timeout_s`."""
        deadline = time.monotonic() + self.ctx.cfg.recovery_timeout_s
        while True:
            try:
                await self._admit(req)
                return
            except Exception as e:
                if not recoverable(e) or time.monotonic() > deadline:
                    raise
                log.info("request %s: admission failed (%s: %s); retrying", req.request_id,
                         type(e).__name__, e)
            await self.release_workers(req)
            await asyncio.sleep(0.5)

    async def _admit(self, req: Request) -> None:
        """Prefill on a prefill replica, KV to a target replica, features to a drafter
        replica. With committed tokens (failover) the prefill covers prompt + committed[:-1]
        and the target resumes with the logged tokens; otherwise the prefill's first token
        starts the output. A drafter that does not answer leaves the request drafter-less
        (plain decoding) unless the prefill must stream features to it."""
        ctx, spec, committed = self.ctx, req.spec, list(req.committed)
        prefill = ctx.pools.pick("prefill")
        req.target_placed(ctx.pools.pick("target", req.avoid))
        ctx.pools.load[req.target] += 1
        pinfo, tinfo = await asyncio.gather(ctx.client(prefill).health(), ctx.client(req.target).health())
        dinfo = await self.drafters.place(req)
        layers = dinfo.feature_layers if dinfo is not None else ()
        tokens = spec.prompt_ids + committed[:-1]
        params = spec.worker_params
        calls = [ctx.client(prefill).prefill(PrefillCall(spec.request_id, tokens, params, tinfo.peer_id,
                                                         dinfo.peer_id if layers else None, layers)),
                 ctx.client(req.target).receive(ReceiveCall(spec.request_id, pinfo.peer_id, spec.prompt_ids,
                                                            params, committed or None, layers))]
        if dinfo is not None:
            start = ctx.client(req.drafter).start(StartCall(spec.request_id, spec.prompt_ids, params,
                                                            pinfo.peer_id if layers else None))
            # A feature-reading drafter must take the prefill's stream: no timeout of our own.
            calls.append(start if layers else asyncio.wait_for(start, ctx.cfg.drafter_timeout_s))
        t0 = time.perf_counter()
        async with ctx.pools.send_lock(prefill):
            # return_exceptions: every side finishes (or times out) before the lock is freed.
            results = await asyncio.gather(*calls, return_exceptions=True)
        for r in results[:2]:
            if isinstance(r, BaseException):
                raise r
        if len(results) > 2 and isinstance(results[2], BaseException):
            if layers or not recoverable(results[2]):
                raise results[2]
            self.drafters.drop(req, results[2])
        pres, received = results[0], results[1]
        req.target_ready(received.max_drafts, received.draft_next)
        ctx.metrics.observe_prefill(time.perf_counter() - t0)
        ctx.metrics.observe_kv_transfer(pres.kv_bytes, pres.transfer_s)
        ctx.metrics.count_tokens("prefill", len(tokens), 0 if committed else 1)
        if not committed:
            req.prefilled(pres)  # its token is committed by the loop, through the stop-string check
