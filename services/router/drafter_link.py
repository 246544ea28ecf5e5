"""The request's drafter: optional, by design.

Admission places a drafter replica (`place`); a drafter that fails or is slow is dropped
(`drop`: the request goes on with plain rounds, an empty draft each, counted in
`dspark:spec_decode_fallback_total`, and the replica's state is freed in the background so a
dead one cannot stall it). In fallback, a replacement is attached in the background now and
then (`propose` -> `_maybe_attach`), for drafters that read token ids only; one that reads
target features would need the whole context's features and stays off for the request.
The transitions are `Request`'s drafter sub-state: NONE -> ATTACHED -> FALLBACK -> ATTACHED.
"""

from __future__ import annotations

import asyncio
import logging
import time

from dspark.spec.proposer import Draft
from services.router.context import RouterContext
from services.router.faults import recoverable
from services.router.request import DrafterState, Request
from services.workers.messages import ProposeCall, StartCall, WorkerInfo

log = logging.getLogger(__name__)
DRAFTER_RETRY_S = 2.0  # in fallback, how often to try attaching a drafter again


class DrafterLink:
    def __init__(self, ctx: RouterContext) -> None:
        self.ctx = ctx

    async def place(self, req: Request) -> WorkerInfo | None:
        """Pin a drafter replica and ask its health; None (and fallback) if it does not answer."""
        req.drafter_placed(self.ctx.pools.pick("drafter", req.avoid))
        self.ctx.pools.load[req.drafter] += 1
        try:
            info = await asyncio.wait_for(self.ctx.client(req.drafter).health(), self.ctx.cfg.drafter_timeout_s)
        except Exception as e:
            if not recoverable(e):
                raise
            self.drop(req, e)
            return None
        req.drafter_answered(info)
        return info

    def drop(self, req: Request, error: BaseException) -> None:
        """Continue without a drafter (plain decoding); its state is freed in the background
        so a dead replica cannot stall the request."""
        log.warning("request %s: drafter %s failed (%s: %s); continuing without drafts",
                    req.request_id, req.drafter, type(error).__name__, error)
        name = req.drafter_lost(time.monotonic() + DRAFTER_RETRY_S)
        self.ctx.pools.load[name] -= 1
        self.ctx.spawn(self.ctx.release_quietly(name, req.request_id))

    async def propose(self, req: Request) -> Draft | None:
        """The drafter's proposal; None when the round runs without one (plain decoding):
        no drafter, no room for drafts, or the target's draft gate skips the round (a gated
        round is no fallback: the drafter is there, and its features keep accumulating)."""
        cfg = self.ctx.cfg
        speculating = cfg.method != "ar" and cfg.block_size > 0
        if not req.drafter and speculating:
            self._maybe_attach(req)
        info = req.drafter_info
        if req.drafter and info is not None and info.has_proposer and req.max_drafts > 0 and req.draft_next:
            try:
                return await asyncio.wait_for(self.ctx.client(req.drafter).draft(ProposeCall(
                    req.request_id, req.spec.prompt_ids + req.committed, req.max_drafts,
                    req.take_features())), cfg.drafter_timeout_s)
            except Exception as e:
                if not recoverable(e):
                    raise
                self.drop(req, e)
        if not req.drafter and speculating:
            self.ctx.metrics.observe_fallback(1)
        return None

    def _maybe_attach(self, req: Request) -> None:
        """In fallback, try a drafter again now and then. Only drafters that read token ids
        alone can join mid-request; one that reads target features would need the whole
        context's features (a re-prefill) and stays off for this request."""
        if req.drafter_state is not DrafterState.FALLBACK or req.attach is not None \
                or time.monotonic() < req.retry_at:
            return
        if req.drafter_info is not None and req.drafter_info.feature_layers:
            return
        req.attach_started(asyncio.ensure_future(self._attach(req)))

    async def _attach(self, req: Request) -> None:
        name = self.ctx.pools.pick("drafter", req.avoid)
        spec, started, timeout = req.spec, False, self.ctx.cfg.drafter_timeout_s
        try:
            info = await asyncio.wait_for(self.ctx.client(name).health(), timeout)
            if info.feature_layers:
                req.drafter_refused(info)  # stays in fallback: see _maybe_attach
                return
            started = True
            await asyncio.wait_for(self.ctx.client(name).start(StartCall(spec.request_id, spec.prompt_ids,
                                                                         spec.worker_params)), timeout)
        except asyncio.CancelledError:
            if started:
                self.ctx.spawn(self.ctx.release_quietly(name, spec.request_id))
            raise
        except Exception as e:
            log.info("request %s: drafter %s still unavailable: %s", spec.request_id, name, e)
            req.attach_failed(time.monotonic() + DRAFTER_RETRY_S)
            return
        finally:
            req.attach_ended()
        req.drafter_attached(name, info)
        self.ctx.pools.load[name] += 1
        log.info("request %s: drafter %s attached; speculating again", spec.request_id, name)
