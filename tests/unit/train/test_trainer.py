from __future__ import annotations

import json

import pytest
import torch

from dspark.drafter.checkpoint import load_drafter
from dspark.train.config import DrafterShape, TrainConfig
from dspark.train.examples import Example, example_from_messages, example_from_record
from dspark.train.trainer import Trainer, lr_factor
from tests.unit.drafter.helpers import VOCAB, tiny_target
from tests.unit.train.fake_chat import END, FakeChatTokenizer, conversations


def _examples(n: int = 12) -> list[Example]:
    """Regenerated-format records of learnable conversations (the tiny target 'answered')."""
    tok, out = FakeChatTokenizer(), []
    for i, conv in enumerate(conversations(n)):
        prompt = tok.apply_chat_template(conv[:1], add_generation_prompt=True)
        rec = {"id": f"c{i}", "prompt_ids": prompt, "response_ids": tok.encode(conv[1]["content"]) + [END],
               "finish_reason": "stop"}
        out.append(example_from_record(rec, frozenset({END}), 64))
    return out


EXAMPLES = _examples()


def _trainer(out, target=None, examples=None, **kw) -> Trainer:
    return Trainer(_cfg(out, **kw), target or tiny_target(), examples or EXAMPLES)


def _cfg(out, **kw) -> TrainConfig:
    base = dict(model="tiny", data="unused.jsonl", out=str(out), lr=3e-3, max_steps=6, batch_size=2,
                grad_accum=2, anchors_per_seq=8, checkpoint_every=3, warmup_frac=0.2, heldout=2, eval_every=3,
                top_k=8, drafter=DrafterShape(num_layers=1, block_size=4, markov_rank=4, draft_vocab_size=60))
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    assert [round(lr_factor(s, 10, 0.2), 4) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(6, 10, 0.2) == pytest.approx(0.5)
    assert lr_factor(10, 10, 0.2) == pytest.approx(0.0)


def test_short_run_lowers_every_loss_term(tmp_path) -> None:
    tr = _trainer(tmp_path, max_steps=40, lr=1e-2, warmup_frac=0.05)
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
    assert d.cfg.draft_vocab_size == 60 and d.cfg.mask_token_id == VOCAB  # a row no token id reaches
    evals = [json.loads(ln) for ln in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals][-1] == 40 and len(evals) == 14  # every 3 steps and the last
    assert evals[-1]["heldout_tau_tf"] >= 1.0 and len(evals[-1]["heldout_accept_per_pos"]) == 4
    assert {e.id for e in tr.heldout} == {"c10", "c11"} and not {e.id for e in tr.examples} & {"c10", "c11"}


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path) -> None:
    target = tiny_target()
    full = _trainer(tmp_path / "a", target)
    full_recs = full.train(progress=False)
    first = _trainer(tmp_path / "b", target)
    first.train(stop_after=4, progress=False)  # checkpoint at step 3; step 4 is lost
    torch.manual_seed(1234)  # whatever the RNG did meanwhile must not matter
    second = _trainer(tmp_path / "b", target)
    assert second.resume() and second.step == 4
    # resume() loads the last checkpoint (the stop at step 4 wrote one); continue to the end
    second.train(progress=False)
    for (name, p), q in zip(full.drafter.state_dict().items(), second.drafter.state_dict().values(),
                            strict=True):
        assert torch.equal(p, q), name
    logged = [json.loads(ln) for ln in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["loss_total"] for r in logged] == [r["loss_total"] for r in full_recs]


def test_dflash_trains_ce_only(tmp_path) -> None:
    tr = _trainer(tmp_path, method="dflash", max_steps=2)
    rec = tr.train(progress=False)[-1]
    assert "loss_tv" not in rec and tr.drafter.cfg.markov_rank == 0 and not tr.drafter.cfg.confidence_head


def test_warm_start_takes_the_earlier_runs_last_weights_and_vocabulary(tmp_path) -> None:
    from dspark.errors import UserError

    target = tiny_target()
    first = _trainer(tmp_path / "a", target, max_steps=3)
    first.train(progress=False)
    second = _trainer(tmp_path / "b", target, init_from=str(tmp_path / "a"), seed=5)
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
    old = _trainer(tmp_path / "e", target, init_from=str(tmp_path / "a"))
    assert torch.equal(old.drafter.conf_offset, torch.zeros(4))
    with pytest.raises(UserError, match="rank"):  # another shape cannot start from it
        _trainer(tmp_path / "c", target, init_from=str(tmp_path / "a"),
                 drafter=DrafterShape(num_layers=1, block_size=4, markov_rank=8, draft_vocab_size=60))
    with pytest.raises(UserError, match="neither a training checkpoint"):
        _trainer(tmp_path / "d", target, init_from=str(tmp_path / "missing"))
    # A shipped (exported) checkpoint directory is a valid start too: the next stage on a fresh machine.
    exported = first.export(tmp_path / "shipped")
    third = _trainer(tmp_path / "f", target, init_from=str(exported))
    torch.testing.assert_close(third.drafter.layers[0].q_proj.weight,
                               first.drafter.layers[0].q_proj.weight.to(torch.bfloat16).float())


def test_teacher_forced_rows_take_the_targets_argmax_as_labels(tmp_path) -> None:
    tok = FakeChatTokenizer()
    tf = [example_from_messages(tok, {"id": f"t{i}", "messages": c}, 64) for i, c in enumerate(conversations(3))]
    tr = _trainer(tmp_path, examples=EXAMPLES[:2] + tf, heldout=0)
    tb, blocks = tr._micro_batch([EXAMPLES[0], tf[0]])
    B, N, K = blocks.target_pos.shape
    top1 = tb.top_ids[..., 0].gather(1, blocks.target_pos.view(B, -1)).view(B, N, K)
    sup = blocks.supervised
    assert torch.equal(blocks.labels[1][sup[1]], top1[1][sup[1]])  # teacher-forced row
    data_next = tb.input_ids.gather(1, (blocks.target_pos + 1).clamp(max=tb.input_ids.shape[1] - 1).view(B, -1))
    assert torch.equal(blocks.labels[0][sup[0]], data_next.view(B, N, K)[0][sup[0]])  # regenerated row


def test_lr_schedule_can_hold_then_decay() -> None:
    assert [round(lr_factor(s, 100, 0.04, 0.2), 3) for s in (0, 3, 50, 80, 90, 100)] == [0.25, 1.0, 1.0, 1.0, 0.5, 0.0]


def test_feature_regression_pulls_the_drafter_state_toward_the_targets(tmp_path) -> None:
    tr = _trainer(tmp_path, max_steps=30, lr=1e-2, warmup_frac=0.05, feature_weight=1.0, heldout=0)
    recs = tr.train(progress=False)
    assert recs[-1]["loss_feat"] < recs[0]["loss_feat"]


def test_steps_per_capture_slices_one_capture_and_resumes_exactly(tmp_path, monkeypatch) -> None:
    import dspark.train.trainer as trainer_mod

    calls = []
    real = trainer_mod.capture
    monkeypatch.setattr(trainer_mod, "capture", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    target = tiny_target()
    kw = dict(steps_per_capture=2, grad_accum=1, batch_size=1, anchors_per_seq=8, checkpoint_every=3, heldout=0)
    full = _trainer(tmp_path / "a", target, **kw)
    recs = full.train(progress=False)
    assert len(calls) == 3  # 6 steps, two per capture
    assert all(r["anchors_seen"] - p["anchors_seen"] <= 4 for p, r in zip([{"anchors_seen": 0}] + recs, recs))
    part = _trainer(tmp_path / "b", target, **kw)
    assert part.train(stop_after=3, progress=False)[-1]["step"] == 4  # a stop finishes its capture
    assert torch.load(tmp_path / "b" / "checkpoint" / "state.pt", weights_only=False)["step"] == 4
    again = _trainer(tmp_path / "b", target, **kw)
    assert again.resume() and again.step == 4
    again.train(progress=False)
    for (name, p), q in zip(full.drafter.state_dict().items(), again.drafter.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_warm_start_grows_layers_from_the_target_without_changing_the_drafts(tmp_path) -> None:
    from dspark.errors import UserError

    target = tiny_target()
    first = _trainer(tmp_path / "a", target, max_steps=3)
    first.train(progress=False)
    two = DrafterShape(num_layers=2, block_size=4, markov_rank=4, draft_vocab_size=60)
    grown = _trainer(tmp_path / "b", target, init_from=str(tmp_path / "a"), drafter=two, lr=1e-2)
    assert grown.drafter.cfg.num_layers == 2
    for name, p in first.drafter.state_dict().items():  # every old weight, the old layer included
        assert torch.equal(p, grown.drafter.state_dict()[name]), name
    # The new top layer starts as the target's last one, its residual outputs at zero ...
    new, src = grown.drafter.layers[1], target.model.layers[-1]
    q, k, _ = src.self_attn.qkv_proj.weight.split(src.self_attn.split, dim=0)
    assert torch.equal(new.q_proj.weight, q) and torch.equal(new.k_proj.weight, k)
    assert torch.equal(new.mlp.up_proj.weight, src.mlp.gate_up_proj.weight.chunk(2, dim=0)[1])
    assert not new.o_proj.weight.any() and not new.mlp.down_proj.weight.any()
    # ... so the grown drafter's logits and confidences are the old ones exactly.
    tb, blocks = first._micro_batch(EXAMPLES[:2])
    with torch.no_grad():
        a = first.drafter.forward_train(tb.taps, tb.input_ids, blocks.anchors)
        b = grown.drafter.forward_train(tb.taps, tb.input_ids, blocks.anchors)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.conf_logits, b.conf_logits)
    grown.train(progress=False)  # and the new layer learns: its zero outputs move
    assert grown.drafter.layers[1].o_proj.weight.any() and grown.drafter.layers[1].mlp.down_proj.weight.any()
    with pytest.raises(UserError, match="at most"):  # a checkpoint never shrinks
        _trainer(tmp_path / "c", target, init_from=str(tmp_path / "b"))


def test_a_layer_copied_whole_from_the_target_takes_its_residual_outputs_too() -> None:
    from dspark.drafter.config import DrafterConfig
    from dspark.drafter.model import Drafter

    target = tiny_target()
    cfg = DrafterConfig.for_target("tiny", target.cfg, num_layers=1, block_size=4, mask_token_id=VOCAB)
    d = Drafter(cfg, target)
    d.init_layer_from_target(0, 0, identity=False)
    src = target.model.layers[0]
    assert torch.equal(d.layers[0].o_proj.weight, src.self_attn.o_proj.weight)
    assert torch.equal(d.layers[0].mlp.down_proj.weight, src.mlp.down_proj.weight)
    assert torch.equal(d.layers[0].input_layernorm.weight, src.input_layernorm.weight)


def test_a_grown_start_still_refuses_a_state_missing_part_of_a_layer_it_has(tmp_path) -> None:
    from dspark.drafter.checkpoint import load_weights

    first = _trainer(tmp_path / "a", max_steps=1)
    state = {k: v for k, v in first.drafter.state_dict().items() if k != "layers.0.q_proj.weight"}
    with pytest.raises(ValueError, match="layers.0.q_proj"):
        load_weights(first.drafter, state, strict=False)
    with pytest.raises(ValueError, match="markov_w1"):
        load_weights(first.drafter, {k: v for k, v in first.drafter.state_dict().items() if k != "markov_w1.weight"},
                     strict=False)
