"""What the parts of the router share: the fleet config, the state store, the worker pools,
the metrics, and the background tasks it spawns (`Router`, `Admission`, `DrafterLink` and
`Backpressure` each hold the one `RouterContext`, so a config swapped on the router reaches
them all)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from services.config import FleetConfig
from services.metrics import FleetMetrics
from services.router.errors import RouterError
from services.router.pools import WorkerPools
from services.state.redis_state import FleetState, StateUnavailable
from services.workers.client import WorkerClient

log = logging.getLogger(__name__)
T = TypeVar("T")


class RouterContext:
    def __init__(self, cfg: FleetConfig, state: FleetState, pools: WorkerPools, metrics: FleetMetrics) -> None:
        self.cfg, self.state, self.pools, self.metrics = cfg, state, pools, metrics
        self._background: set[asyncio.Task] = set()

    def client(self, name: str) -> WorkerClient:
        return self.pools.client(name)

    async def call_state(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking `FleetState` call, off the event loop; an unreachable store is UNAVAILABLE."""
        try:
            return await asyncio.to_thread(fn, *args)
        except StateUnavailable as e:
            raise RouterError("UNAVAILABLE", f"fleet state store unavailable: {e}") from e

    def spawn(self, coro: Any) -> None:
        """Run `coro` in the background (kept referenced until it ends)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def release_quietly(self, name: str, request_id: str) -> None:
        """Free what replica `name` holds for the request; a failure is only logged (a dead
        replica's state died with it)."""
        try:
            await asyncio.wait_for(self.client(name).release(request_id), 10)
        except Exception as e:
            log.info("release(%s) on %s: %s", request_id, name, e)
