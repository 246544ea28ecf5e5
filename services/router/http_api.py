"""OpenAI-compatible HTTP front (aiohttp): /v1/completions, /v1/chat/completions (with
`stream: true` as SSE) and /v1/models, mapped onto the same request loop as gRPC.
Each choice also carries `token_ids` (an extension, like vLLM's) so clients can check
exactness."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from services.router.errors import RouterError
from services.router.loop import Router, StepEvent
from services.router.validate import Limits, RequestSpec, encode_prompt, invalid, make_spec


def _error(e: RouterError) -> web.Response:
    return web.json_response({"error": {"message": e.message, "type": e.code.lower(), "code": e.code}},
                             status=e.http_status)


class OpenAIFront:
    def __init__(self, router: Router, limits: Limits) -> None:
        self.router, self.limits = router, limits

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.limits.model, "object": "model", "owned_by": "dspark",
             "max_model_len": self.limits.max_context}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    def _spec(self, body: Any, chat: bool) -> RequestSpec:
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
                ignore_eos=bool(body.get("ignore_eos", False)))
        except (TypeError, ValueError) as e:
            raise invalid(f"bad parameter: {e}") from None

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            self.router.metrics.observe_error("INVALID_ARGUMENT")
            return _error(invalid("the body is not valid JSON"))
        try:
            try:
                spec = self._spec(body, chat)
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
