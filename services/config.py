"""The fleet's one validated config (`deploy/serve/fleet.yaml`): model, speculation method,
KV transport, Redis and one pool per role. Rejects unknown keys (`extra="forbid"`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dspark.engine.config import EngineConfig, EngineOptions, TargetDtype
from dspark.errors import UserError
from services.security.config import SecurityConfig

POOL_NAMES = ("prefill", "target", "drafter")
# Proposers built on the target model (they read its tapped features and share its
# embeddings): their drafter pool must load the target.
TARGET_READING_METHODS = ("dspark", "dflash", "hybrid")
DEPLOYMENT_NAMES = {"prefill": "PrefillWorker", "target": "TargetWorker", "drafter": "DrafterWorker"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolConfig(_Strict):
    replicas: int = Field(1, ge=1, le=64, description="replicas of this role; each is its own "
                          "named deployment so a request can stay sticky to the one holding its state")
    num_cpus: float = Field(0.5, ge=0, description="Ray logical CPUs per replica")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per "
                                        "replica, e.g. {pool_target: 0.5}: pins the replica to its pool's nodes")
    accelerator_type: str | None = Field(None, description="Ray accelerator_type constraint (e.g. H100)")
    device: str = Field("cpu", description="torch device of the replica: cpu | cuda")
    dtype: TargetDtype | None = Field(None, description="override of the fleet dtype")
    compile: bool | None = Field(None, description="override of the fleet's compile setting")
    hourly_cost: float = Field(0.0, ge=0, description="USD per replica-hour, exported for cost per token")
    max_batch_size: int = Field(16, ge=1, description="calls batched into one forward (Serve dynamic "
                                "batching); for the target also its number of KV slots")
    batch_wait_timeout_s: float = Field(0.002, ge=0, description="how long a batch waits to fill")
    load_target: bool = Field(True, description="drafter only: load the target model for the "
                              "proposer (model-free proposers such as ngram do not need it)")


def _pool(**overrides: object) -> PoolConfig:
    return PoolConfig(**overrides)  # type: ignore[arg-type]


class FleetConfig(EngineOptions):
    """The engine options (`dspark.engine.config.EngineOptions`, declared once for the CLI
    and the fleet) with the fleet's defaults, plus admission, transport, state and pools."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)  # YAML and env values

    dtype: TargetDtype = Field("auto", description="default dtype of every pool: auto (bfloat16 where "
                              "the replica's CPU has AVX512-BF16/AMX or its GPU has bf16, else float32), "
                              "float32 (the exactness reference), bfloat16, int8 (CPU weight-only)")
    method: str = Field("ngram", description="speculation method: ar or a registered proposer")
    max_new_tokens: int = Field(1024, ge=1, description="upper limit a request may ask for")
    default_max_new_tokens: int = Field(256, ge=1, description="when a request does not say")
    max_in_flight: int = Field(64, ge=1, description="requests generating at once (also capped by the "
                               "target pool's KV slots); more wait in the queue")
    max_queued: int = Field(64, ge=0, description="requests waiting for room; one more is refused "
                            "with RESOURCE_EXHAUSTED/429")
    kv_transport: Literal["gloo", "nccl", "object_store"] = Field(
        "gloo", description="prefill -> target KV transport backend")
    kv_timeout_s: float = Field(60.0, gt=0, description="KV transfer connect/operation timeout")
    redis_url: str | None = Field(None, description="Redis for state; None: `dspark serve` starts one")
    redis_namespace: str = Field("dspark", description="key prefix in Redis")
    recovery_timeout_s: float = Field(120.0, gt=0, description="how long a request waits for a "
                                      "healthy replica after its target or drafter died")
    app_name: str = Field("dspark", description="Ray Serve application name")
    drafter_timeout_s: float = Field(10.0, gt=0, description="a drafter call slower than this counts "
                                     "as a failed drafter: the request continues as plain decoding")
    security: SecurityConfig = Field(default_factory=SecurityConfig, description="API keys, TLS, rate "
                                     "limit and request-size limits of the public fronts")
    pools: dict[Literal["prefill", "target", "drafter"], PoolConfig] = Field(
        default_factory=lambda: {name: _pool(resources={f"pool_{name}": 0.5}) for name in POOL_NAMES},
        description="one pool per role")

    @model_validator(mode="after")
    def _drafter_loads_target(self) -> FleetConfig:
        if self.method in TARGET_READING_METHODS and not self.pool("drafter").load_target:
            raise ValueError(f"method {self.method} drafts from the target's features: set "
                             "pools.drafter.load_target: true")
        return self

    def pool(self, name: str) -> PoolConfig:
        return self.pools.get(name) or PoolConfig()  # type: ignore[call-overload]

    def deployment_names(self, pool: str) -> list[str]:
        """Replica i of a pool is deployment `<Base>` (i = 0) or `<Base><i>`."""
        base = DEPLOYMENT_NAMES[pool]
        return [base if i == 0 else f"{base}{i}" for i in range(self.pool(pool).replicas)]

    def engine_spec(self, pool: str) -> EngineConfig:
        """The pool's engine; `auto` becomes the dtype the pool's device runs best, resolved
        where the replica runs (its machine's CPU flags, not the router's)."""
        p = self.pool(pool)
        shared = self.model_dump(include=set(EngineOptions.model_fields))
        shared |= {"dtype": p.dtype or self.dtype, "compile": self.compile if p.compile is None else p.compile}
        return EngineConfig.of(**shared, device=p.device, max_batch_size=p.max_batch_size).resolved()

    def pool_resources(self) -> dict[str, float]:
        """Custom resources a local Ray must offer so every replica fits (simulated pools)."""
        total: dict[str, float] = {}
        for name in POOL_NAMES:
            p = self.pool(name)
            for key, amount in p.resources.items():
                total[key] = total.get(key, 0.0) + amount * p.replicas
        return {key: float(math.ceil(amount)) for key, amount in total.items()}  # Ray wants whole numbers


def read_config(path: str | Path | None) -> dict[str, Any]:
    """The YAML mapping at `path` (empty for None), not yet validated."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise UserError(f"cannot read fleet config {path}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"fleet config {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"fleet config {path} must be a mapping, not {type(data).__name__}")
    return data


def validate_config(data: dict[str, Any], origin: str) -> FleetConfig:
    try:
        return FleetConfig.model_validate(data)
    except ValueError as e:
        raise UserError(f"invalid fleet config {origin}: {e}") from None


def load_config(path: str | Path | None = None, **overrides: object) -> FleetConfig:
    """Read YAML (or defaults when `path` is None), apply `overrides`, validate."""
    data = read_config(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return validate_config(data, str(path or "(defaults)"))
