"""Tiny random checkpoints of every family, saved by transformers, loaded by our loader.

Checks (float32): last-position logits match transformers within 1e-3, and a right-padded
batch of different-length sequences (prefill, then decode steps) equals running each alone.
Gemma 3's sliding window (4) is shorter than the prompts, so the window mask is exercised.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dspark.models.loader import LoadedModel, load_model
from tests.unit.models.helpers import forward_logits, greedy_decode, write_tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _hf_config(family: str):  # noqa: ANN202 - a transformers config object
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=False)
    if family == "llama-tied":
        return tf.LlamaConfig(**COMMON, rope_theta=500.0, tie_word_embeddings=True)
    if family == "qwen2":
        return tf.Qwen2Config(**COMMON, rope_theta=1e6, tie_word_embeddings=False)
    if family == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True)
    return tf.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 4}, head_dim=16, sliding_window=4,
                               query_pre_attn_scalar=24,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                            "sliding_attention"])


FAMILIES = ["llama", "llama-tied", "qwen2", "qwen3", "gemma3"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_hf_config(request.param), dtype=torch.float32,
                                          attn_implementation="eager").eval()
    with torch.no_grad():  # random-ish norm weights and biases, so a mis-mapped one shows up
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0, 0.2)
    path: Path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    write_tiny_tokenizer(path, VOCAB)
    return hf, load_model(str(path))


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (11, 5, 8)]


def test_config_family(pair: tuple) -> None:
    hf, ours = pair
    assert isinstance(ours, LoadedModel)
    assert ours.config.family == {"gemma3_text": "gemma3"}.get(hf.config.model_type, hf.config.model_type)
    assert not any(p.requires_grad for p in ours.model.parameters())


def test_logits_match_transformers(pair: tuple) -> None:
    hf, ours = pair
    for prompt in _prompts():
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        got = forward_logits(ours.model, [prompt], ours.config.sliding_window)[0]
        torch.testing.assert_close(got[-1], ref[-1], atol=1e-3, rtol=0)
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)


def test_batched_forward_equals_single(pair: tuple) -> None:
    _, ours = pair
    prompts, window = _prompts(), ours.config.sliding_window
    batched = forward_logits(ours.model, prompts, window)
    for prompt, got in zip(prompts, batched, strict=True):
        torch.testing.assert_close(got, forward_logits(ours.model, [prompt], window)[0], atol=1e-5, rtol=0)


def test_batched_greedy_equals_single(pair: tuple) -> None:
    _, ours = pair
    prompts, window = _prompts(), ours.config.sliding_window
    together = greedy_decode(ours.model, prompts, 8, sliding_window=window)
    alone = [greedy_decode(ours.model, [p], 8, sliding_window=window)[0] for p in prompts]
    assert together == alone


def test_greedy_matches_transformers_generate(pair: tuple) -> None:
    hf, ours = pair
    prompt = _prompts()[0]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert greedy_decode(ours.model, [prompt], 8, sliding_window=ours.config.sliding_window)[0] == ref
