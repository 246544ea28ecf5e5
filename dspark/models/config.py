"""Architecture description shared by every model family we run.

One frozen dataclass covers Llama (SmolLM2), Qwen2, Qwen3 and Gemma 3: the families differ
only in a handful of switches (biases, q/k norms, Gemma's sandwich norms and sliding
window), so the flags live here and the module code in `transformer.py` stays single.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # qwen2: bias on q/k/v projections
    qk_norm: bool = False  # qwen3, gemma3: RMSNorm over head_dim on q and k
    hidden_act: str = "silu"  # "silu" | "gelu_tanh"
    # Gemma 3 specifics.
    gemma_norms: bool = False  # (1 + w) RMSNorm scale, sandwich norms, sqrt(d) embed scale
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer "full_attention" | "sliding_attention"
    rope_local_theta: float = 10000.0  # RoPE base of sliding layers
    rope_scaling_factor: float = 1.0  # linear scaling of global-layer positions
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError("layer_types must name one type per layer")

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    @property
    def attn_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return float(base) ** -0.5

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict."""
        if "text_config" in hf:  # multimodal wrappers keep the LM under text_config
            hf = {**hf, **hf["text_config"]}
        mt = hf.get("model_type", "llama")
        family = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",
                  "gemma3": "gemma3"}.get(mt)
        if family is None:
            raise ValueError(f"unsupported model_type {mt!r}")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        rope_theta = hf.get("rope_theta")
        rope_params = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        local_theta = hf.get("rope_local_base_freq", 10000.0)
        if "full_attention" in rope_params:  # transformers 5 per-layer-type rope parameters
            rope_theta = rope_params["full_attention"].get("rope_theta", rope_theta)
            scaling = rope_params["full_attention"]
            local_theta = rope_params.get("sliding_attention", {}).get("rope_theta", local_theta)
        elif rope_params:
            rope_theta = rope_params.get("rope_theta", rope_theta)
            scaling = rope_params
        factor = 1.0
        if scaling.get("rope_type", scaling.get("type")) == "linear":
            factor = float(scaling.get("factor", 1.0))
        elif scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ValueError(f"unsupported rope scaling {scaling}")
        gemma = family == "gemma3"
        layer_types: tuple[str, ...] = tuple(hf.get("layer_types") or ())
        if gemma and not layer_types:
            pattern = hf.get("sliding_window_pattern", 6)
            layer_types = tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                for i in range(hf["num_hidden_layers"]))
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads", heads),
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            attention_bias=hf.get("attention_bias", family == "qwen2"),
            qk_norm=family in ("qwen3", "gemma3"),
            hidden_act="gelu_tanh" if gemma else "silu",
            gemma_norms=gemma,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if gemma else None,
            sliding_window=hf.get("sliding_window") if gemma else None,
            layer_types=layer_types if gemma else (),
            rope_local_theta=float(local_theta),
            rope_scaling_factor=factor,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
        )

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_hf(json.loads(Path(path).read_text()))
