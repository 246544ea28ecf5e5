from __future__ import annotations

import json
from pathlib import Path

import pytest

from dspark.bench.datasets import Prompt, load_prompts
from dspark.errors import UserError


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_turns_and_messages(tmp_path: Path) -> None:
    turns = write_jsonl(tmp_path / "mt-bench.jsonl", [
        {"turns": ["first", "second"]},
        {"turns": ["q"], "category": "writing", "question_id": 81},
    ])
    msgs = write_jsonl(tmp_path / "chat.jsonl", [{"id": "a", "messages": [
        {"role": "system", "content": "sys"},
        {"role": "assistant", "content": "greeting dropped"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ]}])
    prompts = load_prompts([turns, msgs])
    assert prompts == [
        Prompt("mt-bench-1", "mt-bench", [{"role": "user", "content": "first"}]),
        Prompt("81", "writing", [{"role": "user", "content": "q"}]),
        Prompt("a", "chat", [{"role": "system", "content": "sys"}, {"role": "user", "content": "u1"}]),
    ]
    assert prompts[2].text == "u1"


def test_directory_and_limit(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "b.jsonl", [{"turns": [f"b{i}"]} for i in range(10)])
    write_jsonl(tmp_path / "a.jsonl", [{"turns": [f"a{i}"]} for i in range(3)])
    first = load_prompts([tmp_path], limit_per_file=4)
    assert [p.text for p in first] == ["a0", "a1", "a2", "b0", "b1", "b2", "b3"]
    sampled = load_prompts([tmp_path], limit_per_file=4, seed=7)
    assert sampled == load_prompts([tmp_path], limit_per_file=4, seed=7)
    b_ids = [int(p.id.split("-")[1]) for p in sampled if p.category == "b"]
    assert len(b_ids) == 4 and b_ids == sorted(b_ids)


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"text": "x"}', "neither"),
    ('{"turns": []}', "turns"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "no user message"),
    ('{"messages": [{"role": "user"}]}', "messages\\[0\\]"),
])
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"turns": ["ok"]}\n\n' + line + "\n")
    with pytest.raises(UserError, match=rf"bad.jsonl:3: .*{message}"):
        load_prompts([path])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_prompts([tmp_path / "nope.jsonl"])


def test_shipped_eval_sets_load() -> None:
    from dspark.paths import eval_dir

    prompts = load_prompts([eval_dir()], limit_per_file=2)
    assert {p.category for p in prompts} >= {"gsm8k", "humaneval", "math500", "mbpp", "mt-bench"}
    assert all(p.messages[-1]["role"] == "user" and p.text for p in prompts)
