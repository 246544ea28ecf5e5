"""Build the Ray Serve application from one validated fleet config.

Each replica of a pool is its own named deployment (`TargetWorker`, `TargetWorker1`, ...)
with one Serve replica: a request's KV and drafter state live in one process, and a named
deployment is the simplest address that stays sticky. Serve restarts a dead one; the
router re-prefills onto whichever replica is healthy. A small ingress deployment (`Fleet`)
binds them all so `serve run`/`serve deploy` of this one import path deploys everything.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.deployment import Application

from services.config import FleetConfig, load_config
from services.workers.drafter import DrafterWorker
from services.workers.prefill import PrefillWorker
from services.workers.target import TargetWorker

WORKER_CLASSES = {"prefill": PrefillWorker, "target": TargetWorker, "drafter": DrafterWorker}
INGRESS = "Fleet"


class Fleet:
    """Ingress: holds every worker deployment so one application deploys the whole fleet."""

    def __init__(self, **workers: Any) -> None:
        self.names = sorted(workers)

    def deployments(self) -> list[str]:
        return self.names


def worker_deployment(cfg: FleetConfig, pool: str, name: str) -> Application:
    p = cfg.pool(pool)
    actor: dict[str, Any] = {"num_cpus": p.num_cpus, "num_gpus": p.num_gpus,
                             "resources": dict(p.resources),
                             # Few cores per replica: torch must not spawn a thread per core.
                             "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}}
    if p.accelerator_type:
        actor["accelerator_type"] = p.accelerator_type
    deployment = serve.deployment(WORKER_CLASSES[pool]).options(
        name=name, num_replicas=1, ray_actor_options=actor,
        # Batching needs many calls in flight per replica (Serve's default is 5).
        max_ongoing_requests=max(64, 4 * p.max_batch_size), health_check_period_s=2,
        health_check_timeout_s=30, graceful_shutdown_timeout_s=2)
    return deployment.bind(cfg.model_dump(mode="json"), name)


def build_fleet(cfg: FleetConfig) -> Application:
    workers = {name: worker_deployment(cfg, pool, name)
               for pool in WORKER_CLASSES for name in cfg.deployment_names(pool)}
    ingress = serve.deployment(Fleet).options(name=INGRESS, num_replicas=1,
                                              ray_actor_options={"num_cpus": 0})
    return ingress.bind(**workers)


def build_app(args: dict[str, Any] | None = None, *, config_path: str | None = None,
              **overrides: Any) -> Application:
    """Serve builder (`import_path: services.app:build_app`, args {config_path, redis_url,
    ...any FleetConfig field}). Called by `serve run/deploy` with the args dict."""
    merged = {**(args or {}), **overrides}
    path = config_path or merged.pop("config_path", None)
    return build_fleet(load_config(path, **merged))
