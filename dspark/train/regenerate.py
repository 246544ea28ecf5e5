"""Regenerate training responses with the target itself.

The drafter must imitate the target, so each conversation's first user turn is answered
again by the target, with the target's recommended sampling (`generation_config.json`:
temperature/top-p/top-k; fallback temperature 0.7, top-p 0.9) and the same system prompt
users get: by default none is passed, so the chat template inserts the model's own default,
exactly as `dspark generate`, `eval-drafter`, `bench` and the fleet do for a bare prompt.

Output lines: {"id", "domain", "messages": [(system,) user, assistant], "prompt_ids",
"response_ids", "finish_reason", "num_tokens"}. The token ids are what the target produced,
so training never re-tokenizes text; `response_ids` ends with the end-of-turn token only
when the answer really ended (`finish_reason == "stop"`), never when it was cut at the
length limit. The output file is appended to as requests finish; a rerun skips ids already
written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dspark.engine.engine import Engine, EngineConfig
from dspark.errors import UserError
from dspark.spec.sampling import SamplingParams

FALLBACK_SAMPLING = {"temperature": 0.7, "top_p": 0.9}


def recommended_sampling(generation_config: dict[str, Any], max_new_tokens: int, seed: int) -> SamplingParams:
    g = generation_config if generation_config.get("do_sample", True) and "temperature" in generation_config \
        else {**generation_config, **FALLBACK_SAMPLING}
    return SamplingParams(temperature=float(g.get("temperature", 0.7)), top_p=float(g.get("top_p", 1.0)),
                          top_k=int(g.get("top_k", 0) or 0), seed=seed, max_new_tokens=max_new_tokens)


def read_conversations(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Records with an `id` and OpenAI `messages` whose first user turn is non-empty."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no such data file: {p}")
    out = []
    with open(p) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            msgs = rec.get("messages") or [{"role": "user", "content": t} for t in rec.get("turns", [])[:1]]
            first = next((m for m in msgs if m.get("role") == "user" and m.get("content")), None)
            if first is None:
                continue
            out.append({"id": str(rec.get("id", f"{p.stem}-{lineno}")), "messages": msgs, "prompt": first,
                        "domain": rec.get("domain", "")})
            if limit is not None and len(out) >= limit:
                break
    return out


def done_ids(path: str | Path) -> set[str]:
    p = Path(path)
    if not p.is_file():
        return set()
    ids = set()
    for line in p.read_text().splitlines():
        try:
            ids.add(json.loads(line)["id"])
        except (ValueError, KeyError):
            continue  # a line cut by an interrupted write; its id is regenerated
    return ids


def regenerate(loaded: Any, records: Iterable[dict[str, Any]], out_path: str | Path,
               max_new_tokens: int = 512, batch: int = 16, max_prompt_tokens: int = 512, seed: int = 0,
               system_prompt: str | None = None, on_done: Callable[[int], None] | None = None,
               on_plan: Callable[[int, int], None] | None = None) -> int:
    """Answer every record not yet in `out_path`; returns how many were written.
    `on_plan(to_answer, too_long)` is called once the prompts are tokenized."""
    tok = loaded.tokenizer
    skip = done_ids(out_path)
    todo, too_long = [], 0
    for i, rec in enumerate(records):
        if rec["id"] in skip:
            continue
        msgs = [{"role": "user", "content": rec["prompt"]["content"]}]
        if system_prompt is not None:
            msgs.insert(0, {"role": "system", "content": system_prompt})
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
        if len(ids) <= max_prompt_tokens:
            params = recommended_sampling(loaded.generation_config, max_new_tokens, seed + i)
            todo.append((rec, msgs, ids, params))
        else:
            too_long += 1
    on_plan and on_plan(len(todo), too_long)
    if not todo:
        return 0
    config = EngineConfig(max_batch_size=batch, max_seq_len=max_prompt_tokens + max_new_tokens + 1)
    engine = Engine(loaded.model, tuple(tok.eos_token_ids), config=config)
    by_seq = {engine.add_request(ids, params): (rec, msgs, ids) for rec, msgs, ids, params in todo}
    written = 0
    with open(out_path, "a") as f:
        while engine.has_work:
            engine.step()
            for seq_id in [s for s in list(engine.finished) if s in by_seq]:
                res = engine.pop_finished(seq_id)
                src, msgs, prompt_ids = by_seq.pop(seq_id)
                text = tok.decode(res.token_ids, skip_special_tokens=True)
                rec = {"id": src["id"], "domain": src.get("domain", ""),
                       "messages": [*msgs, {"role": "assistant", "content": text.strip()}],
                       "prompt_ids": prompt_ids, "response_ids": list(res.token_ids),
                       "finish_reason": str(res.finish_reason), "num_tokens": len(res.token_ids)}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                written += 1
                on_done and on_done(len(res.token_ids))
    return written

