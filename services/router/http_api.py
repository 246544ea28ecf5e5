"""OpenAI-compatible HTTP front (aiohttp): /v1/completions, /v1/chat/completions (with
`stream: true` as SSE) and /v1/models, mapped onto the same request loop as gRPC.

Every field is honoured or refused with a 400 naming it (`services/security/openai_wire.py`);
every error, 404/405/413 included, has OpenAI's shape `{"error": {message, type, param,
code}}`. `n` > 1 runs n sequences of the same prompt side by side (each its own request in
the loop, seed + i when seeded). The handler is cancelled when its client disconnects (the
runner is built with `handler_cancellation`), which frees the KV slots of non-streaming
requests too. docs/openai-compat.md lists each field.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web

from services.config import FleetConfig
from services.router.errors import RouterError
from services.router.loop import Router, StepEvent
from services.router.openai_format import Choice, Reply
from services.router.security import EdgeSecurity
from services.router.validate import Limits, RequestSpec, encode_prompt, make_spec
from services.security.http_guard import KEY_NAME, error_body
from services.security.validation import ValidRequest

# aiohttp's own refusals (no route, wrong method, body over client_max_size) -> OpenAI codes.
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_response(e: RouterError) -> web.Response:
    return web.json_response(error_body(e.code, e.message, e.param), status=e.http_status)


@web.middleware
async def openai_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Outermost middleware: aiohttp's HTTP errors in OpenAI's error shape."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        body = error_body("INVALID_ARGUMENT", f"{e.reason} ({request.method} {request.path})")
        body["error"]["code"] = HTTP_ERROR_CODES.get(e.status, str(e.status))
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return web.json_response(body, status=e.status, headers=headers)


def fingerprint(cfg: FleetConfig) -> str:
    """`system_fingerprint`: changes whenever what produces the tokens changes."""
    what = [_version(), cfg.model, cfg.dtype, cfg.method, cfg.block_size, cfg.verify_policy,
            cfg.drafter_checkpoint, cfg.draft_model]
    return "fp_" + hashlib.sha256(json.dumps(what, default=str).encode()).hexdigest()[:12]


def _version() -> str:
    try:
        return version("dspark")
    except PackageNotFoundError:
        return "dev"


class OpenAIFront:
    def __init__(self, router: Router, limits: Limits, edge: EdgeSecurity) -> None:
        self.router, self.limits, self.edge = router, limits, edge
        self.fingerprint = fingerprint(router.cfg)

    def app(self) -> web.Application:
        # The guard middleware authenticates and rate-limits every path but /health.
        app = web.Application(middlewares=[openai_errors, *self.edge.http_middlewares()])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/debug/kv", self.debug_kv)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def debug_kv(self, request: web.Request) -> web.Response:
        """KV slots held on the target replicas, for leak checks (`dspark loadtest
        --leak-check-url`); behind the API key like everything else."""
        pools, capacity = self.router.pools, self.router.cfg.pool("target").max_batch_size
        infos = await asyncio.gather(*(pools.client(n).health() for n in pools.names["target"]))
        return web.json_response({"used_slots": sum(capacity - i.num_free_slots for i in infos),
                                  "in_flight": self.router.in_flight})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.limits.model, "object": "model", "created": 0, "owned_by": "dspark",
             "max_model_len": self.limits.max_context}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    def _specs(self, body: Any, chat: bool, owner: str) -> tuple[ValidRequest, list[RequestSpec]]:
        req = self.edge.check_openai(body, chat, self.limits)  # every field, before tokenizing
        prompt = encode_prompt(self.router.tokenizer, req)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        return req, [make_spec(self.limits, req, prompt, rid, owner, choice=i) for i in range(req.n)]

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        created = int(time.time())
        try:
            try:
                # Our own parser: aiohttp's request.json() lets a deeply nested body escape as
                # RecursionError (HTTP 500).
                body = self.edge.parse_body(await request.read())
                req, specs = self._specs(body, chat, request.get(KEY_NAME) or "")
            except RouterError as e:  # rejected before the request loop (which counts its own)
                self.router.metrics.observe_error(e.code)
                raise
            reply = Reply(chat, specs[0].request_id, created, self.limits.model, self.fingerprint,
                          req.logprobs is not None, self._token_text)
            events = merged([self.router.generate(s) for s in specs])
            if req.stream:
                return await self._stream(request, reply, events, len(specs), req.include_usage,
                                          len(specs[0].prompt_ids))
            return await self._collect(reply, events, len(specs), len(specs[0].prompt_ids))
        except RouterError as e:
            return error_response(e)

    def _token_text(self, token_id: int) -> str:
        return self.router.tokenizer.decode([token_id])

    async def _collect(self, reply: Reply, events: AsyncIterator[tuple[int, StepEvent]], n: int,
                       prompt_tokens: int) -> web.Response:
        choices = [Choice(i) for i in range(n)]
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for i, ev in events:
                choices[i].add(ev)
        return web.json_response(reply.body(choices, prompt_tokens))

    async def _stream(self, request: web.Request, reply: Reply, events: AsyncIterator[tuple[int, StepEvent]],
                      n: int, include_usage: bool, prompt_tokens: int) -> web.StreamResponse:
        choices = [Choice(i) for i in range(n)]
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            # Pull the first event before sending headers: admission errors (429, 503) keep
            # their HTTP status instead of turning into an in-band error.
            first = await anext(events)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            try:
                item: tuple[int, StepEvent] | None = first
                while item is not None:
                    i, ev = item
                    choices[i].add(ev)
                    await _send(resp, reply.chunk(choices[i], ev, include_usage))
                    item = await anext(events, None)
                if include_usage:
                    await _send(resp, reply.usage_chunk(choices, prompt_tokens))
            except RouterError as e:
                await _send(resp, error_body(e.code, e.message, e.param))
        await resp.write(b"data: [DONE]\n\n")
        return resp


async def _send(resp: web.StreamResponse, obj: dict[str, Any]) -> None:
    await resp.write(f"data: {json.dumps(obj)}\n\n".encode())


async def merged(streams: list[AsyncIterator[StepEvent]]) -> AsyncIterator[tuple[int, StepEvent]]:
    """(choice index, event) from n streams as they come; the first error ends them all.
    Closing (or cancelling) this generator cancels every stream, which frees their KV."""
    if len(streams) == 1:  # the common case: no tasks, no queue
        async with contextlib.aclosing(streams[0]):  # type: ignore[type-var]
            async for ev in streams[0]:
                yield 0, ev
        return
    queue: asyncio.Queue[tuple[int, StepEvent | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[StepEvent]) -> None:
        try:
            async for ev in stream:
                await queue.put((i, ev))
            await queue.put((i, None))
        except Exception as e:  # handed to the consumer, which raises it
            await queue.put((i, e))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
