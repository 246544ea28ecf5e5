"""Every setting of a `dspark serve` process, from flags or `DSPARK_*` environment variables.

Precedence, highest first: the command-line flag, its environment variable, the fleet YAML
(`--config`; fleet, security and pool fields only), the built-in default. Names follow one
rule: the flag `--some-name` reads the variable `DSPARK_SOME_NAME`; pool fields are
`--pool POOL.FIELD=VALUE` and `DSPARK_POOL_<POOL>_<FIELD>` (`DSPARK_POOL_TARGET_NUM_GPUS=1`).
Ray's own `RAY_ADDRESS` is honoured when neither `--ray-address` nor `DSPARK_RAY_ADDRESS`
is given.

Each value is validated on its own, with the type and limits of the field it sets, so an
error names the flag or variable it came from. An empty variable counts as unset; `none`
or `null` clears an optional field. A `DSPARK_*` variable that nothing in dspark reads is
an error too: a misspelt name would otherwise be ignored without a word.
"""

from __future__ import annotations

import argparse
import difflib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from dspark.errors import UserError
from services.config import POOL_NAMES, FleetConfig, PoolConfig, read_config, validate_config
from services.ray_env import LOOPBACK
from services.security.config import SecurityConfig

ENV_PREFIX = "DSPARK_"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "serve" / "fleet.yaml"
# DSPARK_* variables other parts of dspark read; `dspark serve` accepts them in its environment.
OTHER_VARIABLES = {
    "DSPARK_CACHE": "model and data cache (dspark/paths.py)",
    "DSPARK_EVAL_DIR": "evaluation prompts (dspark/paths.py)",
    "DSPARK_API_KEY": "API key sent by `dspark client` and `dspark loadtest`",
    "DSPARK_LOADTEST_REPORT": "report file of the load-test test",
    "DSPARK_LOADTEST_S": "duration of the load-test test",
}


class ProcessSettings(BaseModel):
    """Settings of the serving process itself (not part of the fleet YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: Path | None = Field(None, description="fleet YAML (default: deploy/serve/fleet.yaml of "
                                "the checkout when present, else built-in defaults)")
    host: str = Field(LOOPBACK, description="address the gRPC, HTTP and metrics ports bind "
                      "(0.0.0.0 in containers)")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free port)")
    http_port: int = Field(8000, ge=0, le=65535, description="OpenAI-compatible HTTP port (0: any free port)")
    metrics_port: int = Field(9400, ge=0, le=65535, description="Prometheus /metrics of the router")
    ray_metrics_port: int | None = Field(None, ge=0, le=65535, description="also serve the local Ray "
                                         "node's metrics (ray_* series) on this port of --host; none: off")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of the local Ray (default 4)")
    ray_address: str | None = Field(None, description="use this Ray cluster (ray://HOST:10001 or "
                                    "HOST:6379) instead of starting one")
    serve_app: Literal["auto", "deploy", "attach"] = Field(
        "auto", description="deploy: this process deploys the Serve application; attach: wait for the "
        "one another party deployed (KubeRay's serveConfigV2); auto: attach with --ray-address, else deploy")
    deploy_timeout_s: float = Field(300.0, gt=0, description="how long to wait for the Serve "
                                    "application to be RUNNING")

    @property
    def attach(self) -> bool:
        return self.serve_app == "attach" or (self.serve_app == "auto" and self.ray_address is not None)


# flag name (without --) -> SecurityConfig field; flags predate the rule for fleet fields.
SECURITY_FLAGS = {"api-key-file": "api_key_file", "tls-cert": "tls_cert_file", "tls-key": "tls_key_file",
                  "tls-client-ca": "tls_client_ca_file", "rate-limit": "rate_limit_per_s",
                  "rate-limit-burst": "rate_limit_burst", "max-prompt-bytes": "max_prompt_bytes",
                  "max-messages": "max_messages"}
FLEET_FIELDS = tuple(name for name in FleetConfig.model_fields if name not in ("pools", "security"))


@dataclass(frozen=True)
class Option:
    """One flag/variable pair and the model field it sets."""

    flag: str       # without the leading --
    model: type[BaseModel]
    field: str

    @property
    def dest(self) -> str:
        return self.flag.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


def _flag(field: str) -> str:
    return field.replace("_", "-")


PROCESS_OPTIONS = tuple(Option(_flag(f), ProcessSettings, f) for f in ProcessSettings.model_fields)
FLEET_OPTIONS = tuple(Option(_flag(f), FleetConfig, f) for f in FLEET_FIELDS)
SECURITY_OPTIONS = tuple(Option(flag, SecurityConfig, f) for flag, f in SECURITY_FLAGS.items())
OPTIONS = PROCESS_OPTIONS + FLEET_OPTIONS + SECURITY_OPTIONS


def pool_variable(pool: str, field: str) -> str:
    return f"{ENV_PREFIX}POOL_{pool.upper()}_{field.upper()}"


POOL_VARIABLES = {pool_variable(p, f): (p, f) for p in POOL_NAMES for f in PoolConfig.model_fields}


@dataclass(frozen=True)
class ServeSettings:
    process: ProcessSettings
    fleet: FleetConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option as a flag; values stay strings here and are validated in `resolve`."""
    groups = (("process", PROCESS_OPTIONS), ("fleet (over the YAML)", FLEET_OPTIONS),
              ("edge security (over the YAML's security:)", SECURITY_OPTIONS))
    for title, options in groups:
        group = parser.add_argument_group(title)
        for opt in options:
            info = opt.model.model_fields[opt.field]
            group.add_argument(f"--{opt.flag}", dest=opt.dest, default=None, metavar=_metavar(info.annotation),
                               help=f"{info.description} [{opt.env}]")
    parser.add_argument("--pool", action="append", default=None, metavar="POOL.FIELD=VALUE",
                        help="a pool field over the YAML, e.g. target.replicas=2 or target.num_gpus=1 "
                        "(repeatable) [DSPARK_POOL_<POOL>_<FIELD>]")


def resolve(args: argparse.Namespace | None, environ: Mapping[str, str]) -> ServeSettings:
    """Flags, then environment, then YAML, then defaults; raises UserError naming the source."""
    _reject_unknown_variables(environ)
    values: dict[Option, tuple[Any, str]] = {}  # option -> (validated value, where it came from)
    for opt in OPTIONS:
        raw, source = _raw_value(opt, args, environ)
        if source:
            values[opt] = (_validate(opt.model, opt.field, raw, source), source)
    ray_address = environ.get("RAY_ADDRESS")
    process_fields = {o.field: v for o, (v, _) in values.items() if o.model is ProcessSettings}
    if "ray_address" not in process_fields and ray_address:
        process_fields["ray_address"] = _validate(ProcessSettings, "ray_address", ray_address, "RAY_ADDRESS")
    process = ProcessSettings(**process_fields)

    path = process.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    data = read_config(path)
    for opt, (value, _) in values.items():
        if opt.model is FleetConfig:
            data[opt.field] = value
    security = {o.field: v for o, (v, _) in values.items() if o.model is SecurityConfig}
    if security:
        data["security"] = {**(data.get("security") or {}), **security}
    _apply_pool_overrides(data, args, environ)
    origin = f"{path or '(defaults)'} with flags and DSPARK_* variables"
    return ServeSettings(process=process, fleet=validate_config(data, origin))


def _raw_value(opt: Option, args: argparse.Namespace | None, environ: Mapping[str, str]) -> tuple[str, str]:
    flag_value = getattr(args, opt.dest, None) if args is not None else None
    if flag_value is not None:
        return flag_value, f"--{opt.flag}"
    env_value = environ.get(opt.env, "")
    return (env_value, opt.env) if env_value != "" else ("", "")


def _apply_pool_overrides(data: dict[str, Any], args: argparse.Namespace | None,
                          environ: Mapping[str, str]) -> None:
    """Environment first, flags over it, each into pools.<pool>.<field> of the YAML data."""
    overrides: list[tuple[str, str, str, str]] = []  # pool, field, raw, source
    for name, (pool, field) in POOL_VARIABLES.items():
        if environ.get(name, "") != "":
            overrides.append((pool, field, environ[name], name))
    for item in (getattr(args, "pool", None) or []) if args is not None else []:
        key, sep, raw = item.partition("=")
        pool, dot, field = key.strip().partition(".")
        if not (sep and dot) or pool not in POOL_NAMES or field not in PoolConfig.model_fields:
            raise UserError(f"--pool {item!r}: expected POOL.FIELD=VALUE with POOL one of "
                            f"{', '.join(POOL_NAMES)} and FIELD one of {', '.join(PoolConfig.model_fields)}")
        overrides.append((pool, field, raw, f"--pool {key}"))
    if not overrides:
        return
    pools = data.get("pools")
    if pools is None:  # start from the built-in pools, not from an empty mapping
        pools = {name: p.model_dump(mode="json") for name, p in FleetConfig().pools.items()}
    for pool, field, raw, source in overrides:
        value = _validate(PoolConfig, field, raw, source)
        pools.setdefault(pool, {})[field] = value
    data["pools"] = pools


def _validate(model: type[BaseModel], field: str, raw: str, source: str) -> Any:
    info = model.model_fields[field]
    annotation = info.annotation
    if raw.strip().lower() in ("none", "null") and _optional(annotation):
        return None
    value: Any = raw
    if typing.get_origin(annotation) is dict:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise UserError(f"{source}={raw!r}: expected a mapping such as '{{pool_target: 1}}'") from None
    try:
        adapter = TypeAdapter(Annotated[(annotation, *info.metadata)] if info.metadata else annotation)
        validated = adapter.validate_python(value)
    except ValidationError as e:
        reason = "; ".join(err["msg"] for err in e.errors())
        raise UserError(f"{source}={raw!r}: {reason} ({info.description})") from None
    return validated.as_posix() if isinstance(validated, Path) else validated


def _optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _metavar(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if len(args) == 1 else annotation
    if typing.get_origin(base) is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(base)) + "}"
    return {int: "N", float: "X", bool: "BOOL", Path: "PATH"}.get(base, "VALUE")


def known_variables() -> list[str]:
    return sorted({o.env for o in OPTIONS} | set(POOL_VARIABLES) | set(OTHER_VARIABLES))


def _reject_unknown_variables(environ: Mapping[str, str]) -> None:
    known = set(known_variables())
    unknown = sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise UserError(f"unknown environment variable {', '.join(hints)}: dspark serve reads "
                    f"{', '.join(o.env for o in OPTIONS)} and DSPARK_POOL_<POOL>_<FIELD>; "
                    "see docs/deploy.md")
