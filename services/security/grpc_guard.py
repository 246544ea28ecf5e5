"""grpc.aio server interceptor: API key + rate limit on every call, and malformed request
bytes answered INVALID_ARGUMENT.

    server = grpc.aio.server(interceptors=[GrpcGuard(Admission(auth, limiter, metrics))])

Rejections keep the method's shape (a streaming method gets a streaming handler that
aborts at once). Health checks are exempt so load balancers and probes need no key.
Without the tolerant deserializer, bytes that do not parse as the request message (e.g. a
proto3 string holding invalid UTF-8) would surface as INTERNAL, an undocumented code.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from services.security.admission import Admission, RateLimited
from services.security.auth import bearer_token, current_key_name
from services.security.validation import RequestError, grpc_status

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class _Malformed:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's bytes
            return _Malformed(f"{type(e).__name__}: {e}")
    return parse


def _metadata_token(metadata: Sequence[Any] | None) -> str | None:
    for item in metadata or ():
        if item.key == "authorization":
            value = item.value.decode("latin-1") if isinstance(item.value, bytes) else item.value
            return bearer_token(value)
    return None


class GrpcGuard(grpc.aio.ServerInterceptor):
    def __init__(self, admission: Admission, exempt_prefixes: Sequence[str] = (HEALTH_PREFIX,)) -> None:
        self.admission = admission
        self.exempt_prefixes = tuple(exempt_prefixes)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.exempt_prefixes):
            return handler
        try:
            name = await self.admission.admit(_metadata_token(details.invocation_metadata))
        except RequestError as e:
            return _rejecting(handler, e)
        return _guarded(handler, name, self.admission)


def _rejecting(handler: grpc.RpcMethodHandler, error: RequestError) -> grpc.RpcMethodHandler:
    trailing = (("retry-after-ms", str(int(error.retry_after_s * 1000))),) \
        if isinstance(error, RateLimited) else None

    async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
        if trailing:
            context.set_trailing_metadata(trailing)
        await context.abort(grpc_status(error.code), error.message)

    # request_deserializer None: the refused request is never parsed.
    return _same_kind(handler, reject, deserializer=None)


def _guarded(handler: grpc.RpcMethodHandler, key_name: str, admission: Admission) -> grpc.RpcMethodHandler:
    inner = _behaviour(handler)

    async def check(request: Any, context: grpc.aio.ServicerContext) -> None:
        # Runs in the RPC's own task, so the contextvar is visible to the servicer only.
        current_key_name.set(key_name)
        if isinstance(request, _Malformed):
            admission.observe("INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.reason}")

    if handler.response_streaming:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(request, context)
            result = inner(request, context)
            if inspect.isasyncgen(result):
                try:
                    async for msg in result:
                        yield msg
                finally:
                    # A client cancel can land while we wait at our own `yield`; close the
                    # servicer's generator now so its cleanup (freeing KV) runs at once,
                    # not whenever the garbage collector finds it.
                    await result.aclose()
            else:  # a coroutine handler that writes with context.write
                await result
        behaviour: Callable[..., Any] = stream
    else:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(request, context)
            return await inner(request, context)
        behaviour = unary
    deserializer = handler.request_deserializer if handler.request_streaming \
        else _tolerant(handler.request_deserializer)
    return _same_kind(handler, behaviour, deserializer)


def _behaviour(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream)


def _same_kind(handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any],
               deserializer: Callable[[bytes], Any] | None) -> grpc.RpcMethodHandler:
    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[
        (handler.request_streaming, handler.response_streaming)]
    return make(behaviour, request_deserializer=deserializer, response_serializer=handler.response_serializer)
