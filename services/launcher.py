"""Bring a whole local fleet up and down: Ray (loopback, simulated pools) unless
RAY_ADDRESS points at a cluster, a private redis-server unless a URL is configured, the
Serve application, and the router on its own asyncio loop thread. Used by `dspark serve`
and by the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

from services.ray_env import LOOPBACK, ray_env

ray_env()  # must precede `import ray` (see services/ray_env.py)
import ray  # noqa: E402
from ray import serve  # noqa: E402

from services.app import INGRESS, build_fleet  # noqa: E402
from services.config import FleetConfig  # noqa: E402
from services.metrics import FleetMetrics  # noqa: E402
from services.router.server import RouterServer  # noqa: E402
from services.state.redis_state import FleetState, StateConfig  # noqa: E402
from services.state.server import RedisServer  # noqa: E402

OBJECT_STORE_BYTES = 512 * 2**20


class LocalFleet:
    def __init__(self, cfg: FleetConfig, host: str = LOOPBACK, grpc_port: int = 0, http_port: int = 0,
                 metrics_port: int | None = 0, num_cpus: int | None = None,
                 deploy_timeout_s: float = 300.0) -> None:
        self.cfg, self.host = cfg, host
        self.ports = {"grpc": grpc_port, "http": http_port}
        self.metrics_port, self.num_cpus, self.deploy_timeout_s = metrics_port, num_cpus, deploy_timeout_s
        self.redis: RedisServer | None = None
        self.state: FleetState | None = None
        self.metrics = FleetMetrics(cfg.model, cfg.method)
        self.server: RouterServer | None = None
        self._metrics_http = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="router", daemon=True)
        self._own_ray = False

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> LocalFleet:
        try:
            return self._start()
        except BaseException:
            self.stop()  # a half-started fleet must not leave redis-server or Ray behind
            raise

    def _start(self) -> LocalFleet:
        ray_env()
        if self.cfg.redis_url is None:
            self.redis = RedisServer().start()
            self.cfg = self.cfg.model_copy(update={"redis_url": self.redis.url})
        self.state = FleetState.from_url(self.cfg.redis_url, StateConfig(namespace=self.cfg.redis_namespace))
        self._start_ray()
        self._deploy()
        self._thread.start()
        self.server = RouterServer(self.cfg, self.state, self.metrics)
        grpc_port, http_port = self.run(self.server.start(self.host, self.ports["grpc"], self.ports["http"]))
        self.ports = {"grpc": grpc_port, "http": http_port}
        if self.metrics_port is not None:
            self._metrics_http = self.metrics.start_http_server(self.metrics_port, self.host)
            self.ports["metrics"] = self._metrics_http.server_port
        return self

    def _start_ray(self) -> None:
        if ray.is_initialized():
            return
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], namespace="dspark")
        else:
            ray.init(num_cpus=self.num_cpus or 4, include_dashboard=False,
                     object_store_memory=OBJECT_STORE_BYTES, resources=self.cfg.pool_resources(),
                     namespace="dspark", _node_ip_address=LOOPBACK)
            self._own_ray = True

    def _deploy(self) -> None:
        serve.start(proxy_location="Disabled")
        # Not blocking: unsatisfiable pool resources would otherwise hang forever.
        serve.api._run(build_fleet(self.cfg), _blocking=False, name=self.cfg.app_name, route_prefix=None,
                       logging_config={"enable_access_log": False, "log_level": "WARNING"})
        deadline = time.monotonic() + self.deploy_timeout_s
        while time.monotonic() < deadline:
            app = serve.status().applications.get(self.cfg.app_name)
            if app is not None and app.status == "RUNNING":
                return
            if app is not None and app.status == "DEPLOY_FAILED":
                raise RuntimeError(f"fleet deployment failed: {app.message}")
            time.sleep(0.5)
        raise TimeoutError(f"fleet not RUNNING after {self.deploy_timeout_s:.0f}s "
                           f"(pool resources available? {ray.available_resources()})")

    def run(self, coro: object, timeout: float | None = None) -> object:
        """Run a coroutine on the router's loop from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    def stop(self) -> None:
        try:
            self._stop_serving()
        finally:
            self._stop_local()  # redis-server is ours: stop it whatever else failed

    def _stop_serving(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.run(self.server.stop(), timeout=10)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if not ray.is_initialized():
            return
        with contextlib.suppress(Exception):
            serve.delete(self.cfg.app_name)
        if self._own_ray:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()

    def _stop_local(self) -> None:
        if self.state is not None:
            self.state.close()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> LocalFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["INGRESS", "LocalFleet", "ray_env"]
