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


@pytest.mark.parametrize("gate", [True, False])
def test_draft_gate_reaches_the_engine_spec_of_every_pool(gate):
    cfg = load_config("deploy/serve/fleet.yaml", verify_policy="confidence", draft_gate=gate)
    assert all(cfg.engine_spec(pool).draft_gate is gate for pool in ("prefill", "target", "drafter"))
