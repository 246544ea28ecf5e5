from __future__ import annotations

import json

import pytest
import torch

from dspark.errors import UserError
from dspark.train.target_cache import TargetCache, build_target_cache, tokenize_chat
from tests.unit.drafter.helpers import target_features, tiny_target
from tests.unit.train.fake_chat import END, FakeChatTokenizer, conversations


def test_loss_mask_covers_assistant_content_and_end_of_turn() -> None:
    msgs = [{"role": "user", "content": "5 6"}, {"role": "assistant", "content": "7 8"},
            {"role": "user", "content": "9"}, {"role": "assistant", "content": "10"}]
    ids, mask = tokenize_chat(FakeChatTokenizer(), msgs, max_len=100)
    kept = [t for t, m in zip(ids, mask, strict=True) if m]
    assert kept == [7, 8, END, 10, END]  # trailing newline after END is not supervised
    assert len(tokenize_chat(FakeChatTokenizer(), msgs, max_len=9)[1]) == 9


def test_cache_round_trip_and_resume(tmp_path) -> None:
    target = tiny_target()
    tok = FakeChatTokenizer()
    convs = conversations(5)
    seen = []
    m = build_target_cache(target, tok, "tiny", convs, tmp_path, [1, 3], max_len=64, shard_size=2,
                           on_sequence=seen.append)
    assert m["complete"] and m["num_sequences"] == 5 and len(m["shards"]) == 3
    cache = TargetCache(tmp_path, "tiny")
    item = cache[3]
    ids, _ = tokenize_chat(tok, convs[3], 64)
    assert item["input_ids"].tolist() == ids
    feats, final = target_features(target, torch.tensor(ids), [1, 3])
    torch.testing.assert_close(item["taps"].float(), feats, atol=0.05, rtol=0.02)
    torch.testing.assert_close(item["final"].float(), final, atol=0.05, rtol=0.02)
    # resume: a rerun with one shard missing from the manifest rebuilds only that shard
    man = json.loads((tmp_path / "manifest.json").read_text())
    man["shards"] = man["shards"][:2]
    man["complete"] = False
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(UserError):
        TargetCache(tmp_path)
    built = []
    build_target_cache(target, tok, "tiny", convs, tmp_path, [1, 3], max_len=64, shard_size=2,
                       on_sequence=built.append)
    assert sum(1 for n in built if n) == 1  # only the last conversation was run again
    assert len(TargetCache(tmp_path)) == 5
    with pytest.raises(UserError):
        TargetCache(tmp_path, "another-model")
