"""Test-only helpers: a tiny tokenizer file and a plain greedy decoder over CausalLM + KVCache.

The greedy loop is deliberately written here, not imported from the engine, so model parity
tests do not depend on (or hide bugs in) the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dspark.models.transformer import CausalLM, ForwardBatch


def write_tiny_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json (ids 0..vocab_size-1) so load_model accepts the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "unk_token": "<unk>"}))


@torch.no_grad()
def forward_logits(model: CausalLM, prompts: list[list[int]],
                   sliding_window: int | None) -> list[torch.Tensor]:
    """Prefill all prompts as one right-padded batch; logits (len_b, V) of each prompt."""
    cache = model.new_cache(len(prompts), max(map(len, prompts)))
    batch = ForwardBatch.build(list(range(len(prompts))), [0] * len(prompts), [len(p) for p in prompts],
                               sliding_window=sliding_window)
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    hidden, _ = model(ids, batch, cache)
    logits = model.logits(hidden)
    return [logits[b, :len(p)] for b, p in enumerate(prompts)]


@torch.no_grad()
def greedy_decode(model: CausalLM, prompts: list[list[int]], max_new_tokens: int,
                  eos_ids: tuple[int, ...] = (), sliding_window: int | None = None) -> list[list[int]]:
    """Greedy continuations of all prompts decoded together; each stops after an eos id."""
    num = len(prompts)
    cache = model.new_cache(num, max(map(len, prompts)) + max_new_tokens)
    ids = torch.zeros(num, max(map(len, prompts)), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    batch = ForwardBatch.build(list(range(num)), [0] * num, [len(p) for p in prompts],
                               sliding_window=sliding_window)
    hidden, _ = model(ids, batch, cache)
    last = torch.stack([hidden[b, len(p) - 1] for b, p in enumerate(prompts)])  # (B, d)
    for b, p in enumerate(prompts):
        cache.lengths[b] = len(p)
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(num))
    for _ in range(max_new_tokens):
        next_ids = model.logits(last).argmax(-1).tolist()
        for b, t in zip(active, next_ids, strict=True):
            outputs[b].append(t)
        active = [b for b, t in zip(active, next_ids, strict=True) if t not in eos_ids]
        if not active or len(outputs[active[0]]) == max_new_tokens:
            break
        batch = ForwardBatch.build(active, [cache.lengths[b] for b in active], [1] * len(active),
                                   sliding_window=sliding_window)
        step = torch.tensor([[outputs[b][-1]] for b in active])
        hidden, _ = model(step, batch, cache)
        for b in active:
            cache.lengths[b] += 1
        last = hidden[:, 0]
    return outputs
