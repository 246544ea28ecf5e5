from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dspark.v1 import generation_pb2_grpc
from services.grpc_util import add_health_and_reflection

NAME = "dspark.v1.Generation"


def _check(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", NAME):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=5)
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert NAME in names and "grpc.health.v1.Health" in names


def test_sync_server() -> None:
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    generation_pb2_grpc.add_GenerationServicer_to_server(generation_pb2_grpc.GenerationServicer(),
                                                         server)
    add_health_and_reflection(server, [NAME])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        _check(port)
    finally:
        server.stop(None)


def test_aio_server() -> None:
    async def main() -> None:
        server = grpc.aio.server()
        add_health_and_reflection(server, [NAME])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await asyncio.to_thread(_check, port)
        finally:
            await server.stop(None)

    asyncio.run(main())
