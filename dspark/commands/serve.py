"""Run the fleet: local Ray (simulated pools) or an existing cluster, Redis, Serve app, router.

Every setting comes from a flag or its `DSPARK_*` environment variable (flags win), over the
fleet YAML: see services/settings.py and docs/deploy.md. `--api-key-file` turns on API keys
for both fronts (gRPC metadata `authorization: Bearer <key>`, HTTP `Authorization: Bearer
<key>`; keys from `dspark keys add`), `--tls-cert` and `--tls-key` serve both fronts over
TLS, `--rate-limit` limits requests per key (in Redis).

SIGTERM (docker stop, Kubernetes, systemd) and SIGINT stop the fleet the same way: the
router stops, the application this process deployed is deleted, a local Ray and a private
redis-server are shut down and their temporary folders removed; the exit status is 0."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def add_arguments(p: argparse.ArgumentParser) -> None:
    from services.settings import add_arguments as add_settings

    add_settings(p)


def run(args: argparse.Namespace) -> int:
    from services.ray_env import ray_env

    ray_env()  # before anything imports ray (it reads the loopback switch at import time)
    from services.settings import resolve

    settings = resolve(args, os.environ)
    cfg, proc = settings.fleet, settings.process
    if cfg.security.api_key_file is not None:
        from services.security.auth import ApiKeyAuth

        ApiKeyAuth.from_file(cfg.security.api_key_file)  # fail now, with the file's own error
    from services.launcher import LocalFleet

    _interrupt_on(signal.SIGTERM, signal.SIGINT)
    fleet = LocalFleet(cfg, proc.host, proc.grpc_port, proc.http_port, proc.metrics_port, proc.num_cpus,
                       proc.deploy_timeout_s, ray_address=proc.ray_address, attach=proc.attach,
                       ray_metrics_port=proc.ray_metrics_port)
    try:
        fleet.start()  # restores our SIGTERM handler after ray.init (services/launcher.py)
        ports, sec = fleet.ports, cfg.security
        mode = ("tls" if sec.tls_cert_file else "plaintext") + (", api keys" if sec.api_key_file else "")
        ray_metrics = f" ray-metrics={proc.host}:{ports['ray_metrics']}" if "ray_metrics" in ports else ""
        print(f"dspark fleet ready: grpc={proc.host}:{ports['grpc']} http={proc.host}:{ports['http']} "
              f"metrics={proc.host}:{ports.get('metrics')}{ray_metrics} ({mode})", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        # A second signal must not cut the clean-up short (Kubernetes may resend, users press ^C twice).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        print("dspark fleet shutting down", file=sys.stderr, flush=True)
        fleet.stop()
        print("dspark fleet stopped", file=sys.stderr, flush=True)
    return 0


def _interrupt_on(*signals: signal.Signals) -> None:
    """SIGTERM behaves like Ctrl-C: KeyboardInterrupt in the main thread, wherever it is
    (starting, serving), so both leave through the same clean-up."""
    for sig in signals:
        signal.signal(sig, signal.default_int_handler)
