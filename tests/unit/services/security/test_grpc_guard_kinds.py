"""GrpcGuard keeps each method's shape: coroutine streaming handlers (context.write),
unary handlers, and the key name visible to the handler."""

from __future__ import annotations

import asyncio

import grpc

from services.security.admission import Admission
from services.security.auth import ApiKeyAuth, current_key_name, hash_key
from services.security.grpc_guard import GrpcGuard


async def _roundtrip() -> tuple[list[bytes], bytes, grpc.StatusCode]:
    async def writes(request: bytes, context: grpc.aio.ServicerContext) -> None:
        for part in (b"a", str(current_key_name.get()).encode()):
            await context.write(part)

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request + str(current_key_name.get()).encode()

    handlers = grpc.method_handlers_generic_handler("t.T", {
        "Writes": grpc.unary_stream_rpc_method_handler(writes),
        "Echo": grpc.unary_unary_rpc_method_handler(echo)})
    auth = ApiKeyAuth({"bob": hash_key("k")})
    server = grpc.aio.server(interceptors=[GrpcGuard(Admission(auth=auth))])
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            md = (("authorization", "Bearer k"),)
            parts = [m async for m in ch.unary_stream("/t.T/Writes")(b"", metadata=md, timeout=10)]
            echoed = await ch.unary_unary("/t.T/Echo")(b"x", metadata=md, timeout=10)
            try:
                await ch.unary_unary("/t.T/Echo")(b"x", timeout=10)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                code = e.code()
        return parts, echoed, code
    finally:
        await server.stop(None)


def test_handler_kinds() -> None:
    parts, echoed, code = asyncio.run(_roundtrip())
    assert parts == [b"a", b"bob"] and echoed == b"xbob" and code == grpc.StatusCode.UNAUTHENTICATED
