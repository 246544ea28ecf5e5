"""The engine on one CUDA device: the model's forward (prefill, and the verify forward of
anchor + drafts on a filled cache) against the same weights on the CPU in float32, and
speculative decoding on CUDA equal to plain decoding on CUDA (greedy, float32), the whole
engine included (slots, rollback, verification, RNGs on the device).

Tiny random-weight models: the point is the device code path, not a checkpoint, so the
suite needs nothing but torch and a GPU (scripts/gpu-check.sh)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

from dspark.engine.engine import Engine, EngineConfig
from dspark.models.runner import ModelRunner, SeqInput
from dspark.spec.draft_model import DraftModelProposer
from dspark.spec.ngram import NgramProposer
from dspark.spec.proposer import Draft, DraftRequest
from dspark.spec.sampling import SamplingParams
from tests.tiny import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
FAMILIES = ["llama", "qwen2", "qwen3", "gemma3"]
PROMPTS = [[3, 17, 42, 5, 8], [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2], [77], list(range(10, 40))]


@pytest.fixture(autouse=True)
def _exact_fp32() -> Iterator[None]:
    """Plain float32 matmuls (no TF32), so CUDA and CPU differ only by summation order."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on_cuda(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).to("cuda")


def close(cpu: torch.Tensor, gpu: torch.Tensor, rel: float = 1e-4) -> float:
    """Largest difference relative to the largest magnitude; asserts it is below `rel`."""
    err = float((cpu - gpu.cpu()).abs().max() / cpu.abs().max().clamp_min(1e-6))
    assert err < rel, err
    return err


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_verify_forward_match_cpu_float32(family: str) -> None:
    cpu_model = tiny_model(family, seed=3)
    gpu_model = on_cuda(cpu_model)
    runners = [ModelRunner(m, m.new_cache(len(PROMPTS), 64)) for m in (cpu_model, gpu_model)]
    slots = [[r.cache.allocate() for _ in PROMPTS] for r in runners]
    # Prefill of prompts of different lengths in one batch (padding, per-row positions).
    cpu_out, gpu_out = (r.forward([SeqInput(s, p) for s, p in zip(sl, PROMPTS)]) for r, sl in zip(runners, slots))
    for c, g in zip(cpu_out.logits, gpu_out.logits):
        assert g.device.type == "cuda"
        close(c, g)
    # A verify forward on the filled cache: anchor + 4 drafts per sequence, then a rollback
    # (KV bookkeeping only) and a second verify over the same positions.
    drafts = [[int(t) for t in torch.randint(0, 96, (5,), generator=torch.Generator().manual_seed(i))]
              for i in range(len(PROMPTS))]
    for _ in range(2):
        outs = []
        for r, sl in zip(runners, slots):
            outs.append(r.forward([SeqInput(s, d) for s, d in zip(sl, drafts)]))
            for s, p in zip(sl, PROMPTS):
                r.cache.rollback(s, len(p) + 2)  # keep the anchor and one accepted draft
        for c, g in zip(outs[0].logits, outs[1].logits):
            close(c, g)
        drafts = [d[2:] + [7, 8] for d in drafts]
    for c_cache, g_cache in ((runners[0].cache.k, runners[1].cache.k), (runners[0].cache.v, runners[1].cache.v)):
        for s in slots[0]:
            n = runners[0].cache.lengths[s]
            assert n == runners[1].cache.lengths[s]
            close(c_cache[0][s, :n], g_cache[0][s, :n])


class HalfRightProposer:
    """Drafts the target's own greedy continuation with every third token spoiled, so
    verification accepts and rejects in the same round (rollback on the device)."""

    name, feature_layers = "half-right", ()

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def start(self, seq_id: int, prompt_ids: list[int]) -> None: ...
    def finish(self, seq_id: int) -> None: ...

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        out = []
        for r in requests:
            runner = ModelRunner(self.model, self.model.new_cache(1, 128))
            slot, ids, toks = runner.cache.allocate(), list(r.token_ids), []
            for i in range(r.max_tokens):
                nxt = int(runner.forward([SeqInput(slot, ids)], last_only=True).logits[0][-1].argmax())
                toks.append((nxt + 1) % 96 if i % 3 == 2 else nxt)
                ids = [toks[-1]]
            out.append(Draft(toks))
        return out


def engine(model: torch.nn.Module, proposer: object = None, batch: int = len(PROMPTS), block: int = 4) -> Engine:
    return Engine(model, model.cfg.eos_token_ids, proposer,  # type: ignore[arg-type]
                  EngineConfig(max_batch_size=batch, max_seq_len=128, block_size=block))


def test_greedy_speculation_on_cuda_equals_plain_decoding() -> None:
    target = on_cuda(tiny_model("llama", seed=1))
    drafter = on_cuda(tiny_model("llama", seed=2, num_layers=1))
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    ar = [o.token_ids for o in engine(target).generate(PROMPTS, params)]
    for proposer in (NgramProposer(), DraftModelProposer(drafter, max_batch_size=len(PROMPTS), max_seq_len=128,
                                                         stop_below=0.0), HalfRightProposer(target)):
        outs = engine(target, proposer).generate(PROMPTS, params)
        assert [o.token_ids for o in outs] == ar, type(proposer).__name__
        assert all(len(o.token_ids) == 24 for o in outs)
    # The half-right drafter really speculated: drafts accepted and rejected.
    assert 0 < sum(o.num_accepted for o in outs) < sum(o.num_drafted for o in outs)


def test_cuda_greedy_output_equals_cpu() -> None:
    """Same weights, same engine, two devices: identical greedy tokens (a near-tie could
    flip one; with these random tiny models there is none)."""
    cpu_model = tiny_model("qwen3", seed=4)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    cpu = [o.token_ids for o in engine(cpu_model, NgramProposer()).generate(PROMPTS, params)]
    gpu = [o.token_ids for o in engine(on_cuda(cpu_model), NgramProposer()).generate(PROMPTS, params)]
    assert gpu == cpu


def test_sampling_on_cuda_is_seeded_and_batch_independent() -> None:
    """Per-request RNGs live on the device: the same seed gives the same tokens, alone or in
    a batch, with speculation (one-hot drafts) or without."""
    target = on_cuda(tiny_model("llama", seed=1))
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=s, ignore_eos=True)
              for s in range(len(PROMPTS))]
    batch = engine(target, HalfRightProposer(target)).generate(PROMPTS, params)
    again = engine(target, HalfRightProposer(target)).generate(PROMPTS, params)
    alone = engine(target, HalfRightProposer(target), batch=1).generate(PROMPTS[1:2], params[1])
    assert [o.token_ids for o in batch] == [o.token_ids for o in again]
    assert batch[1].token_ids == alone[0].token_ids
    assert all(len(o.token_ids) == 16 and all(0 <= t < 96 for t in o.token_ids) for o in batch)
