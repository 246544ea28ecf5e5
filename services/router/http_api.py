"""OpenAI-compatible HTTP front (aiohttp): /v1/completions, /v1/chat/completions (with
`stream: true` as SSE) and /v1/models, mapped onto the same request loop as gRPC.
Each choice also carries `token_ids` (an extension, like vLLM's) so clients can check
exactness."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from services.router.errors import RouterError
from services.router.loop import Router, StepEvent
from services.router.security import EdgeSecurity
from services.router.validate import Limits, RequestSpec, encode_prompt, invalid, make_spec
from services.security.http_guard import KEY_NAME


def _error(e: RouterError) -> web.Response:
    return web.json_response({"error": {"message": e.message, "type": e.code.lower(), "code": e.code}},
                             status=e.http_status)


class OpenAIFront:
    def __init__(self, router: Router, limits: Limits, edge: EdgeSecurity) -> None:
        self.router, self.limits, self.edge = router, limits, edge

    def app(self) -> web.Application:
        # The guard middleware authenticates and rate-limits every path but /health.
        app = web.Application(middlewares=self.edge.http_middlewares())
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
        infos = await asyncio.gather(*(pools.handle(n).info.remote() for n in pools.names["target"]))
        return web.json_response({"used_slots": sum(capacity - i.num_free_slots for i in infos),
                                  "in_flight": self.router.in_flight})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.limits.model, "object": "model", "owned_by": "dspark",
             "max_model_len": self.limits.max_context}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    def _spec(self, body: Any, chat: bool, owner: str) -> RequestSpec:
        self.edge.check_openai(body, chat, self.limits)  # sizes, types, UTF-8, ranges
        if not isinstance(body, dict):
            raise invalid("the body must be a JSON object")
        tok = self.router.tokenizer
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list):
                raise invalid("`messages` must be a list")
            prompt = encode_prompt(tok, messages=messages)
        else:
            p = body.get("prompt")
            if isinstance(p, list) and all(isinstance(t, int) for t in p):
                prompt = encode_prompt(tok, token_ids=p)
            elif isinstance(p, str):
                prompt = encode_prompt(tok, text=p)
            else:
                raise invalid("`prompt` must be a string or a list of token ids")
        n = body.get("max_completion_tokens", body.get("max_tokens"))
        try:
            return make_spec(
                self.limits, prompt, model=body.get("model") or "",
                temperature=body.get("temperature", 1.0), top_p=body.get("top_p"),
                top_k=body.get("top_k"), seed=body.get("seed"),
                max_new_tokens=None if n is None else int(n),
                stop_token_ids=tuple(body.get("stop_token_ids") or ()),
                ignore_eos=bool(body.get("ignore_eos", False)), owner=owner)
        except (TypeError, ValueError) as e:
            raise invalid(f"bad parameter: {e}") from None

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            try:
                # Our own parser: aiohttp's request.json() lets a deeply nested body escape as
                # RecursionError (HTTP 500).
                body = self.edge.parse_body(await request.read())
                spec = self._spec(body, chat, request.get(KEY_NAME) or "")
                if body.get("stop"):
                    raise invalid("stop strings are not supported yet; use stop_token_ids")
            except RouterError as e:  # rejected before the request loop (which counts its own)
                self.router.metrics.observe_error(e.code)
                raise
            stream = self.router.generate(spec)
            if body.get("stream"):
                return await self._stream(request, spec, stream, chat)
            return await self._collect(spec, stream, chat)
        except RouterError as e:
            return _error(e)

    async def _collect(self, spec: RequestSpec, stream: Any, chat: bool) -> web.Response:
        text, ids, last = [], [], None
        async for ev in stream:
            text.append(ev.text)
            ids += ev.token_ids
            last = ev
        return web.json_response(_body(spec, chat, "".join(text), ids, last, delta=False))

    async def _stream(self, request: web.Request, spec: RequestSpec, stream: Any,
                      chat: bool) -> web.StreamResponse:
        # Pull the first event before sending headers: admission errors (429, 503) keep
        # their HTTP status instead of turning into an in-band error.
        first = await anext(stream)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            ev: StepEvent | None = first
            while ev is not None:
                chunk = _body(spec, chat, ev.text, ev.token_ids, ev if ev.finish_reason else None, delta=True)
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                ev = await anext(stream, None)
        except RouterError as e:
            await resp.write(f"data: {json.dumps({'error': {'message': e.message, 'code': e.code}})}\n\n"
                             .encode())
        finally:
            await stream.aclose()
        await resp.write(b"data: [DONE]\n\n")
        return resp


def _body(spec: RequestSpec, chat: bool, text: str, ids: list[int], last: StepEvent | None,
          delta: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "token_ids": ids,
                              "finish_reason": last.finish_reason if last else None}
    if chat:
        choice["delta" if delta else "message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    kind = "chat.completion" if chat else "text_completion"
    out: dict[str, Any] = {"id": spec.request_id, "object": kind + (".chunk" if delta and chat else ""),
                           "created": int(time.time()), "model": "", "choices": [choice]}
    if last is not None:
        out["usage"] = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                        "total_tokens": last.prompt_tokens + last.completion_tokens,
                        "mean_accepted_length": last.mean_accepted_length}
    return out
