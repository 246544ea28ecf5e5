"""A real Prometheus on 127.0.0.1 for integration tests.

    with PrometheusServer.start(["127.0.0.1:9400"], job="dspark-router") as prom:
        prom.wait_for_targets_up()
        samples = prom.query("sum(rate(dspark:generation_tokens_total[5m]))")

The server scrapes the given loopback targets every `scrape_interval`, keeps its TSDB in a
private temporary directory and is stopped (by its own pid) on exit. Needs the `prometheus`
binary (Debian package `prometheus`, `make system-deps`).
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LOOPBACK = "127.0.0.1"


class PrometheusError(RuntimeError):
    """Prometheus did not start, did not scrape, or rejected a query."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (closed again before returning)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def render_config(
    targets: Sequence[str],
    job: str,
    scrape_interval: str,
    rule_files: Sequence[Path] = (),
) -> dict[str, Any]:
    """Prometheus config scraping `targets` ("127.0.0.1:port") as one job."""
    for target in targets:
        host = target.rsplit(":", 1)[0]
        if host not in (LOOPBACK, "localhost"):
            raise ValueError(f"tests scrape loopback only, got {target!r}")
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
    }


@dataclass
class PrometheusServer:
    """A running prometheus process; use `start` and stop it with `stop` or a `with` block."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    job: str
    targets: tuple[str, ...]
    _log: Any = field(repr=False, default=None)

    @classmethod
    def start(
        cls,
        targets: Sequence[str],
        job: str = "dspark-router",
        scrape_interval: str = "1s",
        rule_files: Sequence[Path] = (),
        ready_timeout_s: float = 30.0,
        binary: str = "prometheus",
    ) -> PrometheusServer:
        """Start prometheus on a free 127.0.0.1 port and wait until it reports ready."""
        executable = shutil.which(binary)
        if executable is None:
            raise PrometheusError(f"{binary!r} not found (make system-deps)")
        workdir = Path(tempfile.mkdtemp(prefix="dspark-prom-"))
        config_path = workdir / "prometheus.yml"
        config = render_config(targets, job, scrape_interval, rule_files)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port()
        log = open(workdir / "prometheus.log", "wb")  # closed in stop()
        process = subprocess.Popen(
            [
                executable,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        server = cls(process, port, workdir, job, tuple(targets), log)
        try:
            server._wait_ready(ready_timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log_text(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready after {timeout_s}s:\n{self.log_text()}")

    def stop(self) -> None:
        """Stop this server's process (by its pid) and delete its data."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- API ---------------------------------------------------------------------------

    def _api(self, path: str, params: dict[str, str]) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as err:  # 400/422 carry the PromQL error in JSON
            body = json.loads(err.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Evaluate an instant query; returns [{"metric": {...}, "value": float}, ...].

        Scalars come back as one sample with an empty label set.
        """
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._api("query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": float(data["result"][1])}]
        return [{"metric": s["metric"], "value": float(s["value"][1])} for s in data["result"]]

    def wait_for_targets_up(self, timeout_s: float = 30.0) -> None:
        """Block until every target of the job has been scraped successfully (`up == 1`)."""
        deadline = time.monotonic() + timeout_s
        up: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            up = self.query(f'up{{job="{self.job}"}} == 1')
            if len(up) >= len(self.targets):
                return
            time.sleep(0.5)
        raise PrometheusError(
            f"targets {self.targets} not up after {timeout_s}s (up: {up}):\n{self.log_text()}"
        )

    def wait_for_data(self, promql: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Poll `promql` until it returns at least one non-NaN sample; returns the samples."""
        deadline = time.monotonic() + timeout_s
        while True:
            samples = [s for s in self.query(promql) if not math.isnan(s["value"])]
            if samples or time.monotonic() > deadline:
                return samples
            time.sleep(0.5)
