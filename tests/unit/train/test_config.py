from __future__ import annotations

import json
from pathlib import Path

import pytest

import dspark.train
from dspark.errors import UserError
from dspark.train.config import TrainConfig

CONFIGS = Path(dspark.train.__file__).parent / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("smollm2-135m-*.yaml")))
def test_shipped_configs_validate(name: str, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    cfg = TrainConfig.load(CONFIGS / name)
    data = cfg.data if isinstance(cfg.data, list) else [cfg.data]
    repo = CONFIGS.parents[2]
    for d in data:  # the cache (rebuilt by `dspark data prepare`) or data committed to the repo
        assert d.startswith(str(tmp_path)) or (repo / d).is_file(), d
    assert cfg.method in name
    assert cfg.init_from is None or cfg.init_from.startswith(str(tmp_path))


def test_unknown_fields_are_rejected(tmp_path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("data: x\nout: y\nlearning_rate: 1\n")
    with pytest.raises(UserError, match="learning_rate"):
        TrainConfig.load(p)


@pytest.mark.parametrize("name", sorted(p.name for p in (CONFIGS / "ab").glob("*.yaml")))
def test_ab_configs_validate_and_fresh_machine_stages_need_only_the_repo(name: str, monkeypatch, tmp_path) -> None:
    """Every A/B arm loads; an arm that continues a checkpoint committed to the repo (the next
    training stage, run by a later session on a possibly fresh machine) reads only data
    committed to the repo too."""
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    cfg = TrainConfig.load(CONFIGS / "ab" / name)
    repo = CONFIGS.parents[2]
    if cfg.init_from is None or cfg.init_from.startswith(str(tmp_path)):
        return
    assert (repo / cfg.init_from / "model.safetensors").is_file(), cfg.init_from
    data = cfg.data if isinstance(cfg.data, list) else [cfg.data]
    assert all((repo / d).is_file() for d in data), data
    if "stops with a shape error" in (CONFIGS / "ab" / name).read_text():  # a finished arm: the record of a run
        return
    start = json.loads((repo / cfg.init_from / "config.json").read_text())  # the warm start must fit it
    assert start["num_layers"] <= cfg.drafter.num_layers and start["block_size"] == cfg.drafter.block_size
    assert start["markov_rank"] == cfg.drafter.markov_rank and start["draft_vocab_size"] == cfg.drafter.draft_vocab_size
