"""Read a GGUF checkpoint into a Hugging Face-named state dict and an HF-style config dict.

llama.cpp's converter renames every tensor, and for two families also changes the numbers:

* llama: `attn_q` / `attn_k` rows are permuted per head (interleaved RoPE pairs instead of
  HF's rotate-half halves); `_unpermute_rows` undoes it.
* gemma3: every RMSNorm weight is stored as `w + 1` (llama.cpp multiplies by the weight,
  HF by `1 + w`); we subtract 1 so `RMSNorm(gemma=True)` sees HF's parameter.

Quantized tensors are dequantized with `gguf.quants.dequantize` to float32. A file without
`output.weight` ties the LM head to the embedding.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

# GGUF architecture -> HF model_type, for the families `ModelConfig` supports.
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}

# `<arch>.<key>` metadata -> HF config key (the same for every supported family).
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}

_TOKEN_ID_KEYS = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "padding"}

# Per-layer tensor names: GGUF suffix -> HF suffix. `ffn_norm` is the pre-MLP norm, which HF
# calls post_attention_layernorm in Llama/Qwen but pre_feedforward_layernorm in Gemma 3.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GEMMA_LAYER_NAMES = {"ffn_norm": "pre_feedforward_layernorm",
                      "post_attention_norm": "post_attention_layernorm"}
_PLAIN_LAYER_NAMES = {"ffn_norm": "post_attention_layernorm"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path: str | Path) -> GGUFReader:
    return GGUFReader(str(path))  # memory-maps the file; nothing is read until used


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def architecture(reader: GGUFReader) -> str:
    arch = field_value(reader, "general.architecture")
    if arch not in MODEL_TYPES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (known: {', '.join(MODEL_TYPES)})")
    return arch


def hf_config(reader: GGUFReader) -> dict[str, Any]:
    """HF `config.json` contents for this file (what transformers' GGUF loader would build)."""
    arch = architecture(reader)
    cfg: dict[str, Any] = {"model_type": MODEL_TYPES[arch]}
    for key, hf_key in _CONFIG_KEYS.items():
        value = field_value(reader, f"{arch}.{key}")
        if value is not None:
            cfg[hf_key] = value
    for hf_key, gguf_key in _TOKEN_ID_KEYS.items():
        value = field_value(reader, f"tokenizer.ggml.{gguf_key}_token_id")
        if value is not None:
            cfg[hf_key] = int(value)
    if "vocab_size" not in cfg:  # older files: the embedding's row count is the vocabulary
        embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
        cfg["vocab_size"] = int(embd.shape[-1])
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    names = {t.name for t in reader.tensors}
    cfg["tie_word_embeddings"] = "output.weight" not in names
    if arch == "qwen2":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    if arch == "gemma3":
        cfg.update(_gemma3_defaults(cfg))
    return cfg


def _gemma3_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3 settings llama.cpp does not store (its architecture hard-codes them)."""
    pattern = 6  # five sliding-window layers, then one global layer
    return {
        "query_pre_attn_scalar": cfg["head_dim"],
        "rope_local_base_freq": 10000.0,
        "sliding_window_pattern": pattern,
        "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                        for i in range(cfg["num_hidden_layers"])],
        "hidden_activation": "gelu_pytorch_tanh",
    }


def chat_template(reader: GGUFReader) -> str | None:
    return field_value(reader, "tokenizer.chat_template")


def hf_name(gguf_name: str, arch: str) -> str | None:
    """HF parameter name of a GGUF tensor, or None for tensors we do not use (rope_freqs)."""
    m = _LAYER_RE.match(gguf_name)
    if m is None:
        stem, _, kind = gguf_name.rpartition(".")
        base = _GLOBAL_NAMES.get(stem)
        return None if base is None else f"{base}.{kind}"
    layer, part, kind = m.groups()
    names = {**_LAYER_NAMES, **(_GEMMA_LAYER_NAMES if arch == "gemma3" else _PLAIN_LAYER_NAMES)}
    return None if part not in names else f"model.layers.{layer}.{names[part]}.{kind}"


def _unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` of q/k rows.

    HF row `i * hd/2 + j` of a head (half i, pair j) is stored by llama.cpp at `j * 2 + i`
    (the (2, hd/2) view transposed); viewing as (hd/2, 2) and transposing back undoes it.
    """
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_tensors(reader: GGUFReader, config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, float32 tensor in HF layout) for every tensor the model uses."""
    arch = architecture(reader)
    for t in reader.tensors:
        name = hf_name(t.name, arch)
        if name is None:
            continue
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGML lists dims fastest-first
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config["num_attention_heads" if ".attn_q." in t.name else "num_key_value_heads"]
            w = _unpermute_rows(w, heads)
        if arch == "gemma3" and t.name.endswith("norm.weight"):
            w = w - 1.0
        if not w.flags.writeable:  # F32 tensors are views of the read-only memory map
            w = w.copy()
        yield name, torch.from_numpy(np.ascontiguousarray(w))


def load_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(HF config dict, HF-named float32 state dict) of a GGUF file."""
    reader = open_gguf(path)
    config = hf_config(reader)
    return config, dict(iter_tensors(reader, config))
