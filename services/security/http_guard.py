"""aiohttp middleware: API key (`Authorization: Bearer <key>`) + rate limit, with errors in
OpenAI's JSON shape so OpenAI client libraries show the message.

    app = web.Application(middlewares=[http_guard(Admission(auth, limiter, metrics))])

The authenticated key name is stored as `request[KEY_NAME]`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from services.security.admission import Admission, RateLimited
from services.security.auth import bearer_token
from services.security.validation import RequestError

KEY_NAME = web.RequestKey("dspark_key_name", str)
EXEMPT_PATHS = frozenset({"/health", "/healthz", "/metrics"})

# OpenAI's `type` and `code` for each status we send (the router's own errors included).
OPENAI_KIND: dict[str, tuple[str, str | None]] = {
    "INVALID_ARGUMENT": ("invalid_request_error", None),
    "UNAUTHENTICATED": ("invalid_request_error", "invalid_api_key"),
    "NOT_FOUND": ("invalid_request_error", "model_not_found"),
    "RESOURCE_EXHAUSTED": ("rate_limit_error", "rate_limit_exceeded"),
    "CANCELLED": ("cancelled", None),
    "UNAVAILABLE": ("server_error", "service_unavailable"),
    "DEADLINE_EXCEEDED": ("timeout", None),
    "ALREADY_EXISTS": ("invalid_request_error", "already_exists"),
    "INTERNAL": ("server_error", "internal_error"),
}


def error_body(code: str, message: str, param: str | None = None) -> dict:
    """OpenAI's error shape, `{"error": {message, type, param, code}}`, for every error."""
    kind, openai_code = OPENAI_KIND.get(code, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": openai_code or code}}


def error_response(error: RequestError) -> web.Response:
    """`{"error": {message, type, param, code}}` with the code's HTTP status and, where they
    help a client recover, `WWW-Authenticate` / `Retry-After`."""
    headers = {}
    if error.code == "UNAUTHENTICATED":
        headers["WWW-Authenticate"] = 'Bearer realm="dspark"'
    if isinstance(error, RateLimited):
        headers["Retry-After"] = error.retry_after_header
    return web.json_response(error_body(error.code, error.message, error.param), status=error.http_status,
                             headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def http_guard(admission: Admission, exempt_paths: Iterable[str] = EXEMPT_PATHS) -> Middleware:
    exempt = frozenset(exempt_paths)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in exempt:
            return await handler(request)
        try:
            request[KEY_NAME] = await admission.admit(bearer_token(request.headers.get("Authorization")))
        except RequestError as e:
            return error_response(e)
        return await handler(request)

    return guard
