"""Run one router on its own against a running fleet (its Ray cluster with the Serve app,
and its Redis), e.g. a second router replica, or a router restarted after a crash:

    python -m services.router.main --ray-address 127.0.0.1:6379 --redis-url redis://... \
        [--config fleet.yaml | --config-json '{...}'] [--grpc-port N] [--http-port N]

Prints one line `router ready grpc=HOST:PORT http=HOST:PORT id=ROUTER_ID`, serves until
SIGINT/SIGTERM. Requests it starts can be resumed on any other router if it dies.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from services.ray_env import LOOPBACK, ray_env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.router.main")
    p.add_argument("--ray-address", required=True, help="GCS address of the fleet's Ray cluster")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--config", default=None, help="fleet YAML")
    p.add_argument("--config-json", default=None, help="fleet config as JSON (wins over --config)")
    p.add_argument("--host", default=LOOPBACK, help="address the router's gRPC/HTTP fronts bind")
    p.add_argument("--node-ip", default=None, help="this machine's address in the Ray cluster "
                   "(default: Ray's own detection)")
    p.add_argument("--grpc-port", type=int, default=0)
    p.add_argument("--http-port", type=int, default=0)
    args = p.parse_args(argv)

    ray_env()  # before `import ray`
    import ray

    from services.config import FleetConfig, load_config
    from services.metrics import FleetMetrics
    from services.router.server import RouterServer
    from services.state.redis_state import FleetState, StateConfig

    cfg = FleetConfig.model_validate_json(args.config_json) if args.config_json else load_config(args.config)
    cfg = cfg.model_copy(update={"redis_url": args.redis_url})
    ray.init(address=args.ray_address, namespace="dspark", _node_ip_address=args.node_ip,
             logging_level="WARNING", log_to_driver=False)
    state = FleetState.from_url(args.redis_url, StateConfig(namespace=cfg.redis_namespace))
    server = RouterServer(cfg, state, FleetMetrics(cfg.model, cfg.method))
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def serve() -> None:
        grpc_port, http_port = await server.start(args.host, args.grpc_port, args.http_port)
        print(f"router ready grpc={args.host}:{grpc_port} http={args.host}:{http_port} "
              f"id={server.router.router_id}", flush=True)  # type: ignore[union-attr]
        await stop.wait()
        await server.stop()

    try:
        loop.run_until_complete(serve())
    finally:
        state.close()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
