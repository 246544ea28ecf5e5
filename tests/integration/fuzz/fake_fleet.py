"""A model-free stand-in for the router's two fronts, built from the real edge pieces
(validation, API keys, rate limit, guards): tokens are 1 per prompt byte and the output
counts up. The fuzz harness and load-test tests run against it; the real fleet replaces it.

`FakeFleet` runs a grpc.aio server and an aiohttp app on one event loop in a background
thread, so synchronous clients (hypothesis tests, the CLI) can call it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aiohttp import web

from dspark.v1 import generation_pb2 as pb
from dspark.v1 import generation_pb2_grpc as pb_grpc
from services.grpc_util import add_health_and_reflection
from services.security.admission import Admission
from services.security.auth import current_key_name
from services.security.grpc_guard import GrpcGuard
from services.security.http_guard import KEY_NAME, error_response, http_guard
from services.security.openai_wire import from_openai
from services.security.validation import (
    RequestError,
    RequestLimits,
    ValidRequest,
    from_proto,
    grpc_status,
    parse_json,
    validate_request,
)

HOST = "127.0.0.1"
LIMITS = RequestLimits(max_context=256, max_new_tokens=64, default_max_new_tokens=8, max_prompt_bytes=1024,
                       vocab_size=1000, models=frozenset({"fake"}), methods=frozenset({"ar", "dspark"}))
MAX_RESUME_OFFSET = 2**31 - 1


def count_bytes(req: ValidRequest) -> int:  # a byte-level "tokenizer"
    if req.text is not None:
        return len(req.text.encode())
    return sum(len(c.encode()) for _, c in req.messages or ())


@dataclasses.dataclass
class FakeState:
    used_slots: int = 0  # a "KV slot" is held from admission to the end of the stream
    outputs: dict[str, int] = dataclasses.field(default_factory=dict)  # request id -> tokens made
    key_names: list[str | None] = dataclasses.field(default_factory=list)
    leak: bool = False  # simulate a fleet bug: slots are never freed


class FakeModel:
    def __init__(self, state: FakeState, step_delay_s: float, tokens_per_step: int) -> None:
        self.state, self.delay, self.per_step = state, step_delay_s, tokens_per_step

    async def steps(self, req: ValidRequest, request_id: str) -> AsyncIterator[tuple[int, list[int], bool]]:
        """Yields (offset, token ids, last) per step; frees the slot however the stream ends."""
        self.state.used_slots += 1
        try:
            offset = 0
            while offset < req.max_new_tokens:
                n = min(self.per_step, req.max_new_tokens - offset)
                await asyncio.sleep(self.delay)
                ids = [(offset + i) % 1000 for i in range(n)]
                offset += n
                self.state.outputs[request_id] = offset
                yield offset - n, ids, offset == req.max_new_tokens
        finally:
            if not self.state.leak:
                self.state.used_slots -= 1


class FakeGeneration(pb_grpc.GenerationServicer):
    def __init__(self, model: FakeModel) -> None:
        self.model = model

    async def Generate(self, request: pb.GenerateRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        self.model.state.key_names.append(current_key_name.get())
        try:
            req = validate_request(from_proto(request), LIMITS, count_tokens=count_bytes)
        except RequestError as e:
            await context.abort(grpc_status(e.code), e.message)
        rid = request.request_id or f"r{len(self.model.state.outputs)}"
        async for offset, ids, last in self.model.steps(req, rid):
            yield pb.GenerateResponse(request_id=rid, token_ids=ids, offset=offset,
                                      finish_reason=pb.FINISH_REASON_LENGTH if last else 0)

    async def Resume(self, request: pb.ResumeRequest,  # noqa: N802
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        if not 0 <= request.offset <= MAX_RESUME_OFFSET:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "offset must be >= 0")
        if request.request_id not in self.model.state.outputs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no request {request.request_id!r}")
        n = self.model.state.outputs[request.request_id]
        yield pb.GenerateResponse(request_id=request.request_id, offset=min(request.offset, n),
                                  token_ids=list(range(min(request.offset, n), n)),
                                  finish_reason=pb.FINISH_REASON_LENGTH)

    async def ListModels(self, request: pb.ListModelsRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.ModelInfo(id="fake", methods=["ar"], max_context=256)])


class FakeOpenAI:
    def __init__(self, model: FakeModel) -> None:
        self.model = model

    def app(self, admission: Admission) -> web.Application:
        app = web.Application(middlewares=[http_guard(admission)], client_max_size=64 * 1024)
        app.router.add_post("/v1/completions", lambda r: self.handle(r, chat=False))
        app.router.add_post("/v1/chat/completions", lambda r: self.handle(r, chat=True))
        app.router.add_get("/health", lambda r: web.json_response({"ok": True}))
        app.router.add_get("/v1/models", lambda r: web.json_response({"object": "list", "data": [{"id": "fake"}]}))
        app.router.add_get("/debug/kv", lambda r: web.json_response({"used_slots": self.model.state.used_slots}))
        return app

    async def handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self.model.state.key_names.append(request.get(KEY_NAME))
        try:
            body = parse_json(await request.read())
            req = validate_request(from_openai(body, chat), LIMITS, count_tokens=count_bytes)
        except RequestError as e:
            return error_response(e)
        rid = f"h{len(self.model.state.outputs)}"
        if body.get("stream") is not True:
            ids = [t async for _, step, _ in self.model.steps(req, rid) for t in step]
            return web.json_response({"id": rid, "choices": [{"index": 0, "token_ids": ids, "text": ""}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        async for _, ids, last in self.model.steps(req, rid):
            chunk = {"id": rid, "choices": [{"index": 0, "token_ids": ids, "text": "x" * len(ids),
                                             "finish_reason": "length" if last else None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp


class FakeFleet:
    """`with FakeFleet(admission) as fleet: fleet.grpc_port, fleet.http_port, fleet.state`."""

    def __init__(self, admission: Admission | None = None, step_delay_s: float = 0.002,
                 tokens_per_step: int = 3, grpc_credentials: Any = None, ssl_context: Any = None) -> None:
        self.admission = admission or Admission()
        self.state = FakeState()
        self.model = FakeModel(self.state, step_delay_s, tokens_per_step)
        self.grpc_credentials, self.ssl_context = grpc_credentials, ssl_context
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.grpc_port = self.http_port = 0

    def __enter__(self) -> FakeFleet:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    async def _start(self) -> None:
        self.server = grpc.aio.server(interceptors=[GrpcGuard(self.admission)])
        pb_grpc.add_GenerationServicer_to_server(FakeGeneration(self.model), self.server)
        add_health_and_reflection(self.server, ["dspark.v1.Generation"])
        addr = f"{HOST}:0"
        self.grpc_port = (self.server.add_secure_port(addr, self.grpc_credentials) if self.grpc_credentials
                          else self.server.add_insecure_port(addr))
        await self.server.start()
        self.runner = web.AppRunner(FakeOpenAI(self.model).app(self.admission))
        await self.runner.setup()
        site = web.TCPSite(self.runner, HOST, 0, ssl_context=self.ssl_context)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop(self) -> None:
        await self.server.stop(grace=0.5)
        await self.runner.cleanup()
