"""Our GGUF reader on small files written here with gguf.GGUFWriter, llama.cpp style.

The writer applies llama.cpp's conventions (llama q/k row permutation, Gemma norms stored as
w + 1, tensor names, Q8_0 / F16 / F32 storage); the reader must undo them exactly, and the
model built from the result must match transformers running the dequantized weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from dspark.models import gguf as gguf_io
from dspark.models.config import ModelConfig
from dspark.models.transformer import CausalLM
from tests.unit.models.helpers import forward_logits

os.environ.setdefault("HF_HUB_OFFLINE", "1")

Q = gguf.GGMLQuantizationType
_TO_GGUF = {v: k for k, v in {**gguf_io._LAYER_NAMES, **gguf_io._GLOBAL_NAMES}.items()}


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # verbatim from llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("shape", [(8, 3), (12,), (24, 5)])
@pytest.mark.parametrize("heads", [1, 2])
def test_unpermute_inverts_llamacpp_permute(shape: tuple[int, ...], heads: int) -> None:
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    np.testing.assert_array_equal(gguf_io._unpermute_rows(_llamacpp_permute(w, heads), heads), w)


def _gguf_name(hf_name: str, family: str) -> str:
    stem, _, kind = hf_name.rpartition(".")
    if not stem.startswith("model.layers."):
        return f"{_TO_GGUF[stem]}.{kind}"
    _, _, layer, *rest = stem.split(".")
    part = ".".join(rest)
    extra = ({"pre_feedforward_layernorm": "ffn_norm", "post_attention_layernorm": "post_attention_norm"}
             if family == "gemma3" else {"post_attention_layernorm": "ffn_norm"})
    names = {**{v: k for k, v in gguf_io._LAYER_NAMES.items()}, **extra}
    return f"blk.{layer}.{names[part]}.{kind}"


def _storage(name: str, w: np.ndarray) -> Q:
    if w.ndim == 1:
        return Q.F32
    return Q.F16 if "attn_v" in name else Q.Q8_0


def _write_gguf(path: Path, family: str, hf_cfg, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Write `state` llama.cpp style; return what a correct reader must give back (HF names)."""
    arch = "llama" if family == "llama" else "gemma3"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(hf_cfg.num_hidden_layers)
    w.add_context_length(hf_cfg.max_position_embeddings)
    w.add_embedding_length(hf_cfg.hidden_size)
    w.add_feed_forward_length(hf_cfg.intermediate_size)
    w.add_head_count(hf_cfg.num_attention_heads)
    w.add_head_count_kv(hf_cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(hf_cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0 if family == "llama" else 1e6)
    w.add_vocab_size(hf_cfg.vocab_size)
    w.add_eos_token_id(1)
    if family == "gemma3":
        w.add_key_length(hf_cfg.head_dim)
        w.add_value_length(hf_cfg.head_dim)
        w.add_sliding_window(hf_cfg.sliding_window)
    expected = {}
    for name, t in state.items():
        if family == "gemma3" and name == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight
        data = t.numpy().astype(np.float32)
        gname = _gguf_name(name, family)
        if family == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = hf_cfg.num_attention_heads if "attn_q" in gname else hf_cfg.num_key_value_heads
            stored = _llamacpp_permute(data, heads)
        elif family == "gemma3" and gname.endswith("norm.weight"):
            stored = data + 1.0
        else:
            stored = data
        qtype = _storage(gname, stored)
        raw = quantize(stored, qtype)
        w.add_tensor(gname, raw, raw_dtype=qtype)
        back = dequantize(raw, qtype).reshape(data.shape).astype(np.float32)
        if family == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            back = gguf_io._unpermute_rows(back, heads)
        expected[name] = back - 1.0 if stored is not data and family == "gemma3" else back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _tiny_hf(family: str):  # noqa: ANN202
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=False)
    else:
        # llama.cpp scales gemma3 attention by head_dim ** -0.5 (query_pre_attn_scalar == head_dim)
        cfg = tf.Gemma3TextConfig(**{**common, "num_hidden_layers": 6}, head_dim=32, sliding_window=4,
                                  query_pre_attn_scalar=32,
                                  rope_theta=1e6)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_reader_undoes_llamacpp_conventions(family: str, tmp_path: Path) -> None:
    hf = _tiny_hf(family)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    path = tmp_path / "tiny.gguf"
    expected = _write_gguf(path, family, hf.config, state)

    config, tensors = gguf_io.load_gguf(path)
    assert config["model_type"] == ("llama" if family == "llama" else "gemma3_text")
    assert config["tie_word_embeddings"] is (family == "gemma3")
    assert set(tensors) == set(expected)
    for name, want in expected.items():
        np.testing.assert_array_equal(tensors[name].numpy(), want, err_msg=name)
        if want.ndim == 2:  # quantization error stays small: the layout really is HF's
            np.testing.assert_allclose(want, state[name].numpy(), atol=0.02)

    # Our model from (config, tensors) equals transformers running the same dequantized weights.
    cfg = ModelConfig.from_hf(config)
    ours = CausalLM(cfg)
    ours.load_state_dict(tensors, strict=False)
    ours.eval()
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()}, strict=False)
    prompt = list(range(3, 15))
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    got = forward_logits(ours, [prompt], cfg.sliding_window)[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_unsupported_architecture(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="falcon"):
        gguf_io.load_gguf(tmp_path / "x.gguf")
