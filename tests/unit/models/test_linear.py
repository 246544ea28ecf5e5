"""Prepacked and int8 linears: same model API, same (or, for int8, close) outputs, and
speculation exact relative to whatever target they make."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dspark.engine.engine import Engine, EngineConfig
from dspark.models.linear import Int8Linear, PackedLinear, mkldnn_bf16, prepack, quantize_int8
from dspark.models.transformer import ForwardBatch
from dspark.spec.ngram import NgramProposer
from dspark.spec.sampling import SamplingParams
from tests.tiny import tiny_model


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        h, _ = model(torch.tensor([ids]), ForwardBatch.build([0], [0], [len(ids)]), model.new_cache(1, 32))
        return model.logits(h)[0]


def test_fp32_prepack_keeps_outputs_and_the_tied_head() -> None:
    model = tiny_model("qwen2")  # q/k/v biases too
    packed = copy.deepcopy(model)
    prepack(packed)
    assert packed.lm_head.weight is packed.model.embed_tokens.weight  # the drafter reads these rows
    assert packed.lm_head.weight.shape == (96, 32) and packed.lm_head.weight.is_contiguous()
    assert not packed.model.layers[0].mlp.down_proj.weight.is_contiguous()  # stored (in, out)
    torch.testing.assert_close(_logits(packed, [3, 4, 5, 6]), _logits(model, [3, 4, 5, 6]), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not mkldnn_bf16(), reason="oneDNN bf16 is not supported on this CPU")
def test_bf16_packed_linear_is_bit_identical_to_f_linear() -> None:
    lin = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    packed = PackedLinear.from_linear(lin)
    for rows in (1, 3, 8, 33):
        x = torch.randn(2, rows, 64).to(torch.bfloat16)
        assert torch.equal(packed(x), F.linear(x, lin.weight, lin.bias))


def test_int8_linear_is_close_to_the_full_precision_one() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    q = Int8Linear(lin)
    assert q.qweight.dtype == torch.int8 and q.weight is None
    x = torch.randn(5, 64)
    want = F.linear(x, lin.weight, lin.bias)
    got = q(x.to(torch.bfloat16)).float()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_int8_model_keeps_the_api_and_speculation_stays_exact_relative_to_it() -> None:
    model = tiny_model("llama", seed=4)
    quantize_int8(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.bfloat16
    assert model.new_cache(1, 8).dtype == torch.bfloat16
    prompts = [[5, 6, 7, 5, 6, 7, 5], [9, 10, 9, 10, 9]]
    params = SamplingParams(max_new_tokens=12)

    def run(proposer: NgramProposer | None) -> list[list[int]]:
        engine = Engine(model, (), proposer, EngineConfig(max_batch_size=2, max_seq_len=64, block_size=3))
        return [o.token_ids for o in engine.generate(prompts, params)]

    assert run(NgramProposer()) == run(None)
