"""gRPC server helpers shared by the router and any worker that serves gRPC."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

SERVING = health_pb2.HealthCheckResponse.SERVING


class _AioHealthServicer(health.aio.HealthServicer):
    """The asyncio servicer, seeded with initial statuses without an event loop.

    `aio.HealthServicer.set` is a coroutine; seeding the status map before the server starts
    (nobody can be watching yet) avoids forcing callers of the helper into async code.
    """

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__()
        self._server_status.update({name: SERVING for name in names})


def add_health_and_reflection(
    server: grpc.Server | grpc.aio.Server, service_names: Iterable[str]
) -> health.HealthServicer | health.aio.HealthServicer:
    """Register `grpc.health.v1.Health` (each of `service_names` and "" as SERVING) and
    server reflection for `service_names` (full names, e.g. "dspark.v1.Generation").

    Works for both `grpc.server` and `grpc.aio.server`. Returns the health servicer so the
    caller can flip statuses later (`set(...)`, awaited for the asyncio one; e.g.
    NOT_SERVING while draining).
    """
    names = list(service_names)
    servicer: health.HealthServicer | health.aio.HealthServicer
    if isinstance(server, grpc.aio.Server):
        servicer = _AioHealthServicer(["", *names])
    else:
        servicer = health.HealthServicer()
        for name in ["", *names]:
            servicer.set(name, SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                        server)
    return servicer
