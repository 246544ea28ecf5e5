"""Tokenizer: chat templates rendered like transformers, and the streaming detokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dspark.models.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = ["Hello world, héllo wörld!", "naïve café ünïcode — 東京 and 😀 emoji", "def f(x):\n    return x"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE: most non-ASCII characters span several tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("tok")
    tok.save(str(path / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "bos_token": {"__type": "AddedToken", "content": "<|im_start|>"},
              "chat_template": CHATML}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_special_tokens_and_eos(byte_level: Path) -> None:
    tok = Tokenizer.from_dir(byte_level, eos_token_ids=[0])
    assert tok.special_tokens == {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}
    assert tok.eos_token_ids == (0, tok.token_id("<|im_end|>"))


@pytest.mark.parametrize("system", [False, True])
def test_chat_template_matches_transformers(byte_level: Path, system: bool) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "naïve café? 😀"}]
    if system:
        messages.insert(0, {"role": "system", "content": "Be brief."})
    ours = Tokenizer.from_dir(byte_level).apply_chat_template(messages, add_generation_prompt=True)
    ref = AutoTokenizer.from_pretrained(str(byte_level)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours == list(ref)


@pytest.mark.parametrize("text", CORPUS + ["😀😀 東京東京 ü"])
def test_stream_decoder_yields_whole_characters(byte_level: Path, text: str) -> None:
    tok = Tokenizer.from_dir(byte_level)
    ids = tok.encode(text)
    assert len(ids) > len(text.encode()) // 4  # really split into pieces
    stream = tok.stream_decoder()
    deltas = [stream.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.flush() == tok.decode(ids) == text


def test_stream_decoder_flushes_unfinished_character(byte_level: Path) -> None:
    tok = Tokenizer.from_dir(byte_level)
    ids = tok.encode("😀")
    stream = tok.stream_decoder()
    assert stream.push(ids[:-1]) == ""  # three of four UTF-8 bytes: nothing final yet
    assert "\ufffd" in stream.flush()
