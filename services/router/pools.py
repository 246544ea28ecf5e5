"""A `WorkerClient` for every worker deployment, grouped by pool, and which replica gets a
request.

Stickiness is by address: each replica is its own named deployment, so a request pinned to
`TargetWorker1` always reaches the process holding its KV."""

from __future__ import annotations

import asyncio
import collections

from ray import serve

from services.config import POOL_NAMES, FleetConfig
from services.workers.client import RayWorkerClient, WorkerClient


class WorkerPools:
    def __init__(self, cfg: FleetConfig) -> None:
        self.names = {pool: cfg.deployment_names(pool) for pool in POOL_NAMES}
        self.clients: dict[str, WorkerClient] = {
            name: RayWorkerClient(name, pool, serve.get_deployment_handle(name, cfg.app_name))  # type: ignore[arg-type]
            for pool, names in self.names.items() for name in names}
        self.load: collections.Counter[str] = collections.Counter()  # requests pinned per replica
        self._send_locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    def client(self, name: str) -> WorkerClient:
        return self.clients[name]

    def pick(self, pool: str, avoid: set[str] = frozenset()) -> str:  # type: ignore[assignment]
        """Least-loaded replica of `pool`, preferring ones not in `avoid` (recently failed);
        with no alternative the same one is retried (Serve restarts a dead replica)."""
        names = [n for n in self.names[pool] if n not in avoid] or self.names[pool]
        return min(names, key=lambda n: self.load[n])

    def send_lock(self, prefill: str) -> asyncio.Lock:
        """One KV hand-off at a time per prefill replica: a transport channel is a single
        ordered stream, so concurrent transfers on one pair would interleave."""
        return self._send_locks[prefill]
