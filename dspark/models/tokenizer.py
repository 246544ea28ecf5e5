"""Tokenizer at run time: `tokenizers` for the vocabulary, jinja2 for the chat template.

A checkpoint folder holds `tokenizer.json` plus `tokenizer_config.json` (special tokens and
`chat_template`; HF folders may keep the template in `chat_template.jinja` instead). The
template is rendered the way transformers renders it (sandboxed jinja2, trim_blocks,
lstrip_blocks, the same helper globals) and the text is then encoded without adding special
tokens, so the ids equal transformers' `apply_chat_template(..., tokenize=True)`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                      "mask_token")


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """Text <-> token ids, chat templating and the ids that end a turn."""

    def __init__(self, backend: tokenizers.Tokenizer, special_tokens: dict[str, str],
                 chat_template: str | None = None, eos_token_ids: Sequence[int] = ()) -> None:
        self.backend = backend
        self.special_tokens = special_tokens  # e.g. {"bos_token": "<bos>", ...}
        self.chat_template = chat_template
        eos = list(eos_token_ids)
        eos_text = special_tokens.get("eos_token")
        if eos_text is not None and (tid := backend.token_to_id(eos_text)) is not None and tid not in eos:
            eos.append(tid)
        self.eos_token_ids: tuple[int, ...] = tuple(eos)

    @classmethod
    def from_dir(cls, path: str | Path, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        path = Path(path)
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        special = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(cfg.get(k))) is not None}
        template = cfg.get("chat_template")
        jinja_file = path / "chat_template.jinja"
        if jinja_file.exists():  # transformers >= 4.43 saves the template beside the config
            template = jinja_file.read_text()
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        return cls(backend, special, template, eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _template(self) -> jinja2.Template:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        return compile_chat_template(self.chat_template)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> str:
        context = {**self.special_tokens, "messages": messages, "tools": None, "documents": None,
                   "add_generation_prompt": add_generation_prompt, **kwargs}
        return self._template.render(**context)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> list[int]:
        # Special tokens come from the template text itself, so none are added on top.
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs))

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: push token ids, get back only text that is final.

    Decoding token by token breaks multi-byte characters split across byte-fallback or
    byte-level tokens, and some decoders change a token's text depending on its left
    neighbour (leading-space handling). So we decode a short window twice: the text of
    ids[prefix:read] (already emitted) and of ids[prefix:]; the difference is the new text,
    held back while it ends in U+FFFD (an incomplete UTF-8 sequence).
    Invariant: concatenating every delta (and `flush()`) equals `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # ids before this index have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Add tokens; return the newly completed text ('' while a character is still open)."""
        self.ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes as U+FFFD)."""
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]
