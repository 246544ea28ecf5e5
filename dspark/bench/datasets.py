"""Benchmark / evaluation prompt sets (JSONL) for `dspark bench` and `dspark eval-drafter`.

Each line is one JSON object with either
  - `turns`: a list of user turns; the prompt is the first one, or
  - `messages`: OpenAI chat messages; the prompt is every message up to and including the
    first user message, keeping only `system` messages before it.
The category is the line's `category` field, else the file's stem (`gsm8k.jsonl` -> `gsm8k`).
The id is the line's `id` / `question_id` field, else `<stem>-<line number>`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspark.errors import UserError


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    messages: list[dict[str, str]]  # OpenAI schema; ends with the (first) user message

    @property
    def text(self) -> str:
        """Content of the user message this prompt ends with."""
        return self.messages[-1]["content"]


def load_prompts(
    paths: Sequence[str | Path], limit_per_file: int | None = None, seed: int | None = None
) -> list[Prompt]:
    """Load prompts from JSONL files (a directory means its `*.jsonl`, sorted by name).

    `limit_per_file` keeps N prompts per file: the first N lines when `seed` is None, else a
    `random.Random(seed)` sample of N lines kept in file order. Both are deterministic."""
    if limit_per_file is not None and limit_per_file < 0:
        raise UserError(f"limit_per_file must be >= 0, got {limit_per_file}")
    prompts: list[Prompt] = []
    for path in _expand(paths):
        rows = _read_file(path)
        prompts.extend(_subsample(rows, limit_per_file, seed))
    return prompts


def _expand(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise UserError(f"{path}: directory has no *.jsonl files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: prompt file not found")
    return files


def _read_file(path: Path) -> list[Prompt]:
    prompts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                prompts.append(_parse_line(line, path, lineno))
    return prompts


def _subsample(rows: list[Prompt], limit: int | None, seed: int | None) -> list[Prompt]:
    if limit is None or limit >= len(rows):
        return rows
    if seed is None:
        return rows[:limit]
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def _parse_line(line: str, path: Path, lineno: int) -> Prompt:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object")
    if "turns" in obj:
        messages = _messages_from_turns(obj["turns"], where)
    elif "messages" in obj:
        messages = _prompt_from_messages(obj["messages"], where)
    else:
        raise UserError(f"{where}: line has neither 'turns' nor 'messages'")
    category = obj.get("category") or path.stem
    ident = obj.get("id", obj.get("question_id"))
    return Prompt(id=str(ident) if ident is not None else f"{path.stem}-{lineno}",
                  category=str(category), messages=messages)


def _messages_from_turns(turns: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0]:
        raise UserError(f"{where}: 'turns' must be a non-empty list whose first item is a non-empty string")
    return [{"role": "user", "content": turns[0]}]


def _prompt_from_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise UserError(f"{where}: 'messages' must be a list")
    prompt: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        if not (isinstance(msg, dict) and isinstance(msg.get("role"), str)
                and isinstance(msg.get("content"), str)):
            raise UserError(f"{where}: messages[{i}] needs string 'role' and 'content'")
        if msg["role"] == "system":
            prompt.append({"role": "system", "content": msg["content"]})
        elif msg["role"] == "user":
            if not msg["content"]:
                raise UserError(f"{where}: messages[{i}] first user message is empty")
            return [*prompt, {"role": "user", "content": msg["content"]}]
    raise UserError(f"{where}: 'messages' has no user message")
