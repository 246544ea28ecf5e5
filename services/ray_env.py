"""Environment Ray must see *before it is imported* (it reads these at import time), and
the worker hook that keeps Serve replicas on the loopback interface of a local node."""

from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"
# Ray `runtime_env` entry for every deployment of the fleet (services/app.py).
REPLICA_SETUP_HOOK = "services.ray_env.bind_replica_servers_to_node"


def ray_env() -> None:
    """Keep every Ray process on 127.0.0.1 (without this Ray binds the machine's network
    interface even when asked for 127.0.0.1), no usage reporting, one torch thread per
    worker (OpenMP threads spin against each other on small shared machines)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def bind_replica_servers_to_node() -> None:
    """Ray worker setup hook. Every Serve replica opens an inter-deployment gRPC server on
    `[::]:0`, all interfaces, whatever address its node has (ray 2.60,
    `ray.serve._private.replica`). On a loopback node (local runs, tests) that server is
    bound to 127.0.0.1 instead, so a local fleet listens on loopback only; on a cluster
    node (KubeRay) Ray's own binding is kept."""
    import ray
    from ray.serve._private import replica

    if ray.util.get_node_ip_address() != LOOPBACK:
        return
    add_port = replica.add_port_to_grpc_server

    def add_loopback_port(server: object, address: str) -> int:
        host, _, port = address.rpartition(":")
        return add_port(server, f"{LOOPBACK}:{port}" if host in ("[::]", "0.0.0.0", "") else address)

    replica.add_port_to_grpc_server = add_loopback_port
