"""Run the fleet: local Ray (simulated pools) or RAY_ADDRESS, Redis, Serve app, router."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "serve" / "fleet.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help=f"fleet YAML (default: {DEFAULT_CONFIG} when present)")
    p.add_argument("--host", default="127.0.0.1", help="address the gRPC/HTTP/metrics fronts bind")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=9400)
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray")


def run(args: argparse.Namespace) -> int:
    from services.config import load_config
    from services.launcher import LocalFleet

    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    cfg = load_config(path)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    fleet = LocalFleet(cfg, args.host, args.grpc_port, args.http_port, args.metrics_port, args.num_cpus)
    try:
        fleet.start()
        ports = fleet.ports
        print(f"dspark fleet ready: grpc={args.host}:{ports['grpc']} http={args.host}:{ports['http']} "
              f"metrics={args.host}:{ports.get('metrics')}", flush=True)
        stop.wait()
    finally:
        print("dspark fleet shutting down", file=sys.stderr, flush=True)
        fleet.stop()
    return 0
