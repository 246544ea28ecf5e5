"""Every verification policy keeps speculative decoding lossless inside the real engine.

Greedy: identical tokens. Sampling: the joint law of the first two speculative tokens
matches the target's exact law (computed by enumerating the tiny vocabulary), with
confidences that depend on the drafted tokens themselves, the situation in which a
look-ahead scheduler would bias the output (DSPARK.md section 4)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dspark.engine.engine import Engine, EngineConfig
from dspark.models.runner import ModelRunner, SeqInput
from dspark.spec.gate import DraftGate
from dspark.spec.proposer import Draft, DraftRequest
from dspark.spec.sampling import SamplingParams, probs_from_logits
from dspark.spec.scheduler import StepCostProfile, create_policy
from tests.tiny import tiny_model

V = 8
MODEL = tiny_model("llama", seed=5, vocab_size=V, num_layers=2)
PROMPT = [1, 2, 3]
# Steep step-cost curve: long verification batches are expensive, so `confidence` trims.
SPS = StepCostProfile.from_points({1: 100.0, 4: 60.0, 8: 30.0, 16: 12.0, 64: 3.0})


class RandomDrafter:
    """Samples drafts from a fixed (wrong) distribution. Like DSpark's head, confidence c_k
    is a function of the previous token x_{k-1} (x_0 = anchor), never of x_k itself, so
    scheduling depends on earlier sampled drafts: exactly where a look-ahead goes wrong."""

    name, feature_layers = "random", ()

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.q = torch.softmax(torch.randn(V, generator=g) * 1.5, dim=0)
        self.conf = torch.rand(V, generator=g) * 0.9 + 0.05

    def start(self, seq_id: int, prompt_ids: list[int]) -> None: ...
    def finish(self, seq_id: int) -> None: ...

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        out = []
        for r in requests:
            n = r.max_tokens
            toks = (torch.multinomial(self.q, n, replacement=True, generator=r.generator) if n
                    else torch.zeros(0, dtype=torch.long))
            prev = torch.cat([torch.tensor([r.token_ids[-1]]), toks[:-1]]) if n else toks
            out.append(Draft(toks.tolist(), self.q.expand(n, V).clone(), self.conf[prev]))
        return out


def exact_joint(params: SamplingParams) -> torch.Tensor:
    """P(t2, t3) of the 2nd and 3rd generated tokens (the 1st comes from prefill)."""
    runner = ModelRunner(MODEL, MODEL.new_cache(V * V, 16))
    slots = [runner.cache.allocate() for _ in range(V * V)]
    def dist(prefixes: list[list[int]]) -> torch.Tensor:
        for s in slots[: len(prefixes)]:
            runner.cache.rollback(s, 0)
        out = runner.forward([SeqInput(s, p) for s, p in zip(slots, prefixes)], last_only=True)
        return probs_from_logits(torch.cat(out.logits), params)  # (n, V)
    p1 = dist([PROMPT])[0]
    p2 = dist([PROMPT + [a] for a in range(V)])  # (V, V): t1 -> t2
    pairs = list(itertools.product(range(V), range(V)))
    p3 = dist([PROMPT + [a, b] for a, b in pairs]).view(V, V, V)  # t1, t2 -> t3
    return torch.einsum("a,ab,abc->bc", p1, p2, p3)


def sampled_joint(policy_name: str, params: SamplingParams, n: int) -> torch.Tensor:
    gated = policy_name.endswith("+gate")
    policy_name = policy_name.removesuffix("+gate")
    policy = None if policy_name == "fixed" else create_policy(policy_name, **(
        {"threshold": 0.5} if policy_name == "threshold" else {}))
    gate = DraftGate(SPS, max_skip=2) if gated else None
    eng = Engine(MODEL, (), RandomDrafter(), EngineConfig(max_batch_size=32, max_seq_len=16, block_size=3),
                 policy, SPS, gate=gate)
    counts = torch.zeros(V, V)
    outs = eng.generate([PROMPT] * n, [SamplingParams(temperature=params.temperature, top_p=params.top_p,
                                                      max_new_tokens=3, seed=i) for i in range(n)])
    for o in outs:
        counts[o.token_ids[1], o.token_ids[2]] += 1
    return counts


def chi_square_p_upper(stat: float, df: int) -> float:
    """Upper tail of chi-square via the Wilson-Hilferty normal approximation."""
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("policy", ["fixed", "threshold", "confidence", "confidence+gate"])
def test_sampling_is_lossless_under_every_policy(policy: str) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95)
    n = 2500
    expected = exact_joint(params) * n
    observed = sampled_joint(policy, params, n)
    assert observed[expected == 0].sum() == 0, "a token pair the target never emits appeared"
    keep = expected > 0
    # merge sparse cells so the chi-square approximation holds
    e, o = expected[keep], observed[keep]
    small = e < 5
    e = torch.cat([e[~small], e[small].sum().reshape(1)])
    o = torch.cat([o[~small], o[small].sum().reshape(1)])
    stat = float(((o - e) ** 2 / e.clamp_min(1e-9)).sum())
    assert chi_square_p_upper(stat, len(e) - 1) > 1e-3, f"{policy}: chi2={stat:.1f} over {len(e) - 1} dof"


@pytest.mark.parametrize("policy", ["threshold", "confidence"])
def test_greedy_output_identical_to_ar_under_policy(policy: str) -> None:
    prompts = [[1, 2, 3], [4, 4, 4, 4], [7]]
    params = SamplingParams(max_new_tokens=12)
    ar = Engine(MODEL, (), None, EngineConfig(max_batch_size=3, max_seq_len=32)).generate(prompts, params)
    pol = create_policy(policy, **({"threshold": 0.5} if policy == "threshold" else {}))
    spec = Engine(MODEL, (), RandomDrafter(), EngineConfig(max_batch_size=3, max_seq_len=32, block_size=4),
                  pol, SPS).generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in ar]


def test_confidence_policy_verifies_fewer_drafts_than_fixed() -> None:
    def run(policy):  # noqa: ANN001, ANN202
        eng = Engine(MODEL, (), RandomDrafter(), EngineConfig(max_batch_size=16, max_seq_len=32, block_size=5),
                     policy, SPS)
        drafted = 0
        for i in range(16):
            eng.add_request([1 + i % 5, 2], SamplingParams(max_new_tokens=10, temperature=1.0, seed=i))
        while eng.has_work:
            drafted += eng.step().drafted
        return drafted
    assert run(create_policy("confidence")) < run(None)


def test_gate_mixes_drafted_and_plain_rounds_and_stays_greedy_exact() -> None:
    """A drafter that never pays (always wrong, costly per SPS) is gated off most rounds;
    the output is still exactly AR's and features of skipped rounds are not lost."""
    prompts = [[1, 2, 3], [4, 4, 4, 4], [7]]
    params = SamplingParams(max_new_tokens=24)
    ar = Engine(MODEL, (), None, EngineConfig(max_batch_size=3, max_seq_len=40)).generate(prompts, params)
    gate = DraftGate(SPS, max_skip=4)
    eng = Engine(MODEL, (), RandomDrafter(), EngineConfig(max_batch_size=3, max_seq_len=40, block_size=4),
                 None, SPS, gate=gate)
    assert [o.token_ids for o in eng.generate(prompts, params)] == [o.token_ids for o in ar]
    assert gate.drafted_rounds >= 3 and gate.skipped_rounds > gate.drafted_rounds
