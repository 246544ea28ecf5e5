"""`dspark serve` settings: each source (flag, DSPARK_* variable, YAML, default), their order,
and a clear error for malformed values and unknown variables (services/settings.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dspark.errors import UserError
from services.settings import add_arguments, known_variables, resolve


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults() -> None:
    s = resolve(parse(), {})
    assert (s.process.host, s.process.grpc_port, s.process.http_port, s.process.metrics_port) == (
        "127.0.0.1", 50051, 8000, 9400)
    assert s.process.ray_metrics_port is None and s.process.ray_address is None and not s.process.attach
    assert s.fleet.redis_url is None and s.fleet.method == "ngram"  # deploy/serve/fleet.yaml
    assert s.fleet.pool("target").replicas == 1


def test_environment() -> None:
    s = resolve(parse(), {"DSPARK_REDIS_URL": "redis://redis:6379/0", "DSPARK_HOST": "0.0.0.0",
                          "DSPARK_GRPC_PORT": "6000", "DSPARK_RAY_METRICS_PORT": "8080",
                          "DSPARK_MODEL": "gemma3-270m", "DSPARK_POOL_TARGET_REPLICAS": "2",
                          "DSPARK_POOL_TARGET_RESOURCES": "{pool_target: 1}",
                          "DSPARK_RATE_LIMIT": "2.5", "DSPARK_CACHE": "/elsewhere"})
    assert (s.process.host, s.process.grpc_port, s.process.ray_metrics_port) == ("0.0.0.0", 6000, 8080)
    assert s.fleet.redis_url == "redis://redis:6379/0" and s.fleet.model == "gemma3-270m"
    target = s.fleet.pool("target")
    assert (target.replicas, target.resources) == (2, {"pool_target": 1.0})
    assert s.fleet.pool("prefill").resources == {"pool_prefill": 0.5}  # the YAML's other pools stay
    assert s.fleet.security.rate_limit_per_s == 2.5


def test_flags() -> None:
    s = resolve(parse("--host", "0.0.0.0", "--grpc-port", "7000", "--redis-url", "redis://r:1/0",
                      "--method", "ar", "--pool", "drafter.num_gpus=1", "--tls-cert", "c.pem",
                      "--tls-key", "k.pem"), {})
    assert (s.process.host, s.process.grpc_port, s.fleet.redis_url, s.fleet.method) == (
        "0.0.0.0", 7000, "redis://r:1/0", "ar")
    assert s.fleet.pool("drafter").num_gpus == 1
    assert s.fleet.security.tls_cert_file == Path("c.pem")


def test_flag_beats_environment_beats_yaml(tmp_path: Path) -> None:
    config = tmp_path / "fleet.yaml"
    config.write_text("method: ar\nblock_size: 3\npools: {target: {replicas: 3}}\n")
    env = {"DSPARK_CONFIG": str(config), "DSPARK_BLOCK_SIZE": "5", "DSPARK_GRPC_PORT": "6000",
           "DSPARK_POOL_TARGET_REPLICAS": "2"}
    s = resolve(parse("--grpc-port", "7000", "--pool", "target.replicas=4"), env)
    assert s.process.config == config
    assert (s.process.grpc_port, s.fleet.block_size, s.fleet.method) == (7000, 5, "ar")
    assert s.fleet.pool("target").replicas == 4
    assert resolve(parse(), env).fleet.pool("target").replicas == 2


def test_empty_variable_is_unset_and_none_clears() -> None:
    s = resolve(parse(), {"DSPARK_REDIS_URL": "", "DSPARK_RAY_METRICS_PORT": "none"})
    assert s.fleet.redis_url is None and s.process.ray_metrics_port is None


def test_ray_address_attaches() -> None:
    s = resolve(parse(), {"DSPARK_RAY_ADDRESS": "ray://head:10001"})
    assert s.process.ray_address == "ray://head:10001" and s.process.attach
    assert resolve(parse(), {"RAY_ADDRESS": "head:6379"}).process.ray_address == "head:6379"
    assert not resolve(parse("--serve-app", "deploy"), {"RAY_ADDRESS": "head:6379"}).process.attach


@pytest.mark.parametrize("argv,env,names", [
    ((), {"DSPARK_GRPC_PORT": "fifty"}, "DSPARK_GRPC_PORT='fifty'"),
    (("--grpc-port", "70000"), {}, "--grpc-port='70000'"),
    ((), {"DSPARK_POOL_TARGET_REPLICAS": "0"}, "DSPARK_POOL_TARGET_REPLICAS='0'"),
    ((), {"DSPARK_DTYPE": "float16"}, "DSPARK_DTYPE='float16'"),
    ((), {"DSPARK_SERVE_APP": "maybe"}, "DSPARK_SERVE_APP='maybe'"),
    ((), {"DSPARK_POOL_TARGET_RESOURCES": "[1, 2"}, "DSPARK_POOL_TARGET_RESOURCES"),
    (("--pool", "target.replicas"), {}, "--pool 'target.replicas'"),
    (("--pool", "gpu.replicas=1"), {}, "--pool 'gpu.replicas=1'"),
])  # fmt: skip
def test_malformed_value_names_its_source(argv: tuple[str, ...], env: dict[str, str], names: str) -> None:
    with pytest.raises(UserError) as err:
        resolve(parse(*argv), env)
    assert names in str(err.value)


def test_unknown_variable_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(UserError, match=r"DSPARK_REDIS_ULR \(did you mean DSPARK_REDIS_URL\?\)"):
        resolve(parse(), {"DSPARK_REDIS_ULR": "redis://r:1/0"})
    with pytest.raises(UserError, match="DSPARK_POOL_GPU_REPLICAS"):
        resolve(parse(), {"DSPARK_POOL_GPU_REPLICAS": "1"})


def test_cross_field_rules_still_apply() -> None:
    with pytest.raises(UserError, match="load_target"):
        resolve(parse("--method", "dspark"), {})  # the shipped YAML's drafter does not load the target
    s = resolve(parse("--method", "dspark", "--pool", "drafter.load_target=true"), {})
    assert s.fleet.method == "dspark"


def test_every_variable_has_a_flag_by_the_naming_rule() -> None:
    for name in known_variables():
        assert name.startswith("DSPARK_") and name == name.upper()


def test_every_variable_is_documented() -> None:
    docs = (Path(__file__).resolve().parents[3] / "docs/deploy.md").read_text()
    missing = [name for name in known_variables() if "_POOL_" not in name and f"`{name}`" not in docs]
    assert missing == []
