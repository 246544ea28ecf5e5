"""Penalties, logit bias and logprobs inside the real engine, with speculation on:

- greedy output with penalties equals a from-scratch reference decoder (no KV, no engine);
- sampled output keeps the exact law of plain decoding with the same processing (the joint
  law of the 2nd and 3rd tokens, chi-square against exact enumeration);
- returned logprobs are the target's log-probabilities of the emitted tokens (within 1e-4
  in float32), whichever proposer drafted them."""

from __future__ import annotations

import itertools

import pytest
import torch

from dspark.engine.engine import Engine, EngineConfig
from dspark.models.runner import ModelRunner, SeqInput
from dspark.spec.ngram import NgramProposer
from dspark.spec.sampling import SamplingParams
from tests.unit.engine.test_policies import MODEL, PROMPT, RandomDrafter, V, chi_square_p_upper

PENALTIES = {"presence_penalty": 0.8, "frequency_penalty": 0.6, "logit_bias": ((2, 1.5), (5, -100.0))}


def full_logits(ids: list[int]) -> torch.Tensor:
    """(len(ids), V) target logits of a fresh forward over `ids`."""
    runner = ModelRunner(MODEL, MODEL.new_cache(1, 64))
    return runner.forward([SeqInput(runner.cache.allocate(), ids)]).logits[0].float()


def penalised(logits: torch.Tensor, output: list[int]) -> torch.Tensor:
    out = logits.clone()
    for j in set(output):
        out[j] -= output.count(j) * PENALTIES["frequency_penalty"] + PENALTIES["presence_penalty"]
    for j, b in PENALTIES["logit_bias"]:
        out[j] += b
    return out


def reference_greedy(prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(int(penalised(full_logits(prompt + out)[-1], out).argmax()))
    return out


def spec_engine(block: int = 3, proposer: object = "random") -> Engine:
    drafter = RandomDrafter() if proposer == "random" else proposer
    return Engine(MODEL, (), drafter, EngineConfig(max_batch_size=32, max_seq_len=32, block_size=block))


def test_greedy_with_penalties_equals_reference_decoder() -> None:
    prompts = [[1, 2, 3], [4, 4, 4, 4], [7]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, **PENALTIES)
    for eng in (Engine(MODEL, (), None, EngineConfig(max_batch_size=3, max_seq_len=32)), spec_engine(4),
                spec_engine(4, NgramProposer())):
        outs = eng.generate(prompts, params)
        assert [o.token_ids for o in outs] == [reference_greedy(p, 12) for p in prompts]
        assert all(5 not in o.token_ids for o in outs)  # a -100 bias bans the token


def exact_joint(temperature: float) -> torch.Tensor:
    """P(t2, t3) under plain decoding with PENALTIES at `temperature`, by enumeration."""
    def dist(prefix: list[int]) -> torch.Tensor:
        out = prefix[len(PROMPT):]
        return torch.softmax(penalised(full_logits(prefix)[-1], out) / temperature, -1)
    p1 = dist(PROMPT)
    p2 = torch.stack([dist(PROMPT + [a]) for a in range(V)])  # (V, V)
    p3 = torch.stack([dist(PROMPT + [a, b]) for a, b in itertools.product(range(V), range(V))]).view(V, V, V)
    return torch.einsum("a,ab,abc->bc", p1, p2, p3)


def test_sampling_with_penalties_is_lossless() -> None:
    n = 2500
    expected = exact_joint(1.0) * n
    params = [SamplingParams(temperature=1.0, max_new_tokens=3, ignore_eos=True, seed=i, **PENALTIES)
              for i in range(n)]
    observed = torch.zeros(V, V)
    for o in spec_engine().generate([PROMPT] * n, params):
        observed[o.token_ids[1], o.token_ids[2]] += 1
    assert observed[expected < 1e-12].sum() == 0, "a banned token pair appeared"
    keep = expected > 1e-12
    e, o = expected[keep], observed[keep]
    small = e < 5
    e = torch.cat([e[~small], e[small].sum().reshape(1)])
    o = torch.cat([o[~small], o[small].sum().reshape(1)])
    stat = float(((o - e) ** 2 / e.clamp_min(1e-9)).sum())
    assert chi_square_p_upper(stat, len(e) - 1) > 1e-3, f"chi2={stat:.1f} over {len(e) - 1} dof"


@pytest.mark.parametrize("proposer", ["ar", "random", "ngram"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_are_the_targets_log_probabilities(proposer: str, temperature: float) -> None:
    drafter = {"ar": None, "random": RandomDrafter(), "ngram": NgramProposer()}[proposer]
    eng = Engine(MODEL, (), drafter, EngineConfig(max_batch_size=4, max_seq_len=40, block_size=4))
    prompts = [[1, 2, 3], [4, 4, 4, 4]]
    params = SamplingParams(temperature=temperature, max_new_tokens=14, ignore_eos=True, seed=3, logprobs=3,
                            presence_penalty=0.5)
    for prompt, out in zip(prompts, eng.generate(prompts, params)):
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
        rows = full_logits(prompt + out.token_ids)[len(prompt) - 1: -1]  # row i predicts token i
        for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            ref = torch.log_softmax(penalised_presence(rows[i], out.token_ids[:i]), -1)
            assert lp.token_id == tok and abs(lp.logprob - float(ref[tok])) < 1e-4
            top = ref.topk(3)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            assert max(abs(a - b) for (_, a), b in zip(lp.top, top.values.tolist())) < 1e-4


def penalised_presence(logits: torch.Tensor, output: list[int]) -> torch.Tensor:
    out = logits.clone()
    for j in set(output):
        out[j] -= 0.5
    return out


def test_no_logprobs_unless_asked() -> None:
    [out] = spec_engine().generate([PROMPT], SamplingParams(max_new_tokens=4))
    assert out.logprobs is None
