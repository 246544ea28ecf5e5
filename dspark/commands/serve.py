"""Run the fleet: local Ray (simulated pools) or RAY_ADDRESS, Redis, Serve app, router.

`--api-key-file` turns on API keys for both fronts (gRPC metadata `authorization: Bearer
<key>`, HTTP `Authorization: Bearer <key>`; keys from `dspark keys add`), `--tls-cert` and
`--tls-key` serve both fronts over TLS, `--rate-limit` limits requests per key (in Redis).
These override the config file's `security:` section."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from dspark.errors import UserError

if TYPE_CHECKING:
    from services.config import FleetConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "serve" / "fleet.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help=f"fleet YAML (default: {DEFAULT_CONFIG} when present)")
    p.add_argument("--host", default="127.0.0.1", help="address the gRPC/HTTP/metrics fronts bind")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=9400)
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray")
    p.add_argument("--api-key-file", default=None, help="hashed API keys (`dspark keys add`): require a key")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: TLS on the gRPC and HTTP ports")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, help="PEM CA: require client certificates (mTLS)")
    p.add_argument("--rate-limit", type=float, default=None, help="requests per second per API key")
    p.add_argument("--rate-limit-burst", type=int, default=None, help="requests a key may send at once")


SECURITY_FLAGS = {"api_key_file": "api_key_file", "tls_cert": "tls_cert_file", "tls_key": "tls_key_file",
                  "tls_client_ca": "tls_client_ca_file", "rate_limit": "rate_limit_per_s",
                  "rate_limit_burst": "rate_limit_burst"}


def apply_security_flags(cfg: FleetConfig, args: argparse.Namespace) -> FleetConfig:
    """Command-line security flags over the config file's `security:` section (validated)."""
    from services.security.config import SecurityConfig

    flags = {field: getattr(args, flag) for flag, field in SECURITY_FLAGS.items()
             if getattr(args, flag, None) is not None}
    if not flags:
        return cfg
    try:
        security = SecurityConfig.model_validate({**cfg.security.model_dump(), **flags})
    except ValueError as e:
        raise UserError(f"invalid security options: {e}") from None
    if security.api_key_file is not None:
        from services.security.auth import ApiKeyAuth

        ApiKeyAuth.from_file(security.api_key_file)  # fail now, with the file's own error
    return cfg.model_copy(update={"security": security})


def run(args: argparse.Namespace) -> int:
    from services.ray_env import ray_env

    ray_env()  # before anything imports ray (it reads the loopback switch at import time)
    from services.config import load_config
    from services.launcher import LocalFleet

    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    cfg = apply_security_flags(load_config(path), args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    fleet = LocalFleet(cfg, args.host, args.grpc_port, args.http_port, args.metrics_port, args.num_cpus)
    try:
        fleet.start()
        ports = fleet.ports
        sec = cfg.security
        mode = ("tls" if sec.tls_cert_file else "plaintext") + (", api keys" if sec.api_key_file else "")
        print(f"dspark fleet ready: grpc={args.host}:{ports['grpc']} http={args.host}:{ports['http']} "
              f"metrics={args.host}:{ports.get('metrics')} ({mode})", flush=True)
        stop.wait()
    finally:
        print("dspark fleet shutting down", file=sys.stderr, flush=True)
        fleet.stop()
    return 0
