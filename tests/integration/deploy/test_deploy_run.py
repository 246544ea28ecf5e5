"""The deployments really start: docker-compose.yml's fleet container and the Helm chart's
Ray head + KubeRay deployment + router, run as local processes from their own files
(emulate.py says what is translated: hostnames, ports, mounted paths; nothing else).

Each test serves a gRPC stream and an OpenAI HTTP request through the ports the manifests
publish, checks the metrics endpoints their Prometheus configuration scrapes, then sends
SIGTERM and requires a clean exit within the grace period with no process and no temporary
folder left. A real redis-server on loopback stands in for the Redis service. Slow (a Ray
cluster and model loading each): about one to two minutes per test on 2 shared cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dspark.paths import cache_dir
from dspark.v1 import generation_pb2 as pb
from dspark.v1 import generation_pb2_grpc as pb_grpc
from services.state.server import free_port
from tests.integration.prometheus_util import PrometheusServer

from .conftest import CHART, REPO, run
from .emulate import (
    LOOPBACK,
    VENV_BIN,
    Container,
    Image,
    Localizer,
    LocalProcess,
    compose_container,
    executable,
    k8s_container,
    kill_all,
    new_marker,
    parse_dockerfile,
    wait_gone,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker/Dockerfile"
READY = r"dspark fleet ready: grpc=\S+ http=\S+"
START_TIMEOUT_S = 600  # Ray, three replicas and two model loads on a loaded 2-core machine
STANDIN = Path(__file__).with_name("kuberay_standin.py")


# -- what every container is checked for -------------------------------------------------------
def image() -> Image:
    img = parse_dockerfile(DOCKERFILE)
    assert (".", "/app") in img.copies and img.workdir == "/app", "the image must hold the repository at /app"
    return img


def serve_settings(container: Container, loc: Localizer) -> Any:
    """The settings `dspark serve` resolves inside the container (paths made local only)."""
    from services.settings import add_arguments, resolve

    argv = executable(container.argv)
    assert Path(argv[0]).name == "dspark" and argv[1] == "serve", argv
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    view = Localizer(set(), {}, {}, loc.paths, bind_any=False)
    args = parser.parse_args([view.value(a) for a in argv[2:]])
    return resolve(args, {k: view.value(v) for k, v in container.env.items()})


class Steps:
    """Prints how long each step took (shown on failure, or with -s)."""

    def __init__(self, name: str) -> None:
        self.name, self.last = name, time.monotonic()

    def done(self, step: str) -> None:
        now = time.monotonic()
        print(f"[{self.name}] {step}: {now - self.last:.1f}s", flush=True)
        self.last = now


def check_serving(grpc_port: int, http_port: int, model: str) -> None:
    """What the probes and a client do: gRPC health, a gRPC stream, an OpenAI HTTP request."""
    with grpc.insecure_channel(f"{LOOPBACK}:{grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        request = pb.GenerateRequest(text="The capital of France is",
                                     sampling=pb.SamplingOptions(temperature=0, max_new_tokens=8))
        messages = list(pb_grpc.GenerationStub(channel).Generate(request, timeout=300))
    assert sum(len(m.token_ids) for m in messages) == 8, messages
    body = json.dumps({"model": model, "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "user", "content": "Say hello."}]}).encode()
    req = urllib.request.Request(f"http://{LOOPBACK}:{http_port}/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        answer = json.load(resp)
    assert answer["choices"][0]["message"]["content"], answer


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=30) as resp:
        return resp.read().decode()


def has_series(text: str, prefix: str) -> bool:
    return any(line.startswith(prefix) for line in text.splitlines())


def grace_seconds(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) * (60 if text.endswith("m") else 1) if text[-1] in "sm" else float(text)


def stop_and_check_clean(proc: LocalProcess, grace_s: float) -> None:
    """SIGTERM: exit status 0 within the grace period, no process and no temporary folder left."""
    assert proc.terminate(grace_s) == 0, proc.log()[-6000:]
    left = wait_gone(proc.marker, timeout_s=10)
    assert not left, f"{proc.name} left processes behind: {left}"
    assert proc.remove_tmpdir() == [], f"{proc.name} left temporary folders behind"


# -- docker compose ----------------------------------------------------------------------------
def compose_paths(service: dict[str, Any], img: Image) -> dict[str, Path]:
    """/app is the repository (COPY . /app); the cache volume is this machine's model cache."""
    paths = {"/app": REPO}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            paths[target] = REPO / source
        else:
            assert target == img.env["DSPARK_CACHE"], f"named volume {volume}: only the model cache is emulated"
            paths[target] = cache_dir()
    return paths


def start_compose_prometheus(compose: dict[str, Any], fleet_ports: dict[int, int], root: Path) -> PrometheusServer:
    """The prometheus service: its command, its bind-mounted files, scraping the fleet."""
    svc = compose["services"]["prometheus"]
    port = free_port()
    paths: dict[str, Path] = {}
    for volume in svc["volumes"]:
        source, target = volume.split(":")[:2]
        local = root / target.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / source, local)
        paths[target] = local
    loc = Localizer(set(compose["services"]) | {"localhost"},
                    {**{("fleet", c): p for c, p in fleet_ports.items()}, ("localhost", 9090): port},
                    {9090: port}, paths)
    config = paths["/etc/prometheus/prometheus.yml"]  # it names the other services
    config.write_text(loc.text(config.read_text()))
    argv = [shutil.which("prometheus"), *loc.argv(svc["command"]), f"--web.listen-address={LOOPBACK}:{port}",
            "--log.level=warn"]
    log = open(root / "prometheus.log", "wb")  # closed by PrometheusServer.stop
    process = subprocess.Popen(argv, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    server = PrometheusServer(process, port, root, "dspark-router", (), log)
    server._wait_ready(30)
    return server


def test_compose_fleet_container_serves_and_stops_cleanly(redis_server: Any, tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus absent: run `make system-deps`")
    compose, img = yaml.safe_load(COMPOSE.read_text()), image()
    svc = compose["services"]["fleet"]
    container = compose_container(compose, "fleet", img)
    paths = compose_paths(svc, img)
    settings = serve_settings(container, Localizer(set(), {}, {}, paths))
    proc_s, cfg = settings.process, settings.fleet

    # What the other services rely on, read from the files themselves.
    assert proc_s.host == "0.0.0.0", "published ports and Prometheus need the router on all interfaces"
    published = {int(str(p).rsplit(":", 1)[1]) for p in svc["ports"]}
    assert {proc_s.grpc_port, proc_s.http_port} <= published
    scrape_jobs = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())["scrape_configs"]
    fleet_targets = {job["job_name"]: int(t.split(":")[1]) for job in scrape_jobs
                     for static in job["static_configs"] for t in static["targets"] if t.startswith("fleet:")}
    assert fleet_targets == {"dspark-router": proc_s.metrics_port, "dspark-ray": proc_s.ray_metrics_port}
    assert cfg.redis_url == "redis://redis:6379/0" and "--port" not in compose["services"]["redis"]["command"]

    own = {p: free_port() for p in {proc_s.grpc_port, proc_s.http_port, proc_s.metrics_port,
                                    proc_s.ray_metrics_port, *published, *img.expose}}
    loc = Localizer(set(compose["services"]), {("redis", 6379): redis_server.port}, own, paths)
    marker = new_marker()
    proc = LocalProcess("fleet", executable(loc.argv(container.argv)), loc.env(container.env),
                        Path(loc.value(container.workdir)), tmp_path, marker)
    prometheus = None
    try:
        steps = Steps("compose")
        proc.start().wait_for(READY, START_TIMEOUT_S)
        steps.done("fleet container ready")
        check_serving(own[proc_s.grpc_port], own[proc_s.http_port], cfg.model)
        steps.done("gRPC stream and HTTP request")
        # The compose healthcheck, run as written (inside the container 127.0.0.1 is the fleet).
        check = svc["healthcheck"]["test"]
        assert check[0] == "CMD"
        health = Localizer({LOOPBACK}, {(LOOPBACK, c): p for c, p in own.items()}, own, paths)
        result = subprocess.run([str(VENV_BIN / check[1]), *[health.value(a) for a in check[2:]]], timeout=30)
        assert result.returncode == 0, "compose healthcheck failed"
        assert has_series(scrape(own[proc_s.metrics_port]), "dspark:")
        assert has_series(scrape(own[proc_s.ray_metrics_port]), "ray_")
        # The prometheus service with its own config: every target up, dspark:* stored.
        prometheus = start_compose_prometheus(compose, own, tmp_path / "prometheus")
        for job in fleet_targets:
            assert prometheus.wait_for_data(f'up{{job="{job}"}} == 1', timeout_s=60), prometheus.log_text()
        assert prometheus.query('count({__name__=~"dspark:.+"})')[0]["value"] > 0
        assert prometheus.query('up{job=~"dspark.*"} == 0') == []  # DSparkScrapeTargetDown stays quiet
        steps.done("healthcheck, metrics, Prometheus scrape")
        stop_and_check_clean(proc, grace_seconds(svc.get("stop_grace_period", "10s")))
        steps.done("SIGTERM, clean exit")
    finally:
        if prometheus is not None:
            prometheus.stop()
        kill_all(marker)
        proc.remove_tmpdir()


# -- helm ---------------------------------------------------------------------------------------
def by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def notes(helm: Path) -> str:
    result = run([helm, "install", "rel", CHART, "--namespace", "llm", "--dry-run=client"])
    assert result.returncode == 0, result.stderr
    return result.stdout.split("NOTES:", 1)[1]


def container_port(pod_spec: dict[str, Any], port: int | str) -> int:
    """A Service targetPort (number or name) as the container port it reaches."""
    if isinstance(port, int):
        return port
    ports = {p["name"]: p["containerPort"] for c in pod_spec["containers"] for p in c.get("ports", [])}
    return ports[port]


def head_command(head: dict[str, Any], groups: list[dict[str, Any]], own: dict[int, int], gcs: int,
                 client: int, temp_dir: str) -> list[str]:
    """`ray start --head` as KubeRay builds it from rayStartParams. One node stands in for the
    head and every worker group: it also offers their pool resources and CPUs."""
    params = dict(head["rayStartParams"])
    resources: dict[str, float] = {}
    cpus = float(params.pop("num-cpus", 0))
    for group in groups:
        for key, amount in json.loads(json.loads(group["rayStartParams"]["resources"])).items():
            resources[key] = resources.get(key, 0) + amount * group["replicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus += float(limits["cpu"]) * group["replicas"]
    params.pop("dashboard-host")  # no dashboard here: the stand-in deploys serveConfigV2 itself
    metrics = own[int(params.pop("metrics-export-port"))]
    assert not params, f"rayStartParams {sorted(params)} are not emulated"
    return [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--ray-client-server-port={client}",
            f"--node-ip-address={LOOPBACK}", "--include-dashboard=false", "--disable-usage-stats",
            f"--temp-dir={temp_dir}", f"--object-store-memory={256 * 2**20}", f"--num-cpus={int(cpus)}",
            f"--resources={json.dumps(resources)}", f"--metrics-export-port={metrics}"]


def test_helm_router_attaches_serves_and_stops_cleanly(helm: Path, render_chart: Any, redis_server: Any,
                                                      tmp_path: Path) -> None:
    manifests, img = render_chart(), image()
    deployments, services = by_kind(manifests, "Deployment"), by_kind(manifests, "Service")
    config_maps = {name: m["data"] for name, m in by_kind(manifests, "ConfigMap").items()}
    (rayservice,) = by_kind(manifests, "RayService").values()
    fullname = rayservice["metadata"]["name"]
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    fleet_yaml = yaml.safe_load(config_maps[f"{fullname}-fleet"]["fleet.yaml"])
    assert serve_config["applications"][0]["args"] == fleet_yaml, "KubeRay and the router must read one config"
    cluster = rayservice["spec"]["rayClusterConfig"]
    router = deployments[f"{fullname}-router"]["spec"]["template"]["spec"]
    router_svc = services[f"{fullname}-router"]
    container = k8s_container(router, "router", img, config_maps)

    # The router's view: its env and args, the ConfigMap mounted where the Deployment says.
    mounts = tmp_path / "mounts"
    paths = {"/app": REPO, img.env["DSPARK_CACHE"]: cache_dir()}
    paths |= {target.rsplit("/", 1)[0]: mounts / target.lstrip("/").rsplit("/", 1)[0] for target in container.files}
    write_mounted_files(container, mounts, lambda text: text)
    proc_s = serve_settings(container, Localizer(set(), {}, {}, paths)).process
    assert proc_s.host == "0.0.0.0", "the Service and the kubelet's probes reach the pod IP"
    assert proc_s.attach and proc_s.ray_address == f"ray://{fullname}-head-svc:10001"
    svc_ports = {p["name"]: container_port(router, p["targetPort"]) for p in router_svc["spec"]["ports"]}
    assert svc_ports == {"grpc": proc_s.grpc_port, "http": proc_s.http_port, "metrics": proc_s.metrics_port}
    (spec,) = router["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe]["grpc"]["port"] == proc_s.grpc_port, probe

    # Local stand-ins: one Ray node for the head Service, redis-server for the Redis Service;
    # a port-forward of the router Service (NOTES.txt) lands on the router's own ports.
    gcs, client = free_port(), free_port()
    head_metrics = int(cluster["headGroupSpec"]["rayStartParams"]["metrics-export-port"])
    own = {p: free_port() for p in {proc_s.grpc_port, proc_s.http_port, proc_s.metrics_port, head_metrics}}
    head_svc, redis_svc = f"{fullname}-head-svc", f"{fullname}-redis"
    assert redis_svc in services
    forwarded = {(LOOPBACK, p["port"]): own[svc_ports[p["name"]]] for p in router_svc["spec"]["ports"]}
    loc = Localizer({head_svc, redis_svc, LOOPBACK},
                    {(head_svc, 10001): client, (head_svc, 6379): gcs, (redis_svc, 6379): redis_server.port,
                     **forwarded}, own, paths)
    write_mounted_files(container, mounts, loc.text)
    head = k8s_container(cluster["headGroupSpec"]["template"]["spec"], "ray-head", img, config_maps)
    ray_tmp = tempfile.mkdtemp(prefix="dspark-rh-")
    head_argv = head_command(cluster["headGroupSpec"], cluster["workerGroupSpecs"], own, gcs, client, ray_tmp)
    head_proc = LocalProcess("ray-head", head_argv, loc.env(head.env), REPO, tmp_path, new_marker())
    router_proc = LocalProcess("router", executable(loc.argv(container.argv)), loc.env(container.env),
                               Path(loc.value(container.workdir)), tmp_path, new_marker())
    try:
        steps = Steps("helm")
        for attempt in (1, 2, 3):  # the raylet aborts if its agents need > ~15 s (a loaded machine)
            try:
                head_proc.start().wait_for("Ray runtime started", 180)
                break
            except AssertionError:
                if attempt == 3 or "timed out during startup" not in head_proc.log():
                    raise
                kill_all(head_proc.marker)
        steps.done("Ray head started")
        deployed = standin(["deploy", f"{LOOPBACK}:{gcs}", json.dumps(localized(serve_config, loc))], head_proc)
        assert "deployed" in deployed.stdout, deployed.stdout + deployed.stderr
        steps.done("serveConfigV2 deployed")
        router_proc.start().wait_for(READY, START_TIMEOUT_S)
        steps.done("router attached")
        check_serving(own[proc_s.grpc_port], own[proc_s.http_port], fleet_yaml["model"])
        steps.done("gRPC stream and HTTP request")
        run_notes_commands(notes(helm), loc)
        steps.done("NOTES.txt commands")
        assert has_series(scrape(own[proc_s.metrics_port]), "dspark:")  # the ServiceMonitor's router endpoint
        assert has_series(scrape(own[head_metrics]), "ray_")  # ... and the Ray pods' metrics port
        stop_and_check_clean(router_proc, router["terminationGracePeriodSeconds"])
        steps.done("router SIGTERM, clean exit")
        status = standin(["status", f"{LOOPBACK}:{gcs}"], head_proc)
        assert json.loads(status.stdout.splitlines()[-1]) == {"dspark": "RUNNING"}, "the router must not delete it"
        head_proc.terminate(60)  # `ray start --block` stops its node on SIGTERM
        left = wait_gone(head_proc.marker, timeout_s=30)
        assert not left, f"Ray head processes left behind: {left}"
        steps.done("application still running; Ray head stopped")
    finally:
        kill_all(router_proc.marker)
        kill_all(head_proc.marker)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        for proc in (head_proc, router_proc):
            proc.remove_tmpdir()


def write_mounted_files(container: Container, root: Path, transform: Any) -> None:
    for target, content in container.files.items():
        local = root / target.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(transform(content))


def localized(value: Any, loc: Localizer) -> Any:
    if isinstance(value, dict):
        return {k: localized(v, loc) for k, v in value.items()}
    if isinstance(value, list):
        return [localized(v, loc) for v in value]
    return loc.value(value) if isinstance(value, str) else value


def standin(args: list[str], head: LocalProcess) -> subprocess.CompletedProcess[str]:
    """KubeRay's part, run with the head pod's environment."""
    return subprocess.run([sys.executable, str(STANDIN), *args], cwd=REPO, env=head.env, capture_output=True,
                          text=True, timeout=START_TIMEOUT_S)


def run_notes_commands(text: str, loc: Localizer) -> None:
    """The NOTES.txt client commands, as printed, against the port-forwarded Service."""
    lines = [line.strip() for line in text.splitlines()]
    (client,) = [line for line in lines if line.startswith("dspark client")]
    argv = [loc.value(a) for a in shlex.split(client)]
    result = subprocess.run([str(VENV_BIN / "dspark"), *argv[1:]], capture_output=True, text=True, timeout=300,
                            env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")})
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    (curl,) = [line for line in lines if line.startswith("curl")]
    if shutil.which("curl"):
        out = subprocess.run([loc.value(a) for a in shlex.split(curl)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and json.loads(out.stdout)["choices"], out.stdout + out.stderr
