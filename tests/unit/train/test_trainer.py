from __future__ import annotations

import json

import pytest
import torch

from dspark.drafter.checkpoint import load_drafter
from dspark.train.config import DrafterShape, TrainConfig
from dspark.train.target_cache import TargetCache, build_target_cache
from dspark.train.trainer import Trainer, lr_factor
from tests.unit.drafter.helpers import tiny_target
from tests.unit.train.fake_chat import FakeChatTokenizer, conversations


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    build_target_cache(tiny_target(), FakeChatTokenizer(), "tiny", conversations(12), out, [1, 2, 3],
                       max_len=64, shard_size=8)
    return out


def _cfg(cache_dir, out, **kw) -> TrainConfig:
    base = dict(model="tiny", data=str(cache_dir), out=str(out), lr=3e-3, max_steps=6, batch_size=2,
                grad_accum=2, anchors_per_seq=8, checkpoint_every=3, warmup_frac=0.2,
                drafter=DrafterShape(num_layers=1, block_size=4, markov_rank=4, draft_vocab_size=60))
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    assert [round(lr_factor(s, 10, 0.2), 4) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(6, 10, 0.2) == pytest.approx(0.5)
    assert lr_factor(10, 10, 0.2) == pytest.approx(0.0)


def test_short_run_lowers_every_loss_term(cache_dir, tmp_path) -> None:
    tr = Trainer(_cfg(cache_dir, tmp_path, max_steps=40, lr=1e-2, warmup_frac=0.05), tiny_target(),
                 TargetCache(cache_dir))
    recs = tr.train(progress=False)
    # L_conf's soft label moves as the drafts improve, so its reducible part (L_conf - H(label))
    # is what must fall.
    for key in ("loss_ce", "loss_tv", "loss_conf_kl", "loss_total"):
        first = sum(r[key] for r in recs[:4]) / 4
        last = sum(r[key] for r in recs[-4:]) / 4
        assert last < first, key
    assert len(recs[-1]["accept_per_pos"]) == 4
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 40 and json.loads(lines[-1])["step"] == 40
    out = tr.export()
    d = load_drafter(out, tr.target, dtype=torch.float32)
    assert d.cfg.draft_vocab_size == 60 and d.cfg.mask_token_id not in range(0, 80)


def test_resume_reproduces_the_uninterrupted_run_exactly(cache_dir, tmp_path) -> None:
    target = tiny_target()
    full = Trainer(_cfg(cache_dir, tmp_path / "a"), target, TargetCache(cache_dir))
    full_recs = full.train(progress=False)
    first = Trainer(_cfg(cache_dir, tmp_path / "b"), target, TargetCache(cache_dir))
    first.train(stop_after=4, progress=False)  # checkpoint at step 3; step 4 is lost
    torch.manual_seed(1234)  # whatever the RNG did meanwhile must not matter
    second = Trainer(_cfg(cache_dir, tmp_path / "b"), target, TargetCache(cache_dir))
    assert second.resume() and second.step == 4
    # resume() loads the last checkpoint (step 3 or 4); continue to the end
    second.train(progress=False)
    for (name, p), q in zip(full.drafter.state_dict().items(), second.drafter.state_dict().values(),
                            strict=True):
        assert torch.equal(p, q), name
    logged = [json.loads(ln) for ln in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["loss_total"] for r in logged] == [r["loss_total"] for r in full_recs]


def test_dflash_trains_ce_only(cache_dir, tmp_path) -> None:
    cfg = _cfg(cache_dir, tmp_path, method="dflash", max_steps=2)
    tr = Trainer(cfg, tiny_target(), TargetCache(cache_dir))
    rec = tr.train(progress=False)[-1]
    assert "loss_tv" not in rec and tr.drafter.cfg.markov_rank == 0 and not tr.drafter.cfg.confidence_head


def test_warm_start_takes_the_earlier_runs_last_weights_and_vocabulary(cache_dir, tmp_path) -> None:
    from dspark.errors import UserError

    target = tiny_target()
    first = Trainer(_cfg(cache_dir, tmp_path / "a", max_steps=3), target, TargetCache(cache_dir))
    first.train(progress=False)
    second = Trainer(_cfg(cache_dir, tmp_path / "b", init_from=str(tmp_path / "a"), seed=5), target,
                     TargetCache(cache_dir))
    assert second.step == 0 and second.total_steps == 6  # fresh optimizer and schedule
    for (name, p), q in zip(first.drafter.state_dict().items(), second.drafter.state_dict().values(),
                            strict=True):
        assert torch.equal(p, q), name  # weights, draft vocabulary ids, buffers
    assert second.drafter.cfg == first.drafter.cfg
    second.train(progress=False)
    # A run saved before calibration offsets existed still warm-starts (offsets 0).
    state_file = tmp_path / "a" / "checkpoint" / "state.pt"
    st = torch.load(state_file, weights_only=False)
    del st["drafter"]["conf_offset"]
    torch.save(st, state_file)
    old = Trainer(_cfg(cache_dir, tmp_path / "e", init_from=str(tmp_path / "a")), target, TargetCache(cache_dir))
    assert torch.equal(old.drafter.conf_offset, torch.zeros(4))
    with pytest.raises(UserError, match="rank"):  # another shape cannot start from it
        Trainer(_cfg(cache_dir, tmp_path / "c", init_from=str(tmp_path / "a"),
                     drafter=DrafterShape(num_layers=1, block_size=4, markov_rank=8, draft_vocab_size=60)),
                target, TargetCache(cache_dir))
    with pytest.raises(UserError, match="no training checkpoint"):
        Trainer(_cfg(cache_dir, tmp_path / "d", init_from=str(tmp_path / "missing")), target,
                TargetCache(cache_dir))
