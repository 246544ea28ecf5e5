from __future__ import annotations

import gzip
import json

import pytest
import torch

from dspark.errors import UserError
from dspark.train.examples import example_from_messages, example_from_record, load_examples, token_counts
from tests.unit.train.fake_chat import END, FakeChatTokenizer


def _record(answer: list[int], finish: str, rid: str = "r") -> dict:
    return {"id": rid, "domain": "code", "prompt_ids": [90, 85, 92, 5, 6, 91, 92, 90, 86, 92],
            "response_ids": answer, "finish_reason": finish}


def test_stopped_answers_are_supervised_through_their_end_of_turn() -> None:
    ex = example_from_record(_record([11, 12, 13, END], "stop"), frozenset({END}), 64)
    assert ex.input_ids.tolist()[-4:] == [11, 12, 13, END]
    assert ex.loss_mask.tolist() == [False] * 10 + [True] * 4
    assert not ex.target_labels and ex.domain == "code"


def test_truncated_answers_carry_no_end_of_turn_label() -> None:
    cut = example_from_record(_record([11, 12, 13, END], "length"), frozenset({END}), 64)
    assert END not in cut.input_ids[cut.loss_mask].tolist()
    assert cut.input_ids.tolist()[-3:] == [11, 12, 13] and cut.loss_mask.sum() == 3
    short = example_from_record(_record([11, 12, 13], "stop"), frozenset({END}), 12)  # cut by max_len
    assert short.input_ids[short.loss_mask].tolist() == [11, 12]
    assert example_from_record(_record([11], "stop"), frozenset({END}), 64) is None  # no anchor with a label


def test_teacher_forced_chat_masks_each_assistant_turn_and_takes_target_labels() -> None:
    tok = FakeChatTokenizer()
    msgs = [{"role": "user", "content": "1 2"}, {"role": "assistant", "content": "3 4 5"},
            {"role": "user", "content": "6"}, {"role": "assistant", "content": "7 8"}]
    ex = example_from_messages(tok, {"id": "c", "messages": msgs}, 64)
    assert ex.target_labels
    assert ex.input_ids[ex.loss_mask].tolist() == [3, 4, 5, END, 7, 8, END]
    assert ex.input_ids.tolist()[-3:] == [8, END, 92]  # the template's newline closes the turn
    cut = example_from_messages(tok, {"id": "c", "messages": msgs}, len(ex) - 3)  # inside the last turn
    assert cut.input_ids[cut.loss_mask].tolist() == [3, 4, 5, END, 7]  # no end-of-turn label at the cut


def test_load_examples_reads_gzip_and_chat_files_and_memoises(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))
    regen = tmp_path / "part01.jsonl.gz"
    with gzip.open(regen, "wt") as f:
        for i in range(3):
            f.write(json.dumps(_record([11 + i, 12, END], "stop", f"r{i}")) + "\n")
    chat = tmp_path / "train.jsonl"
    chat.write_text(json.dumps({"id": "c0", "messages": [{"role": "user", "content": "1"},
                                                         {"role": "assistant", "content": "2 3"}]}) + "\n")
    tok = FakeChatTokenizer()
    first = load_examples([regen, chat], tok, 64)
    assert [e.id for e in first] == ["r0", "r1", "r2", "c0"]
    assert [e.target_labels for e in first] == [False, False, False, True]
    assert len(list((tmp_path / "cache" / "examples").glob("*.pt"))) == 2
    again = load_examples([regen, chat], tok, 64)
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
               for a, b in zip(first, again, strict=True))
    assert token_counts(first, 96, answers_only=True)[END] == 4
    with pytest.raises(UserError, match="no training data"):
        load_examples([tmp_path / "missing.jsonl"], tok, 64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x"}) + "\n")
    with pytest.raises(UserError, match="neither"):
        load_examples([bad], tok, 64)
