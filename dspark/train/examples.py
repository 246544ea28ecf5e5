"""Training examples: token ids, a loss mask over the assistant's tokens, and where labels
come from. Two sources, told apart by their records:

- **regenerated** (`dspark data regenerate`: `prompt_ids` + `response_ids`): the target's
  own answers. Labels are the data tokens. The ids are what the target produced, so nothing
  is re-tokenized. The mask ends with the end-of-turn token only when the target really
  ended there (`finish_reason == "stop"`): an answer cut at the length limit is never
  supervised as ending.
- **teacher-forced** (`dspark data prepare` chat records: `messages`): the original ShareGPT
  conversation run through the target as it is (no generation: far cheaper). The text is
  not the target's, so labels are the target's own argmax at each position
  (`target_labels`), and the distillation loss reads the target's distribution there as for
  regenerated data. Later block slots condition on tokens the target would not always have
  written; the A/B in docs/results/drafter-ab.md measures what that costs.

Both templates use the model's default system prompt (none is passed), as every serving
path does. Files are JSONL, optionally gzip-compressed (`data/regenerated/<model>/*.jsonl.gz`
is committed so a fresh machine trains without regenerating).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch

from dspark.errors import UserError
from dspark.paths import cache_dir

EXAMPLES_VERSION = 1  # bump when Example construction changes meaning


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    input_ids: torch.Tensor  # (S,) int64: prompt then answer
    loss_mask: torch.Tensor  # (S,) bool: True on the answer's tokens
    domain: str = ""
    target_labels: bool = False  # labels = the target's argmax, not the data tokens

    def __len__(self) -> int:
        return self.input_ids.numel()


def _lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        yield from f


def example_from_record(rec: dict, eos_ids: frozenset[int], max_len: int) -> Example | None:
    """A regenerated record -> Example (None without at least one anchor and its label).
    A trailing end-of-turn token is kept only for answers that stopped by themselves."""
    prompt, answer = list(rec["prompt_ids"]), list(rec["response_ids"])
    if rec.get("finish_reason") != "stop":
        while answer and answer[-1] in eos_ids:  # cut at the limit: no pretend ending
            answer.pop()
    ids = (prompt + answer)[:max_len]
    mask = ([False] * len(prompt) + [True] * len(answer))[:max_len]
    if sum(mask) < 2 or not prompt:
        return None
    return Example(str(rec["id"]), torch.tensor(ids, dtype=torch.long), torch.tensor(mask), rec.get("domain", ""))


def example_from_messages(tok: ChatTokenizer, rec: dict, max_len: int) -> Example | None:
    """A chat record -> teacher-forced Example: mask = each assistant turn's tokens up to and
    including its end-of-turn token. Turn spans are found by common prefixes of the templated
    prefixes with the full encoding (a BPE merge across a boundary shifts a span by a token at
    most). Conversations longer than max_len are cut; a cut turn has no end-of-turn label."""
    messages = [m for m in rec["messages"] if m.get("role") in ("user", "assistant")]
    ids = list(tok.apply_chat_template(messages, add_generation_prompt=False))
    mask = [False] * len(ids)
    eos = set(tok.eos_token_ids)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = _common_prefix(tok.apply_chat_template(messages[:i], add_generation_prompt=True), ids)
        if start >= max_len:
            break
        stop = _common_prefix(tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False), ids)
        end = next((k + 1 for k in range(start, stop) if ids[k] in eos), stop)
        mask[start:end] = [True] * (end - start)
    ids, mask = ids[:max_len], mask[:max_len]
    if sum(mask) < 2 or mask[0]:
        return None
    return Example(str(rec.get("id", "")), torch.tensor(ids, dtype=torch.long), torch.tensor(mask),
                   rec.get("domain", ""), target_labels=True)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ChatTokenizer(Protocol):
    eos_token_ids: Sequence[int]

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = False) -> list[int]: ...


def load_examples(paths: list[str | Path], tok: ChatTokenizer, max_len: int = 1024,
                  limit: int | None = None) -> list[Example]:
    """Every usable record of the given files (JSONL or JSONL.gz), in file order: regenerated
    records (token ids) or chat records (teacher-forced); at most `limit` per file. Each
    file's examples are memoised under $DSPARK_CACHE/examples (templating 10k multi-turn
    conversations takes minutes), keyed by the file's size, mtime, max_len and the template."""
    out: list[Example] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise UserError(f"no training data at {p} (scripts/regenerate-smollm2.sh or `dspark data prepare`)")
        out += _memoised(p, tok, max_len, limit)
    return out


def _memoised(p: Path, tok: ChatTokenizer, max_len: int, limit: int | None) -> list[Example]:
    st = p.stat()
    template = getattr(tok, "chat_template", "") or ""
    key = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{max_len}|{limit}|{template}|"
                         f"{sorted(tok.eos_token_ids)}|{EXAMPLES_VERSION}".encode()).hexdigest()[:24]
    memo = cache_dir() / "examples" / f"{p.name}-{key}.pt"
    if memo.is_file():
        return [Example(**d) for d in torch.load(memo)]
    examples = _read(p, tok, max_len, limit)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")  # two runs may build the same memo at once
    torch.save([dataclasses.asdict(e) for e in examples], tmp)
    os.replace(tmp, memo)
    return examples


def _read(p: Path, tok: ChatTokenizer, max_len: int, limit: int | None) -> list[Example]:
    out: list[Example] = []
    eos = frozenset(tok.eos_token_ids)
    for lineno, line in enumerate(_lines(p), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "response_ids" in rec:
            ex = example_from_record(rec, eos, max_len)
        elif "messages" in rec:
            ex = example_from_messages(tok, rec, max_len)
        else:
            raise UserError(f"{p}:{lineno}: neither regenerated token ids nor chat messages")
        if ex is not None:
            out.append(ex)
            if limit is not None and len(out) >= limit:
                break
    return out


def token_counts(examples: list[Example], vocab_size: int, answers_only: bool = False) -> torch.Tensor:
    """(V,) occurrences of each id (only the supervised answer tokens with answers_only)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ex in examples:
        ids = ex.input_ids[ex.loss_mask] if answers_only else ex.input_ids
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts
