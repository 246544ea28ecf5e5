"""Backpressure: how many requests generate at once, and what waits.

A request runs when there is room (`capacity`), else waits in a bounded queue
(`max_queued`), else is refused with RESOURCE_EXHAUSTED. The gauges follow every change."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

from services.router.context import RouterContext
from services.router.errors import RouterError

E = TypeVar("E")


class Backpressure:
    def __init__(self, ctx: RouterContext) -> None:
        self.ctx = ctx
        self.in_flight = self.waiting = 0
        self._room = asyncio.Condition()  # notified whenever a request ends

    def capacity(self) -> int:
        """Requests generating at once: the configured limit, and never more than the
        target pool's KV slots (an admission beyond them would fail)."""
        cfg = self.ctx.cfg
        target = cfg.pool("target")
        return min(cfg.max_in_flight, target.max_batch_size * target.replicas)

    async def counted(self, events: AsyncIterator[E]) -> AsyncIterator[E]:
        """`events`, run when there is room, else after waiting in the queue, else refused."""
        metrics = self.ctx.metrics
        if self.in_flight >= self.capacity():
            if self.waiting >= self.ctx.cfg.max_queued:
                metrics.observe_error("RESOURCE_EXHAUSTED")
                raise RouterError("RESOURCE_EXHAUSTED", f"{self.in_flight} requests in flight and "
                                  f"{self.waiting} waiting; retry later")
            self.waiting += 1
            metrics.set_queue(self.in_flight, self.waiting)
            try:
                async with self._room:
                    await self._room.wait_for(lambda: self.in_flight < self.capacity())
            finally:
                self.waiting -= 1
        self.in_flight += 1
        metrics.set_queue(self.in_flight, self.waiting)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            self.in_flight -= 1
            metrics.set_queue(self.in_flight, self.waiting)
            async with self._room:
                self._room.notify()
