"""The compiled decode/verify step (torch.compile, inductor with freezing) against the eager
forward on tiny random models. Compilation is the slow part (tracing scales with the layers,
and freezing makes every process trace again), so the models have 1-2 layers and the tests
share eight graphs: buckets (1, 4) at batch 1 and batch >= 2 in float32, the same two buckets
at batch 1 with the drafter's layer taps, and batch 1 in bf16. Inductor's kernels are cached
on disk, so later runs mostly pay for tracing."""

from __future__ import annotations

import copy

import pytest
import torch

from dspark.drafter.proposer import DrafterProposer
from dspark.engine.engine import Engine, EngineConfig
from dspark.models.compile import CompiledStep, bucket_for, cpp_compiler
from dspark.models.linear import prepack
from dspark.models.runner import ModelRunner, SeqInput
from dspark.models.transformer import SPARE_POSITIONS, ForwardBatch
from dspark.spec.draft_model import DraftModelProposer
from dspark.spec.ngram import NgramProposer
from dspark.spec.sampling import SamplingParams
from tests.tiny import tiny_model
from tests.unit.drafter.helpers import VOCAB, tiny_drafter

BUCKETS = (1, 4)
needs_compiler = pytest.mark.skipif(cpp_compiler() is None, reason="inductor needs a C++ compiler")
# A cold inductor cache on a loaded 2-core machine: several minutes per graph (warm: seconds).
pytestmark = pytest.mark.timeout(3600)


def test_bucket_for_pads_up_and_gives_up_past_the_largest() -> None:
    assert [bucket_for(n, (1, 2, 8)) for n in (1, 2, 3, 8, 9)] == [1, 2, 8, 8, None]


def _compiled(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    prepack(model)  # what load_target does before compiling
    model.compiled = CompiledStep(model, BUCKETS)
    return model


@pytest.fixture(scope="module")
def fp32() -> tuple[torch.nn.Module, torch.nn.Module]:
    eager = tiny_model("llama", seed=0, num_layers=2, vocab_size=VOCAB)  # the drafter taps layer 1
    return eager, _compiled(eager)


def _runners(eager: torch.nn.Module, compiled: torch.nn.Module, slots: int) -> list[ModelRunner]:
    runners = [ModelRunner(m, m.new_cache(slots, 64)) for m in (eager, compiled)]
    for r in runners:
        for s in range(slots):
            r.cache.allocate()
            r.forward([SeqInput(s, list(range(3 + s, 20 + 2 * s)))])  # eager prefill (> largest bucket)
    return runners


def _steps(runners: list[ModelRunner], seqs: list[list[int]]) -> list[list[torch.Tensor]]:
    return [r.forward([SeqInput(s, toks) for s, toks in enumerate(seqs)]).logits for r in runners]


@needs_compiler
@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_logits_equal_eager_for_every_bucket(fp32: tuple, batch: int) -> None:
    runners = _runners(*fp32, slots=batch)
    for n in (1, 2, 3, 4, 1):  # every token count up to the largest bucket, padded or not
        seqs = [[5 + n + b] * n if b == 0 else [7] * max(1, n - 1) for b in range(batch)]
        eager, compiled = _steps(runners, seqs)
        for e, c in zip(eager, compiled, strict=True):
            torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-4)
    assert runners[0].cache.lengths == runners[1].cache.lengths


@needs_compiler
def test_compiled_bf16_logits_within_bf16_tolerance() -> None:
    eager = tiny_model("llama", seed=3, num_layers=1).to(torch.bfloat16)
    runners = _runners(eager, _compiled(eager), slots=1)
    for n in (1, 3, 4):
        [e], [c] = _steps(runners, [[9] * n])
        # Inductor may keep fused intermediates in float32 where eager rounds them to bf16.
        scale = e.abs().max().item()
        assert (c - e).abs().max().item() <= 2 ** -5 * scale, (n, scale)
        assert torch.equal(c.argmax(-1), e.argmax(-1))


PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7], [9, 10, 11, 9, 10, 11, 9], [11, 12, 13, 14, 15, 16]]
PARAMS = SamplingParams(max_new_tokens=16)


def _generate(target: torch.nn.Module, proposer=None, max_batch_size: int = 2) -> list[list[int]]:  # noqa: ANN001
    config = EngineConfig(max_batch_size=max_batch_size, max_seq_len=64, block_size=max(BUCKETS) - 1)
    return [o.token_ids for o in Engine(target, (), proposer, config).generate(PROMPTS, PARAMS)]


@needs_compiler
def test_greedy_output_identical_with_and_without_compile(fp32: tuple) -> None:
    eager, compiled = fp32
    assert _generate(compiled) == _generate(eager)


@needs_compiler
@pytest.mark.parametrize("method", ["ngram", "draft-model", "dspark", "dflash"])
def test_speculation_equals_ar_with_compile(fp32: tuple, method: str) -> None:
    _, target = fp32
    if method == "ngram":
        proposer = NgramProposer()
    elif method == "draft-model":
        proposer = DraftModelProposer(tiny_model("llama", seed=7, num_layers=1, vocab_size=96), max_batch_size=2,
                                      max_seq_len=64, stop_below=0.0)
    else:
        drafter = tiny_drafter(target, **({"markov_rank": 0, "confidence_head": False} if method == "dflash" else {}))
        proposer = DrafterProposer(drafter, method)
    # The drafters' layer taps are part of the graph: one request at a time keeps them to two graphs.
    batch = 1 if method in ("dspark", "dflash") else 2
    assert _generate(target, proposer, batch) == _generate(target, max_batch_size=batch)


def test_static_shape_layout_computes_the_same_step() -> None:
    """The CUDA-graph layout (masks over the whole cache, slots gathered inside the step)
    gives what the dynamic one gives; checked eager, so it runs without a GPU or compiler."""
    model = tiny_model("gemma3", seed=5)  # sliding-window layers too
    runner = ModelRunner(model, model.new_cache(3, 40))
    for s, n in ((0, 5), (1, 12), (2, 9)):
        runner.cache.allocate()
        runner.forward([SeqInput(s, list(range(2, 2 + n)))])
    slots, starts, ids = [2, 1], [9, 12], torch.tensor([[4, 5, 6, 7], [8, 9, 10, 11]])
    cache, window = runner.cache, model.cfg.sliding_window
    with torch.no_grad():
        dynamic = ForwardBatch.build(slots, starts, [4, 4], sliding_window=window)
        want, _ = model.step(ids, dynamic, dynamic.cache_view(cache))
        static = ForwardBatch.build(slots, starts, [4, 4], sliding_window=window, context=cache.k_store[0].shape[2])
        assert static.full_mask.shape[-1] == 40 + SPARE_POSITIONS
        got, _ = model.step(ids, static, static.cache_view(cache, gather_in_graph=True))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_without_a_cpp_compiler_one_line_says_so_and_the_model_stays_eager(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from dspark.models import compile as compile_mod

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
    model = tiny_model("llama", seed=2, num_layers=1)
    assert compile_mod.cpp_compiler() is None
    assert compile_mod.compile_step(model) is False
    assert model.compiled is None
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no C++ compiler" in err and "--no-compile" in err
