"""Greedy speculative output on the real SmolLM2 equals plain decoding, for every proposer
we ship for it, on prompts of the shipped eval sets (float32: exact equality)."""

from __future__ import annotations

import json

import pytest
import torch

from dspark.drafter.checkpoint import default_checkpoint
from dspark.engine.build import build_engine, load_target
from dspark.engine.config import EngineConfig
from dspark.paths import eval_dir
from dspark.spec.sampling import SamplingParams

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"
# Used when the shared eval sets are not next to the checkout, so the test never runs empty.
FALLBACK = ["Write a Python function that checks whether a string is a palindrome.",
            "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?",
            "Explain the difference between a list and a tuple in Python."]


@pytest.fixture(scope="module")
def setup():  # noqa: ANN201
    torch.set_num_threads(1)
    target = load_target(EngineConfig(model=MODEL))
    prompts = []
    for f in sorted(eval_dir().glob("*.jsonl")):
        for line in f.read_text().splitlines()[:2]:
            msgs = [{"role": "user", "content": json.loads(line)["turns"][0]}]
            prompts.append(target.tokenizer.apply_chat_template(msgs, add_generation_prompt=True))
    if not prompts:
        prompts = [target.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
                   for q in FALLBACK]
    params = SamplingParams(max_new_tokens=40)
    _, ar, _ = build_engine(EngineConfig(model=MODEL, method="ar", max_batch_size=len(prompts)), target)
    return target, prompts, params, [o.token_ids for o in ar.generate(prompts, params)]


def _methods() -> list[str]:
    shipped = [m for m in ("dspark", "dflash") if (default_checkpoint(MODEL, m) / "config.json").is_file()]
    return ["ngram", *shipped]


@pytest.mark.parametrize("method", _methods())
def test_real_model_greedy_speculation_equals_ar(setup, method: str) -> None:  # noqa: ANN001
    target, prompts, params, ar = setup
    spec = EngineConfig(model=MODEL, method=method, block_size=7, max_batch_size=4)
    _, engine, _ = build_engine(spec, target)
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == ar
    assert sum(o.num_verify_steps for o in outs) < sum(len(o.token_ids) for o in outs)  # it did speculate
