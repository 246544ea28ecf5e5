from __future__ import annotations

import json
import types

import torch

from dspark.drafter.proposer import DrafterProposer
from dspark.models.transformer import ForwardBatch
from dspark.spec.sampling import SamplingParams
from dspark.train.regenerate import read_conversations, regenerate
from dspark.train.rounds import Round, RoundStats, run_rounds
from tests.unit.drafter.helpers import tiny_drafter, tiny_target
from tests.unit.train.fake_chat import FakeChatTokenizer, conversations


def _greedy_ar(target, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        cache = target.new_cache(1, len(ids))
        with torch.no_grad():
            h, _ = target(torch.tensor([ids]), ForwardBatch.build([0], [0], [len(ids)]), cache)
        ids.append(int(target.logits(h[0, -1]).argmax()))
    return ids[len(prompt):]


def test_greedy_rounds_reproduce_target_greedy_decoding() -> None:
    target = tiny_target()
    prop = DrafterProposer(tiny_drafter(target), "dspark")
    prompt = [5, 17, 33, 2, 8]
    params = SamplingParams(max_new_tokens=12)
    emitted: list[list[int]] = []
    orig = prop.propose

    def spy(reqs):  # record the committed tokens each round sees
        emitted.append(list(reqs[0].token_ids))
        return orig(reqs)

    prop.propose = spy  # type: ignore[method-assign]
    stats = run_rounds(target, prop, [prompt], params, block_size=4)
    assert stats.rounds and all(0 <= r.num_accepted <= 4 for r in stats.rounds)
    last = emitted[-1][len(prompt):]
    assert last == _greedy_ar(target, prompt, len(last))
    z, n = stats.calibration_data(4)
    assert z.shape[1] == 4 and n.shape[0] == z.shape[0]
    # The last round finished the sequence (the proposer forgets it then): its confidences
    # are still recorded, with one logit per verified draft.
    assert all(r.conf_logits is not None and r.conf_logits.shape == (r.num_drafted,)
               for r in stats.rounds if r.num_drafted)
    assert 1 + sum(r.num_accepted + 1 for r in stats.rounds) == params.max_new_tokens  # first token + rounds


def test_round_statistics_by_hand() -> None:
    st = RoundStats([Round(3, 3, None), Round(3, 1, None), Round(3, 0, None), Round(2, 2, None)])
    assert st.tau == (4 + 2 + 1 + 3) / 4
    assert st.conditional_acceptance(3) == [2 / 3, 1 / 2, 1.0]


def test_regenerate_appends_and_resumes(tmp_path) -> None:
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps({"id": f"c{i}", "messages": m}) + "\n"
                           for i, m in enumerate(conversations(3))))
    loaded = types.SimpleNamespace(model=tiny_target(), tokenizer=FakeChatTokenizer(),
                                   generation_config={"temperature": 0.5, "top_p": 0.9})
    out = tmp_path / "regen.jsonl"
    recs = read_conversations(src)
    assert regenerate(loaded, recs[:2], out, max_new_tokens=6, batch=2, system_prompt="1 2") == 2
    assert regenerate(loaded, recs, out, max_new_tokens=6, batch=2, system_prompt="1 2") == 1  # c0, c1 done
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == ["c0", "c1", "c2"]
    assert [m["role"] for m in lines[0]["messages"]] == ["system", "user", "assistant"]


def test_regenerate_plans_and_reports_prompts_left_out_for_length(tmp_path) -> None:
    src = tmp_path / "train.jsonl"
    convs = conversations(3)
    convs[1][0]["content"] = " ".join(["5"] * 80)  # far over the prompt limit below
    src.write_text("".join(json.dumps({"id": f"c{i}", "messages": m}) + "\n" for i, m in enumerate(convs)))
    loaded = types.SimpleNamespace(model=tiny_target(), tokenizer=FakeChatTokenizer(),
                                   generation_config={"temperature": 0.5, "top_p": 0.9})
    plans = []
    n = regenerate(loaded, read_conversations(src), tmp_path / "regen.jsonl", max_new_tokens=4, batch=2,
                   max_prompt_tokens=40, system_prompt="1 2", on_plan=lambda a, b: plans.append((a, b)))
    assert n == 2 and plans == [(2, 1)]
