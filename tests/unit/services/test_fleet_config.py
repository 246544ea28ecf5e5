"""FleetConfig checks that fail at load time rather than in a replica's __init__."""

from __future__ import annotations

import pytest

from dspark.errors import UserError
from services.config import load_config


@pytest.mark.parametrize("method", ["dspark", "dflash", "hybrid"])
def test_feature_reading_drafter_needs_the_target(method):
    with pytest.raises(UserError, match="load_target"):
        load_config("deploy/serve/fleet.yaml", method=method)  # the shipped yaml: load_target false
    pools = load_config("deploy/serve/fleet.yaml").model_dump(mode="json")["pools"]
    pools["drafter"]["load_target"] = True
    assert load_config("deploy/serve/fleet.yaml", method=method, pools=pools).method == method


def test_shipped_fleet_yaml_is_valid():
    assert load_config("deploy/serve/fleet.yaml").method == "ngram"


def test_auto_dtype_resolves_per_pool_device(monkeypatch):
    """`auto` is decided by each pool's device (where its replicas run), and a pool's own
    dtype or compile setting overrides the fleet's."""
    import dspark.models.runtime as runtime

    seen = []
    monkeypatch.setattr(runtime, "default_dtype", lambda device: seen.append(device) or
                        ("bfloat16" if device == "cuda" else "float32"))
    pools = {"prefill": {"device": "cpu"}, "target": {"device": "cuda", "compile": False},
             "drafter": {"device": "cpu", "dtype": "int8"}}
    cfg = load_config(None, dtype="auto", compile=True, pools=pools)
    prefill, target, drafter = (cfg.engine_spec(p) for p in ("prefill", "target", "drafter"))
    assert (prefill.dtype, prefill.compile) == ("float32", True)
    assert (target.dtype, target.compile) == ("bfloat16", False)
    assert drafter.dtype == "int8"  # explicit: never asks the machine
    assert seen == ["cpu", "cuda"]
    assert load_config(None, dtype="float32", pools=pools).engine_spec("prefill").dtype == "float32"


def test_fleet_dtype_is_one_of_the_cli_choices():
    from dspark.engine.build import TARGET_DTYPES

    for dtype in TARGET_DTYPES:
        assert load_config(None, dtype=dtype).dtype == dtype
    with pytest.raises(UserError, match="dtype"):
        load_config(None, dtype="float16")


@pytest.mark.parametrize("gate", [True, False])
def test_draft_gate_reaches_the_engine_spec_of_every_pool(gate):
    cfg = load_config("deploy/serve/fleet.yaml", verify_policy="confidence", draft_gate=gate)
    assert all(cfg.engine_spec(pool).draft_gate is gate for pool in ("prefill", "target", "drafter"))
