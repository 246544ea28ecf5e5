"""The Helm chart: lint, render, validate every manifest offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .conftest import CHART, REPO, SCHEMAS, run

pytestmark = pytest.mark.integration

# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest bundled schema.
KUBERNETES_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
POOLS = ("prefill", "target", "drafter")
CRD_SCHEMAS = {
    "RayService": "rayservice-ray.io-v1.json",
    "ServiceMonitor": "servicemonitor-monitoring.coreos.com-v1.json",
    "PrometheusRule": "prometheusrule-monitoring.coreos.com-v1.json",
}
# Value sets that change which templates render; each must lint and validate.
VARIANTS = {
    "default": [],
    "external-redis": ["--set", "redis.enabled=false", "--set", "redis.externalUrl=redis://redis.example:6379/0"],
    "no-monitoring": ["--set", "serviceMonitor.enabled=false", "--set", "prometheusRule.enabled=false",
                      "--set", "grafanaDashboards.enabled=false"],
    "gpu-pools": ["--set", "pools.target.numGpus=1", "--set", "pools.target.device=cuda",
                  "--set", "pools.target.acceleratorType=H100", "--set-json", "pools.target.hourlyCost=4.5",
                  "--set", "pools.target.replicas=2", "--set-json", "pools.drafter.numCpus=0.5",
                  "--set-string", "pools.target.workerGroup.resources.limits.nvidia\\.com/gpu=1",
                  "--set", "pools.target.workerGroup.nodeSelector.gpu=h100"],
}  # fmt: skip


def load_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def pod_templates(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [g["template"] for g in groups]


@pytest.mark.parametrize("variant", VARIANTS)
def test_lint_strict(helm: Path, variant: str) -> None:
    result = run([helm, "lint", "--strict", CHART, *VARIANTS[variant]])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "bad_value",
    [
        "pools.target.replicas=two",
        "pools.extra.replicas=1",
        "router.ports.grpc=70000",
        "image.pullPolicy=Sometimes",
        "pools.target.device=tpu",
        "fleet.redis_url=redis://elsewhere:6379/0",  # the chart owns redis_url
    ],
)
def test_schema_rejects_bad_values(helm: Path, bad_value: str) -> None:
    result = run([helm, "lint", "--strict", CHART, "--set", bad_value])
    assert result.returncode != 0, f"{bad_value} was accepted"


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_validate(render_chart, variant: str) -> None:
    manifests = render_chart(*VARIANTS[variant])
    for manifest in manifests:
        kind = manifest["kind"]
        if kind in CRD_SCHEMAS:
            jsonschema.validate(manifest, load_schema(CRD_SCHEMAS[kind]))
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(manifest, version, strict=True)


def test_expected_objects(render_chart) -> None:
    kinds = sorted(m["kind"] for m in render_chart())
    assert kinds == sorted(
        ["RayService", "Deployment", "Service", "Deployment", "Service", "Service", "ServiceMonitor",
         "PrometheusRule", "ConfigMap", "ConfigMap"]
    )  # fmt: skip


def test_ray_pod_templates_validate(render_chart) -> None:
    """Pod templates inside the RayService are checked in full as core/v1 PodTemplates."""
    (rayservice,) = by_kind(render_chart(*VARIANTS["gpu-pools"]), "RayService")
    for i, template in enumerate(pod_templates(rayservice)):
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"t{i}"},
            "template": template,
        }
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(wrapped, version, strict=True)


def fleet_config(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (cm,) = [m for m in by_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-fleet")]
    return yaml.safe_load(cm["data"]["fleet.yaml"])


def test_worker_groups_match_serve_deployments(render_chart) -> None:
    """Each pool's worker group advertises pool_<name>; its Serve replicas request it, and the
    application is deployed once, from the fleet config (no per-deployment overrides)."""
    manifests = render_chart()
    (rayservice,) = by_kind(manifests, "RayService")
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    jsonschema.validate(serve_config, load_schema("serve-config.json"))
    (app,) = serve_config["applications"]
    assert set(app) == {"name", "import_path", "args"}
    assert app["args"] == fleet_config(manifests)
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert sorted(groups) == sorted(POOLS)
    for pool, group in groups.items():
        # KubeRay passes this to `ray start --resources=...`: a quoted JSON object.
        resources = json.loads(json.loads(group["rayStartParams"]["resources"]))
        assert resources == {f"pool_{pool}": 1}
        assert app["args"]["pools"][pool]["resources"] == {f"pool_{pool}": 1}
        assert group["template"]["metadata"]["labels"]["dspark.io/ray-node"] == pool
        assert group["rayStartParams"]["metrics-export-port"] == "8080"


def test_fleet_config_is_valid_and_matches_the_local_one(render_chart) -> None:
    """The rendered config passes FleetConfig; its settings equal deploy/serve/fleet.yaml's
    except where a cluster differs (whole CPUs and pool resources per replica, Redis, and the
    dtype: the local fleet pins the fp32 reference, a cluster lets each machine choose)."""
    from services.config import validate_config

    rendered = fleet_config(render_chart())
    cfg = validate_config(dict(rendered), "chart")
    local = yaml.safe_load((REPO / "deploy/serve/fleet.yaml").read_text())
    for key, value in local.items():
        if key not in ("pools", "redis_url", "dtype"):
            assert rendered[key] == value, key
    assert cfg.dtype == "auto"
    for pool, spec in local["pools"].items():
        for key, value in spec.items():
            if key not in ("num_cpus", "resources"):
                assert rendered["pools"][pool][key] == value, f"{pool}.{key}"
    assert cfg.redis_url == "redis://rel-dspark-redis:6379/0" and cfg.app_name == "dspark"


def test_pools_are_sized_independently(render_chart) -> None:
    manifests = render_chart(*VARIANTS["gpu-pools"])
    pools = fleet_config(manifests)["pools"]
    assert (pools["target"]["num_gpus"], pools["target"]["device"], pools["target"]["accelerator_type"],
            pools["target"]["hourly_cost"], pools["target"]["replicas"]) == (1, "cuda", "H100", 4.5, 2)
    assert pools["drafter"]["num_cpus"] == 0.5 and pools["prefill"]["num_cpus"] == 1
    assert all(pools[p]["num_gpus"] == 0 and "accelerator_type" not in pools[p] for p in ("prefill", "drafter"))
    (rayservice,) = by_kind(manifests, "RayService")
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    limits = groups["target"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in groups["prefill"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_external_redis(render_chart) -> None:
    manifests = render_chart(*VARIANTS["external-redis"])
    assert fleet_config(manifests)["redis_url"] == "redis://redis.example:6379/0"
    assert not [d for d in by_kind(manifests, "Deployment") if d["metadata"]["name"].endswith("-redis")]


def test_router_service_ports(render_chart) -> None:
    manifests = render_chart()
    services = {s["metadata"]["name"]: s for s in by_kind(manifests, "Service")}
    router = services["rel-dspark-router"]
    assert {p["name"]: p["port"] for p in router["spec"]["ports"]} == {
        "grpc": 50051,
        "http": 8000,
        "metrics": 9400,
    }
    (deployment,) = [d for d in by_kind(manifests, "Deployment") if d["metadata"]["name"].endswith("-router")]
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DSPARK_RAY_ADDRESS"] == "ray://rel-dspark-head-svc:10001"
    assert env["DSPARK_CONFIG"] == "/etc/dspark/fleet.yaml"
    assert fleet_config(manifests)["redis_url"] == "redis://rel-dspark-redis:6379/0"


def test_notes_commands_use_real_flags(helm: Path) -> None:
    result = run([helm, "install", "rel", CHART, "--namespace", "llm", "--dry-run=client"])
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "dspark client --target 127.0.0.1:50051" in notes and "--address" not in notes
    for doc in (REPO / "docs").glob("*.md"):
        assert "dspark client --address" not in doc.read_text(), doc.name


def test_service_monitor_selects_metrics_services(render_chart) -> None:
    manifests = render_chart()
    (monitor,) = by_kind(manifests, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [
        s for s in by_kind(manifests, "Service") if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert sorted(s["metadata"]["labels"]["dspark.io/job"] for s in selected) == [
        "dspark-ray",
        "dspark-router",
    ]
    port_names = {e["port"] for e in monitor["spec"]["endpoints"]}
    for service in selected:
        assert port_names <= {p["name"] for p in service["spec"]["ports"]}


def test_dashboards_configmap_matches_deploy_copy(render_chart) -> None:
    (configmap,) = [m for m in by_kind(render_chart(), "ConfigMap") if m["metadata"]["name"].endswith("-dashboards")]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    deploy_dir = REPO / "deploy/grafana/dashboards"
    expected = {p.name: p.read_text() for p in sorted(deploy_dir.glob("*.json"))}
    assert configmap["data"] == expected


def test_prometheus_rule_matches_deploy_rules(render_chart) -> None:
    (rule,) = by_kind(render_chart(), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((REPO / "deploy/prometheus/rules.yml").read_text())


def test_chart_copies_equal_deploy_files() -> None:
    """helm cannot read outside the chart: files/ holds copies made by build_dashboards.py."""
    for source in (REPO / "deploy/grafana/dashboards").glob("*.json"):
        assert (CHART / "files/dashboards" / source.name).read_text() == source.read_text(), source.name
    chart_dashboards = {p.name for p in (CHART / "files/dashboards").glob("*.json")}
    assert chart_dashboards == {p.name for p in (REPO / "deploy/grafana/dashboards").glob("*.json")}
    assert (CHART / "files/prometheus-rules.yml").read_text() == (
        REPO / "deploy/prometheus/rules.yml"
    ).read_text()
