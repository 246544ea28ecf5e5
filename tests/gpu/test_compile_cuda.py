"""The CUDA-graph step (torch.compile mode="reduce-overhead", static shapes) against eager."""

from __future__ import annotations

import copy

import pytest
import torch

from dspark.models.compile import CompiledStep
from dspark.models.runner import ModelRunner, SeqInput
from tests.tiny import tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_step_matches_eager(dtype: torch.dtype) -> None:
    eager = tiny_model("llama", seed=2).to("cuda", dtype)
    compiled = copy.deepcopy(eager)
    compiled.compiled = CompiledStep(compiled, (1, 4))
    runners = [ModelRunner(m, m.new_cache(2, 64)) for m in (eager, compiled)]
    for r in runners:
        for s in range(2):
            r.cache.allocate()
            r.forward([SeqInput(s, list(range(3, 12 + s)))])
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for n in (1, 3, 4, 2):
        for seqs in ([SeqInput(0, [5] * n)], [SeqInput(0, [6] * n), SeqInput(1, [7])]):
            want, got = (r.forward(seqs).logits for r in runners)
            for w, g in zip(want, got, strict=True):
                torch.testing.assert_close(g, w, atol=tol * w.abs().max().item(), rtol=tol)
