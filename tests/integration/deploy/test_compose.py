"""docker-compose.yml and docker/Dockerfile, checked without a Docker engine."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REPO, run

pytestmark = pytest.mark.integration

COMPOSE = REPO / "docker-compose.yml"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_matches_compose_spec() -> None:
    check = Path(sys.executable).with_name("check-jsonschema")
    result = run([check, "--builtin-schema", "vendor.compose-spec", COMPOSE])
    assert result.returncode == 0, result.stdout + result.stderr


def test_builds_and_bind_mounts_exist() -> None:
    services = compose()["services"]
    builds = [s["build"] for s in services.values() if "build" in s]
    assert builds, "the fleet image must be built from this repo"
    for build in builds:
        context = REPO / build["context"]
        assert context.is_dir(), context
        assert (context / build.get("dockerfile", "Dockerfile")).is_file(), build
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source} missing"


def test_fleet_service_wiring() -> None:
    services = compose()["services"]
    assert {"redis", "fleet", "prometheus", "grafana"} <= services.keys()
    fleet = services["fleet"]
    assert fleet["command"][:2] == ["dspark", "serve"]
    assert fleet["environment"]["DSPARK_REDIS_URL"] == "redis://redis:6379/0"
    for service in services.values():  # host ports on loopback only
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port


def test_prometheus_targets_are_compose_services() -> None:
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    services = compose()["services"]
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host = target.split(":")[0]
                assert host in services or host == "localhost", f"{job['job_name']}: {target}"


def test_dockerfile() -> None:
    text = (REPO / "docker/Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
    for source in re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s", text, re.M):
        assert (REPO / source).exists(), f"COPY source {source} missing"
