"""Stop strings on the real SmolLM2 for ar, ngram and dspark (the shipped drafter): greedy
output with a stop string equals AR's output cut at the token that completes it, and the
text ends right before it, although speculative rounds accept tokens past it (float32)."""

from __future__ import annotations

import pytest
import torch

from dspark.drafter.checkpoint import default_checkpoint
from dspark.engine.build import build_engine, load_target
from dspark.engine.config import EngineConfig
from dspark.spec.sampling import SamplingParams

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"
QUESTIONS = ["List the planets of the solar system, one per line.",
             "Write a Python function that returns the square of a number."]
MAX_NEW = 40


@pytest.fixture(scope="module")
def setup():  # noqa: ANN201
    torch.set_num_threads(1)
    target = load_target(EngineConfig(model=MODEL))
    prompts = [target.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    _, ar, _ = build_engine(EngineConfig(model=MODEL, method="ar", max_batch_size=2), target)
    outs = ar.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW))
    return target, prompts, [o.token_ids for o in outs]


def _methods() -> list[str]:
    shipped = ["dspark"] if (default_checkpoint(MODEL, "dspark") / "config.json").is_file() else []
    return ["ar", "ngram", *shipped]


@pytest.mark.parametrize("method", _methods())
def test_greedy_stop_equals_ar_cut_at_the_stop(setup, method: str) -> None:  # noqa: ANN001
    target, prompts, ar = setup
    tok = target.tokenizer
    _, engine, _ = build_engine(EngineConfig(model=MODEL, method=method, block_size=7, max_batch_size=2), target)
    stops, expected_ids, expected_text = [], [], []
    for ids in ar:
        full = tok.decode(ids, skip_special_tokens=True)
        stop = full[len(full) // 2: len(full) // 2 + 4]
        cut = next(i for i in range(len(ids) + 1) if stop in tok.decode(ids[:i], skip_special_tokens=True))
        stops.append(stop)
        expected_ids.append(ids[:cut])
        expected_text.append(full[: full.find(stop)])
    params = [SamplingParams(max_new_tokens=MAX_NEW, stop=(s,)) for s in stops]
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == expected_ids
    assert [o.text for o in outs] == expected_text
    assert all(o.finish_reason == "stop" for o in outs)
