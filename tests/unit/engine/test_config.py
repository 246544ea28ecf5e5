"""The one engine configuration: validated once, shared by the CLI, the fleet and the engine."""

from __future__ import annotations

import argparse

import pytest

from dspark.commands.common import add_model_arguments
from dspark.engine.config import EngineConfig, EngineOptions
from dspark.errors import UserError
from services.config import FleetConfig, load_config


@pytest.mark.parametrize("bad", [{"bogus": 1}, {"block_size": "7"}, {"block_size": 65}, {"block_size": -1},
                                 {"verify_policy": "greedy"}, {"confidence_threshold": 1.5},
                                 {"dtype": "float16"}, {"max_batch_size": 0}, {"threads": 0}])
def test_bad_values_are_refused_with_one_line(bad: dict) -> None:
    with pytest.raises(UserError, match=f"invalid engine config: {next(iter(bad))}") as e:
        EngineConfig.of(**bad)
    assert "\n" not in str(e.value)


def test_it_is_frozen_and_replace_validates() -> None:
    cfg = EngineConfig(block_size=4)
    with pytest.raises(ValueError):
        cfg.block_size = 5  # type: ignore[misc]
    assert cfg.replace(block_size=5).block_size == 5 and cfg.block_size == 4
    with pytest.raises(UserError, match="block_size"):
        cfg.replace(block_size=100)


def test_cli_defaults_and_help_come_from_the_fields() -> None:
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    args = p.parse_args([])
    for name in ("model", "block_size", "verify_policy", "confidence_threshold", "draft_gate", "max_batch_size",
                 "max_seq_len", "draft_model", "drafter_checkpoint"):
        assert getattr(args, name) == EngineConfig.model_fields[name].default, name
    help_text = " ".join(p.format_help().split())
    assert " ".join(EngineConfig.model_fields["verify_policy"].description.split()) in help_text
    cfg = EngineConfig.from_args(p.parse_args(["--block-size", "3", "--verify-policy", "confidence",
                                               "--device", "cpu"]))
    assert (cfg.block_size, cfg.verify_policy) == (3, "confidence") and cfg.dtype != "auto"


def test_the_fleet_declares_no_engine_option_of_its_own() -> None:
    """FleetConfig inherits every engine option; a pool's EngineConfig carries the fleet's
    values through (a knob added to EngineOptions reaches the workers without more code)."""
    assert issubclass(FleetConfig, EngineOptions)
    overrides = {"block_size": 5, "verify_policy": "confidence", "confidence_threshold": 0.3, "draft_gate": False,
                 "max_seq_len": 512, "drafter_checkpoint": "/x", "dtype": "float32", "method": "dspark"}
    cfg = load_config(None, **overrides)
    spec = cfg.engine_spec("target")
    for name, value in overrides.items():
        assert getattr(spec, name) == value, name
    assert spec.max_batch_size == cfg.pool("target").max_batch_size
    assert set(EngineOptions.model_fields) <= set(FleetConfig.model_fields)


def test_the_engine_reads_its_limits_from_it() -> None:
    from dspark.engine.engine import Engine
    from tests.tiny import tiny_model

    eng = Engine(tiny_model(num_layers=1), (), None, EngineConfig(max_batch_size=3, max_seq_len=40, block_size=2))
    assert eng.cache.num_slots == 3 and eng.cache.max_len == 40
