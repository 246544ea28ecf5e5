"""The router process's servers: gRPC (Generation + health + reflection) and the OpenAI
HTTP front on one asyncio loop, both calling one `Router`.

Only these two ports (and the metrics port) face clients, and both sit behind
`EdgeSecurity` (API keys, rate limit, TLS when configured). Worker traffic never uses
them: the router reaches workers through Ray Serve handles (Ray's own internal ports) and
KV moves worker to worker over the KV transport. Clients send protobuf or JSON only;
nothing a client sends is ever unpickled (Ray pickles only router <-> worker messages
built by the router itself)."""

from __future__ import annotations

import grpc
from aiohttp import web

from dspark.models.loader import resolve_model_dir
from dspark.models.tokenizer import Tokenizer
from dspark.v1 import generation_pb2_grpc as pb_grpc
from services.config import FleetConfig
from services.grpc_util import add_health_and_reflection
from services.metrics import FleetMetrics
from services.router.grpc_api import GenerationService
from services.router.http_api import OpenAIFront
from services.router.loop import Router
from services.router.pools import WorkerPools
from services.router.resume import Continuity
from services.router.security import EdgeSecurity
from services.router.validate import Limits
from services.state.redis_state import FleetState

SERVICE_NAME = "dspark.v1.Generation"


class RouterServer:
    def __init__(self, cfg: FleetConfig, state: FleetState, metrics: FleetMetrics) -> None:
        self.cfg, self.state, self.metrics = cfg, state, metrics
        self.grpc_server: grpc.aio.Server | None = None
        self.http_runner: web.AppRunner | None = None
        self.router: Router | None = None
        self.continuity: Continuity | None = None
        self.edge = EdgeSecurity.from_config(cfg.security, state.client, metrics)

    async def start(self, host: str, grpc_port: int, http_port: int) -> tuple[int, int]:
        """Bind both fronts (port 0 = any free port); returns the bound ports."""
        pools = WorkerPools(self.cfg)
        tinfo = await pools.client(pools.names["target"][0]).health()
        tokenizer = Tokenizer.from_dir(resolve_model_dir(self.cfg.model), tinfo.eos_token_ids)
        limits = Limits.of(self.cfg, tinfo.max_context, tinfo.vocab_size)
        self.router = Router(self.cfg, self.state, pools, tokenizer, self.metrics, tinfo.eos_token_ids)
        self.continuity = Continuity(self.router)
        await self.continuity.start()
        for pool in ("prefill", "target", "drafter"):
            p = self.cfg.pool(pool)
            self.metrics.set_pool(pool, p.hourly_cost * p.replicas, p.replicas)

        edge = self.edge
        self.grpc_server = grpc.aio.server(interceptors=edge.grpc_interceptors())
        pb_grpc.add_GenerationServicer_to_server(
            GenerationService(self.router, limits, [self.cfg.method], edge, self.continuity),
            self.grpc_server)
        add_health_and_reflection(self.grpc_server, [SERVICE_NAME])
        bound_grpc = edge.add_grpc_port(self.grpc_server, f"{host}:{grpc_port}")
        await self.grpc_server.start()

        # handler_cancellation: a client that hangs up cancels its handler, so a non-streaming
        # request stops generating and frees its KV slot instead of running to the end.
        self.http_runner = web.AppRunner(OpenAIFront(self.router, limits, edge).app(), handler_cancellation=True)
        await self.http_runner.setup()
        site = web.TCPSite(self.http_runner, host, http_port, ssl_context=edge.http_ssl_context())
        await site.start()
        bound_http = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return bound_grpc, bound_http

    async def stop(self) -> None:
        if self.continuity is not None:
            await self.continuity.stop()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=1)
        if self.http_runner is not None:
            await self.http_runner.cleanup()
