"""What KubeRay does with a RayService's serveConfigV2, for the deployment test.

    python kuberay_standin.py deploy GCS_ADDRESS SERVE_CONFIG_JSON   # deploy, print "deployed"
    python kuberay_standin.py status GCS_ADDRESS                     # print {app: status} as JSON

`deploy` builds every application from its `import_path` called with its `args` (what
`serve deploy` does with a config file) and waits until it runs. Keys the stand-in does
not emulate are refused, so the chart cannot rely on them unnoticed. Serve's HTTP proxy is
off (the fleet is reached through the router) and the replicas get the loopback hook, as in
a local `dspark serve`.
"""

from __future__ import annotations

import importlib
import json
import sys

from services.ray_env import REPLICA_SETUP_HOOK, ray_env

EMULATED_KEYS = {"name", "import_path", "args", "route_prefix"}


def main(argv: list[str]) -> int:
    mode, address = argv[1], argv[2]
    ray_env()
    import ray
    from ray import serve

    ray.init(address=address, runtime_env={"worker_process_setup_hook": REPLICA_SETUP_HOOK},
             logging_level="WARNING", log_to_driver=False)
    if mode == "status":
        print(json.dumps({name: app.status for name, app in serve.status().applications.items()}), flush=True)
        return 0
    config = json.loads(argv[3])
    assert set(config) == {"applications"}, f"serveConfigV2 keys {sorted(config)}: only applications emulated"
    serve.start(proxy_location="Disabled")
    for app in config["applications"]:
        unknown = set(app) - EMULATED_KEYS
        assert not unknown, f"serveConfigV2 application keys {sorted(unknown)} are not emulated"
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        serve.run(builder(app.get("args") or {}), name=app["name"], route_prefix=app.get("route_prefix"))
    print("deployed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
