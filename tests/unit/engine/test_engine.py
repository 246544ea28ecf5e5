from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspark.engine.engine import Engine, EngineConfig
from dspark.models.runner import ModelRunner, SeqInput
from dspark.spec.draft_model import DraftModelProposer
from dspark.spec.ngram import NgramProposer
from dspark.spec.proposer import Draft, DraftRequest
from dspark.spec.sampling import SamplingParams
from tests.tiny import tiny_model

TARGET = tiny_model("llama", seed=1)
DRAFTER = tiny_model("llama", seed=2, num_layers=1)  # a worse model with the same vocabulary
EOS = TARGET.cfg.eos_token_ids


def reference_greedy(prompt: list[int], n: int) -> list[int]:
    """Recompute everything from scratch at every step: no KV reuse at all."""
    out: list[int] = []
    for _ in range(n):
        runner = ModelRunner(TARGET, TARGET.new_cache(1, 256))
        slot = runner.cache.allocate()
        tok = int(runner.forward([SeqInput(slot, prompt + out)], last_only=True).logits[0][-1].argmax())
        out.append(tok)
        if tok in EOS:
            break
    return out


class ScriptedProposer:
    """Drafts a fixed mix of right and wrong tokens so rollback paths get exercised."""

    name, feature_layers = "scripted", ()

    def __init__(self, seed: int) -> None:
        self.rng = torch.Generator().manual_seed(seed)

    def start(self, seq_id: int, prompt_ids: list[int]) -> None: ...
    def finish(self, seq_id: int) -> None: ...

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        out = []
        for r in requests:
            n = int(torch.randint(0, r.max_tokens + 1, (1,), generator=self.rng)) if r.max_tokens else 0
            out.append(Draft(torch.randint(0, 96, (n,), generator=self.rng).tolist()))
        return out


def make_engine(proposer=None, block: int = 4, batch: int = 4) -> Engine:
    return Engine(TARGET, EOS, proposer, EngineConfig(max_batch_size=batch, max_seq_len=256, block_size=block))


def test_ar_engine_equals_recompute_from_scratch() -> None:
    prompt = [3, 17, 42, 5, 8]
    [out] = make_engine().generate([prompt], SamplingParams(max_new_tokens=12))
    assert out.token_ids == reference_greedy(prompt, 12)


prompts_st = st.lists(st.lists(st.integers(0, 94), min_size=1, max_size=20), min_size=1, max_size=6)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=prompts_st, block=st.integers(1, 16), which=st.sampled_from(["ngram", "draft", "scripted"]),
       seed=st.integers(0, 1000), stop_below=st.sampled_from([0.0, 0.1]))
def test_greedy_speculation_is_identical_to_ar(prompts, block, which, seed, stop_below) -> None:
    params = SamplingParams(max_new_tokens=10)
    ar = make_engine(batch=3).generate(prompts, params)
    proposer = {"ngram": lambda: NgramProposer(),
                "draft": lambda: DraftModelProposer(DRAFTER, max_batch_size=3, max_seq_len=256,
                                                    stop_below=stop_below),
                "scripted": lambda: ScriptedProposer(seed)}[which]()
    spec = make_engine(proposer, block=block, batch=3).generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in ar]
    assert all(o.num_accepted <= o.num_drafted for o in spec)


def test_draft_model_stops_at_its_first_doubtful_draft() -> None:
    """stop_below = 0 drafts the full block; stop_below > 1 keeps only the always-made first
    draft; in between, drafting stops exactly where the draft model's top probability dips."""
    prompt, K = [3, 17, 42, 5, 8], 6

    def drafts(stop_below: float) -> list[int]:
        prop = DraftModelProposer(DRAFTER, max_batch_size=1, max_seq_len=64, stop_below=stop_below)
        prop.start(0, prompt)
        return prop.propose([DraftRequest(0, prompt, K, SamplingParams(), None, None)])[0].tokens

    full = drafts(0.0)
    assert len(full) == K and drafts(1.01) == full[:1]
    runner = ModelRunner(DRAFTER, DRAFTER.new_cache(1, 64))
    slot = runner.cache.allocate()
    logits = runner.forward([SeqInput(slot, prompt + full)], last_only=False).logits[0]
    top = torch.softmax(logits.float(), -1).max(-1).values[len(prompt):]  # confidence in draft k+1
    cut = float(top[:K - 1].median())
    expect = next((k + 1 for k in range(K - 1) if float(top[k]) < cut), K)
    assert drafts(cut) == full[:expect]


class HistoryProposer:
    """Drafts a mix of right and wrong tokens that depends only on the sequence's own
    tokens (an RNG seeded by them), so the drafts, and with them how many uniforms each
    round takes from the request's RNG, are the same whatever the batch holds."""

    name, feature_layers = "history", ()

    def start(self, seq_id: int, prompt_ids: list[int]) -> None: ...
    def finish(self, seq_id: int) -> None: ...

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        out = []
        for r in requests:
            g = torch.Generator().manual_seed(sum((i + 1) * t for i, t in enumerate(r.token_ids)) % 2**31)
            n = int(torch.randint(0, r.max_tokens + 1, (1,), generator=g)) if r.max_tokens else 0
            toks = torch.randint(0, 96, (n,), generator=g).tolist()
            if toks and torch.rand(1, generator=g) < 0.5:  # now and then the target's own token
                toks[0] = reference_greedy(r.token_ids, 1)[0]
            out.append(Draft(toks))
        return out


def test_output_does_not_depend_on_batch_companions() -> None:
    """Sampled with a per-request RNG: the same seed gives the same tokens, all of them, in
    any batch (drafts depend only on the sequence itself, see HistoryProposer)."""
    prompt = [9, 9, 4, 1]
    params = [SamplingParams(max_new_tokens=16, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 7, 2, 3)]
    [alone] = make_engine(HistoryProposer()).generate([prompt], params[1])
    others = [[1, 2, 3], list(range(40, 60)), [77]]
    mixed = make_engine(HistoryProposer()).generate(others[:1] + [prompt] + others[1:], params)
    assert len(alone.token_ids) == 16 and mixed[1].token_ids == alone.token_ids
    assert mixed[1].num_drafted == alone.num_drafted > 0 and mixed[1].num_accepted == alone.num_accepted
    # The companions are not copies of it: they do differ.
    assert all(o.token_ids != alone.token_ids for i, o in enumerate(mixed) if i != 1)


def test_continuous_batching_admits_more_requests_than_slots() -> None:
    prompts = [[i + 1, i + 2] for i in range(7)]
    eng = make_engine(NgramProposer(), batch=2)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=6))
    alone = make_engine(batch=7).generate(prompts, SamplingParams(max_new_tokens=6))
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert eng.cache.num_free == 2  # every slot returned


def test_streaming_callback_sees_every_token_once() -> None:
    seen: dict[int, list[int]] = {}
    done: set[int] = set()

    def on_tokens(seq_id: int, toks: list[int], finished: bool) -> None:
        assert seq_id not in done
        seen.setdefault(seq_id, []).extend(toks)
        if finished:
            done.add(seq_id)

    outs = make_engine(NgramProposer()).generate([[1, 2, 1, 2, 1], [5]], SamplingParams(max_new_tokens=9), on_tokens)
    assert {o.seq_id: o.token_ids for o in outs} == seen and done == set(seen)


def test_max_new_tokens_and_eos_are_respected() -> None:
    outs = make_engine(ScriptedProposer(3), block=8).generate([[1, 2, 3]], SamplingParams(max_new_tokens=5))
    assert reference_greedy([1, 2, 3], 5)[-1] not in EOS  # no early stop: exactly 5 tokens
    assert outs[0].token_ids == reference_greedy([1, 2, 3], 5) and outs[0].finish_reason == "length"
    # stop on a token the model emits: use the first greedy token as a stop id
    first = reference_greedy([1, 2, 3], 1)[0]
    [o] = make_engine().generate([[1, 2, 3]], SamplingParams(max_new_tokens=5, stop_token_ids=(first,)))
    assert o.token_ids == [first] and o.finish_reason == "stop"


def test_ngram_lookup_prefers_longest_latest_match_and_skips_single_tokens() -> None:
    from dspark.spec.ngram import lookup

    toks = [1, 2, 3, 9, 1, 2, 4, 8, 5, 1, 2]
    assert lookup(toks, 3) == [4, 8, 5]  # suffix [1, 2]: its latest earlier occurrence wins
    assert lookup([7, 5, 6, 8, 9, 5], 2) == []  # only a 1-token match: not drafted by default
    assert lookup([7, 5, 6, 8, 9, 5], 2, min_ngram=1) == [6, 8]
    assert lookup([4, 5, 6, 4, 5], 9) == [6, 4, 5]  # the follow-up may run into the suffix itself
