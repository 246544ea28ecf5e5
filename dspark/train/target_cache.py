"""Offline target cache: what the target computes on each training conversation.

Per token we keep the input id, the loss mask (assistant content incl. its end-of-turn
token), the m tapped layer outputs and the final-normed hidden state (the LM-head input;
target logits are recomputed from it, never stored). Shards are safetensors files

    input_ids (T,) int32 | loss_mask (T,) uint8 | taps (T, m, d) bf16 | final (T, d) bf16
    offsets (n + 1,) int64      sequence i is rows [offsets[i], offsets[i + 1])

and `manifest.json` lists the model, taps, counts and each shard's sha256. Shard i holds
conversations [i * shard_size, (i + 1) * shard_size); a shard already in the manifest is
skipped on a rerun, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dspark.errors import UserError
from dspark.fileio import sha256_file, write_atomic
from dspark.models.transformer import CausalLM, ForwardBatch

MANIFEST = "manifest.json"
CACHE_VERSION = 1
Message = dict[str, str]


class ChatTokenizer(Protocol):
    eos_token_ids: Sequence[int]

    def apply_chat_template(self, messages: list[Message],
                            add_generation_prompt: bool = False) -> list[int]: ...


def tokenize_chat(tok: ChatTokenizer, messages: list[Message], max_len: int) -> tuple[list[int], list[int]]:
    """Template a conversation; mask = 1 on each assistant turn's content up to and including
    its first end-of-turn token. Spans are located by common prefixes with the full encoding,
    so a template whose BPE merges across a turn boundary shifts a span by a token at most."""
    ids = list(tok.apply_chat_template(messages, add_generation_prompt=False))
    mask = [0] * len(ids)
    eos = set(tok.eos_token_ids)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = _common_prefix(tok.apply_chat_template(messages[:i], add_generation_prompt=True), ids)
        stop = _common_prefix(tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False), ids)
        end = next((k + 1 for k in range(start, stop) if ids[k] in eos), stop)
        mask[start:end] = [1] * (end - start)
    return ids[:max_len], mask[:max_len]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@torch.inference_mode()
def capture(model: CausalLM, ids: list[int], taps: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One target pass: (tapped outputs (S, m, d), final-normed hidden (S, d))."""
    S = len(ids)
    device = model.lm_head.weight.device
    cache = model.new_cache(1, S)
    x = torch.tensor([ids], device=device)
    final, tapped = model(x, ForwardBatch.build([0], [0], [S], device), cache, tuple(taps))
    return torch.stack(tapped, dim=2)[0], final[0]


def file_fingerprint(path: str | Path) -> str:
    """Name, size and sha256 of a data file: a cache is only resumed from the same input."""
    p = Path(path)
    return f"{p.name}:{p.stat().st_size}:{sha256_file(p)[:16]}"


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def build_target_cache(model: CausalLM, tok: ChatTokenizer, model_name: str,
                       conversations: list[list[Message]], out_dir: str | Path, taps: Sequence[int],
                       max_len: int = 1024, shard_size: int = 256, source: str = "",
                       on_sequence: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write (or finish writing) the cache; returns the manifest. `on_sequence(n_tokens)` is
    called per conversation processed (progress)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    request = {"version": CACHE_VERSION, "model": model_name, "taps": list(taps), "max_len": max_len,
               "shard_size": shard_size, "hidden_size": model.cfg.hidden_size, "source": source,
               "num_conversations": len(conversations)}
    manifest = {**request, "complete": False, "shards": []}
    if (out / MANIFEST).is_file():
        old = json.loads((out / MANIFEST).read_text())
        if {k: old.get(k) for k in request} != request:
            raise UserError(f"{out} holds a cache built with different settings; use another --out")
        manifest = old
    done = {s["index"] for s in manifest["shards"]}
    for index, lo in enumerate(range(0, len(conversations), shard_size)):
        chunk = conversations[lo:lo + shard_size]
        if index in done:
            for _ in chunk:
                on_sequence and on_sequence(0)
            continue
        manifest["shards"].append(_write_shard(model, tok, chunk, out, index, taps, max_len, on_sequence))
        _write_json(out / MANIFEST, manifest)
    manifest["shards"].sort(key=lambda s: s["index"])
    manifest["num_sequences"] = sum(s["num_sequences"] for s in manifest["shards"])
    manifest["num_tokens"] = sum(s["num_tokens"] for s in manifest["shards"])
    manifest["complete"] = True
    _write_json(out / MANIFEST, manifest)
    return manifest


def _write_shard(model: CausalLM, tok: ChatTokenizer, chunk: list[list[Message]], out: Path, index: int,
                 taps: Sequence[int], max_len: int,
                 on_sequence: Callable[[int], None] | None) -> dict[str, Any]:
    ids_all, mask_all, taps_all, final_all, offsets = [], [], [], [], [0]
    for messages in chunk:
        ids, mask = tokenize_chat(tok, messages, max_len)
        if sum(mask) >= 2:  # at least one anchor with a label
            tapped, final = capture(model, ids, taps)
            ids_all.append(torch.tensor(ids, dtype=torch.int32))
            mask_all.append(torch.tensor(mask, dtype=torch.uint8))
            taps_all.append(tapped.to(torch.bfloat16).cpu())
            final_all.append(final.to(torch.bfloat16).cpu())
            offsets.append(offsets[-1] + len(ids))
        on_sequence and on_sequence(len(ids))
    d, m = model.cfg.hidden_size, len(taps)
    tensors = {
        "input_ids": torch.cat(ids_all) if ids_all else torch.zeros(0, dtype=torch.int32),
        "loss_mask": torch.cat(mask_all) if mask_all else torch.zeros(0, dtype=torch.uint8),
        "taps": torch.cat(taps_all) if taps_all else torch.zeros(0, m, d, dtype=torch.bfloat16),
        "final": torch.cat(final_all) if final_all else torch.zeros(0, d, dtype=torch.bfloat16),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
    }
    name = f"shard-{index:05d}.safetensors"
    tmp = out / (name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, out / name)
    return {"index": index, "file": name, "sha256": sha256_file(out / name),
            "num_sequences": len(offsets) - 1, "num_tokens": offsets[-1]}


class TargetCache:
    """Random access to a finished cache: `cache[i]` -> dict of one sequence's tensors."""

    def __init__(self, directory: str | Path, model_name: str | None = None, verify: bool = True) -> None:
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise UserError(f"no target cache at {self.dir} (build one with `dspark data cache`)")
        self.manifest = json.loads(path.read_text())
        if not self.manifest.get("complete"):
            raise UserError(f"target cache {self.dir} is incomplete; rerun `dspark data cache` to finish it")
        if model_name is not None and self.manifest["model"] != model_name:
            raise UserError(f"target cache {self.dir} was built for {self.manifest['model']!r}, "
                            f"not {model_name!r}")
        self.taps: list[int] = list(self.manifest["taps"])
        self._index: list[tuple[int, int, int]] = []  # (shard, start, end)
        self._files = []
        for si, shard in enumerate(self.manifest["shards"]):
            file = self.dir / shard["file"]
            if verify and (not file.is_file() or sha256_file(file) != shard["sha256"]):
                raise UserError(f"target cache shard {file} is missing or corrupt")
            self._files.append(safe_open(str(file), "pt"))
            offsets = self._files[-1].get_tensor("offsets").tolist()
            self._index += [(si, a, b) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        si, a, b = self._index[i]
        f = self._files[si]
        return {name: f.get_slice(name)[a:b] for name in ("input_ids", "loss_mask", "taps", "final")}

    def token_counts(self, vocab_size: int, masked_only: bool = False) -> torch.Tensor:
        """(V,) occurrences of each id over the cache (assistant tokens only if masked_only)."""
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for f in self._files:
            ids = f.get_tensor("input_ids").long()
            if masked_only:
                ids = ids[f.get_tensor("loss_mask").bool()]
            counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size]
        return counts


class ConcatTargetCache:
    """Several caches of the same model and taps, indexed as one."""

    def __init__(self, caches: list[TargetCache]) -> None:
        if not caches:
            raise UserError("no target cache given")
        taps = {tuple(c.taps) for c in caches}
        if len(taps) != 1:
            raise UserError(f"target caches were built with different taps: {sorted(taps)}")
        self.caches, self.taps = caches, list(caches[0].taps)
        self.manifest = caches[0].manifest
        self._index = [(ci, i) for ci, c in enumerate(caches) for i in range(len(c))]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ci, j = self._index[i]
        return self.caches[ci][j]

    def token_counts(self, vocab_size: int, masked_only: bool = False) -> torch.Tensor:
        return sum(c.token_counts(vocab_size, masked_only) for c in self.caches)  # type: ignore[return-value]


def open_target_cache(data: str | list[str], model_name: str | None = None) -> TargetCache | ConcatTargetCache:
    if isinstance(data, str):
        return TargetCache(data, model_name)
    return ConcatTargetCache([TargetCache(d, model_name) for d in data])
