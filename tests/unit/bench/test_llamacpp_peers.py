"""llama.cpp peers: a clean skip without llama-cpp-python, and, where it is built
(scripts/build-peers.sh), the same greedy tokens as our float32 engine on the same weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dspark.bench.llamacpp_peers import GGUF_TYPES, source_gguf, unavailable_reason
from dspark.cli import main
from dspark.commands.bench import _skipped_peers
from dspark.engine.config import EngineConfig

MODEL = "smollm2-135m-instruct"


def test_missing_package_skips_both_peers_with_the_build_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` fails as when not installed
    assert "scripts/build-peers.sh" in (unavailable_reason() or "")
    skipped = _skipped_peers(["ar", "ngram", "llamacpp-ar", "llamacpp-lookup"], EngineConfig(model=MODEL))
    assert set(skipped) == {"llamacpp-ar", "llamacpp-lookup"}
    assert _skipped_peers(["ar", "ngram"], EngineConfig(model=MODEL)) == {}


def test_gguf_source_of_registry_names_files_and_folders(tmp_path: Path) -> None:
    assert source_gguf(str(tmp_path)) is None  # an HF checkpoint folder: nothing for llama.cpp
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert source_gguf(str(gguf)) == gguf
    assert source_gguf("no-such-model") is None
    assert set(GGUF_TYPES) == {"float32", "bfloat16", "int8"}


@pytest.mark.slow
def test_bench_reports_the_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"turns": ["Say hi."]}) + "\n")
    out = tmp_path / "out"
    assert main(["bench", "--methods", "llamacpp-ar", "--dataset", str(data), "--max-new-tokens", "3",
                 "--dtype", "float32", "--no-compile", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert "llamacpp-ar" not in res and "llamacpp-ar" in res["meta"]["skipped"]
    assert "`llamacpp-ar` skipped" in (out / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(unavailable_reason() is not None, reason="llama-cpp-python is not built (scripts/build-peers.sh)")
def test_llamacpp_greedy_matches_our_float32_engine() -> None:
    import torch

    from dspark.bench.llamacpp_peers import converted_gguf, make_llamacpp_generate
    from dspark.engine.build import build_engine, load_target
    from dspark.spec.sampling import SamplingParams

    torch.set_num_threads(1)
    target = load_target(EngineConfig(model=MODEL))
    messages = [{"role": "user", "content": "Name the planets of the solar system."}]
    prompt = target.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    _, engine, _ = build_engine(EngineConfig(model=MODEL, method="ar", max_batch_size=1), target)
    [ours] = engine.generate([prompt], SamplingParams(max_new_tokens=16))
    gguf = converted_gguf(source_gguf(MODEL), "float32")
    eos = tuple(target.tokenizer.eos_token_ids)
    ar = make_llamacpp_generate("llamacpp-ar", gguf, 16, eos, 7, threads=1, context=512)(prompt)
    lookup = make_llamacpp_generate("llamacpp-lookup", gguf, 16, eos, 7, threads=1, context=512)(prompt)
    assert ar[:8] == ours.token_ids[:8]  # the same weights; float32 sums may differ in order later on
    assert lookup == ar  # llama.cpp's own prompt lookup is lossless too
