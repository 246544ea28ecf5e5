"""Resume and takeover: what makes a router restart survivable.

Every router refreshes a liveness key in Redis (`heartbeat`) and names itself in each
request it drives. `Resume(request_id, offset)` replays the token log from `offset` and
follows it while the request's router is alive. When that router is dead (its key expired)
the resuming router claims the request (atomically, so one router wins) and continues it
from the log: re-prefill prompt + committed tokens on healthy replicas, then generate the
rest. The client gets every token exactly once, whichever router it reaches.

Requests orphaned by a dead router that nobody resumes within `ORPHAN_GRACE_S` are reaped:
their worker state is freed and they end FAILED (a late Resume still replays the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from dspark.spec.sampling import SamplingParams
from services.router.errors import RouterError
from services.router.loop import Router, StepEvent
from services.router.validate import MAX_REQUEST_ID_LEN, invalid
from services.state.redis_state import RequestStatus, StateConflict, StateUnavailable, UnknownRequest

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0
ROUTER_TTL_S = 5.0  # a router silent this long is dead
RESUME_POLL_S = 0.05
SWEEP_EVERY = 10  # heartbeats between orphan sweeps
ORPHAN_GRACE_S = 60.0  # how long an orphan waits for a Resume before it is reaped


class Continuity:
    def __init__(self, router: Router) -> None:
        self.router, self.state = router, router.state
        self._task: asyncio.Task | None = None
        self._orphan_since: dict[str, float] = {}

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._beat())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _beat(self) -> None:
        for n in range(1 << 62):
            try:
                await asyncio.to_thread(self.state.heartbeat, self.router.router_id, ROUTER_TTL_S)
                if n % SWEEP_EVERY == SWEEP_EVERY - 1:
                    await self._sweep()
            except StateUnavailable as e:
                log.info("heartbeat: %s", e)
            except Exception:  # the heartbeat must outlive any one bad sweep
                log.exception("router heartbeat")
            await asyncio.sleep(HEARTBEAT_S)

    async def _alive(self, router_id: str) -> bool:
        if router_id == self.router.router_id:
            return True
        return await self.router.call_state(self.state.router_alive, router_id)

    # -- Resume ----------------------------------------------------------------------------
    async def resume(self, request_id: str, offset: int, owner: str) -> AsyncIterator[StepEvent]:
        """Events from `offset` on: the log's tokens, then (after a takeover) new ones."""
        if offset < 0:
            raise invalid("offset must be >= 0", "offset")
        if not request_id or len(request_id) > MAX_REQUEST_ID_LEN or not request_id.isprintable():
            raise invalid("request_id must be printable and 1-128 characters", "request_id")
        redis = self.router.call_state
        first, text = True, None
        while True:
            try:
                record = await redis(self.state.get, request_id)
            except UnknownRequest:
                raise RouterError("NOT_FOUND", f"no request {request_id}") from None
            if record.meta.get("owner", "") != owner:  # someone else's request: not ours to see
                raise RouterError("NOT_FOUND", f"no request {request_id}")
            if first and offset > await redis(self.state.num_tokens, request_id):
                raise invalid(f"offset {offset} is past the {request_id} token log", "offset")
            first = False
            if text is None:  # Generate's own text rules: special tokens skipped, stop strings cut
                text = self.router.text_stream(self.router.params_of(record.meta) or SamplingParams())
                text.push((await redis(self.state.read_tokens, request_id))[:offset] if offset else [])
            done = record.status.terminal
            router_id = record.meta.get("router", "")
            if not done and not await self._alive(router_id):
                if await redis(self.state.claim, request_id, router_id, self.router.router_id):
                    log.warning("request %s: router %s is gone; continuing it here", request_id, router_id)
                    committed = await redis(self.state.read_tokens, request_id)
                    if len(committed) > offset:
                        yield StepEvent(request_id, offset, committed[offset:], text.push(committed[offset:]).text)
                    async for ev in self.router.continue_request(record, committed):
                        yield ev
                    return
                continue  # another router claimed it first: follow its log
            tokens = await redis(self.state.read_tokens, request_id, offset)
            if tokens or done:
                reason = record.meta.get("finish_reason") if done else None
                delta = text.push(tokens).text + (text.flush() if done else "")
                yield StepEvent(request_id, offset, tokens, delta, finish_reason=reason)
                offset += len(tokens)
            if done:
                return
            await asyncio.sleep(RESUME_POLL_S)

    # -- orphans ---------------------------------------------------------------------------
    async def _sweep(self) -> None:
        now, seen = time.monotonic(), set()
        for rid in await asyncio.to_thread(self.state.list_active):
            try:
                record = await asyncio.to_thread(self.state.get, rid)
            except UnknownRequest:
                continue
            router_id = record.meta.get("router", "")
            if await self._alive(router_id):
                continue
            seen.add(rid)
            since = self._orphan_since.setdefault(rid, now)
            if now - since >= ORPHAN_GRACE_S and await asyncio.to_thread(
                    self.state.claim, rid, router_id, self.router.router_id):
                await self._reap(rid)
        self._orphan_since = {rid: t for rid, t in self._orphan_since.items() if rid in seen}

    async def _reap(self, request_id: str) -> None:
        log.warning("request %s: orphaned by a dead router and not resumed; freeing it", request_id)
        await self.router.release_everywhere(request_id)
        with contextlib.suppress(StateConflict, UnknownRequest):
            await asyncio.to_thread(self.state.set_status, request_id, RequestStatus.FAILED,
                                    {"finish_reason": "error"})
