"""Tiny random-weight models shared by the fast tests."""

from __future__ import annotations

import torch

from dspark.models.config import ModelConfig
from dspark.models.transformer import CausalLM


def tiny_config(family: str = "llama", vocab_size: int = 96, **overrides: object) -> ModelConfig:
    base: dict[str, object] = dict(
        family=family, vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=512, tie_word_embeddings=True, eos_token_ids=(vocab_size - 1,),
    )
    if family == "qwen2":
        base["attention_bias"] = True
    if family == "qwen3":
        base["qk_norm"] = True
    if family == "gemma3":
        base.update(qk_norm=True, gemma_norms=True, hidden_act="gelu_tanh", query_pre_attn_scalar=8,
                    sliding_window=8, layer_types=("sliding_attention",) * 3 + ("full_attention",),
                    rope_theta=1e6)
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


def tiny_model(family: str = "llama", seed: int = 0, **overrides: object) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(tiny_config(family, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() > 1 else 0.1)
    return model.eval()
