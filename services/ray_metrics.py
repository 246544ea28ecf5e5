"""Serve the local Ray node's Prometheus metrics on the fleet's bind host.

A local Ray runs on loopback (services/ray_env.py), so its metrics agent listens on
127.0.0.1 only. In a container Prometheus scrapes from another host, so `dspark serve
--ray-metrics-port P` re-serves the agent's `/metrics` on `--host:P` (0.0.0.0 in the image)
while every Ray port stays on loopback."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from services.ray_env import LOOPBACK

FETCH_TIMEOUT_S = 5.0


class MetricsRelay(ThreadingHTTPServer):
    """GET /metrics -> the body of http://127.0.0.1:<agent_port>/metrics (502 while it is down)."""

    daemon_threads = True

    def __init__(self, agent_port: int, host: str, port: int) -> None:
        self.agent_url = f"http://{LOOPBACK}:{agent_port}/metrics"
        super().__init__((host, port), _RelayHandler)

    def start(self) -> MetricsRelay:
        threading.Thread(target=self.serve_forever, name="ray-metrics-relay", daemon=True).start()
        return self

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _RelayHandler(BaseHTTPRequestHandler):
    server: MetricsRelay

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404)
            return
        try:
            with urllib.request.urlopen(self.server.agent_url, timeout=FETCH_TIMEOUT_S) as resp:
                body, content_type = resp.read(), resp.headers.get("Content-Type", "text/plain")
        except (urllib.error.URLError, OSError) as e:
            self.send_error(502, f"Ray metrics agent unreachable: {e}")
            return
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        return  # one line per scrape would drown the fleet's own log
