"""`dspark bench` end to end on the real default model, kept tiny."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dspark.cli import main

pytestmark = pytest.mark.slow
EAGER_FP32 = ("--dtype", "float32", "--no-compile", "--threads", "1")  # the reference: exact, no compile wait


def _dataset(tmp_path: Path) -> Path:
    f = tmp_path / "mini.jsonl"
    rows = [{"turns": ["List three colors."]},
            {"messages": [{"role": "user", "content": "Repeat: one two three one two three"}], "category": "echo"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


def test_bench_writes_results_report_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["bench", "--methods", "ngram,hf-ar", "--dataset", str(_dataset(tmp_path)), *EAGER_FP32,
                 "--max-new-tokens", "12", "--block-size", "4", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"ar", "ngram", "hf-ar", "meta"}
    for method in ("ar", "ngram", "hf-ar"):
        assert set(res[method]) >= {"mini", "echo", "overall"}
        o = res[method]["overall"]
        for key in ("prompts", "new_tokens", "wall_s", "tokens_per_s", "speedup_vs_ar", "tokens_per_cpu_s",
                    "speedup_vs_ar_cpu", "mean_accepted_length",
                    "accepted_per_position", "identical_to_ar"):
            assert key in o
        assert o["prompts"] == 2
    assert res["ngram"]["overall"]["identical_to_ar"] == 1.0  # greedy speculation is lossless
    assert res["hf-ar"]["overall"]["identical_to_ar"] >= 0.5  # transformers, same weights, fp32
    assert res["ar"]["overall"]["speedup_vs_ar"] is None
    assert (out / "report.md").read_text().startswith("# dspark bench")
    assert (out / "speedup_per_category.png").stat().st_size > 0
    assert (out / "acceptance_per_position.png").stat().st_size > 0


def test_bench_policies_and_concurrency_layout(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["bench", "--methods", "ngram", "--dataset", str(_dataset(tmp_path)), *EAGER_FP32,
                 "--max-new-tokens", "4", "--limit", "1", "--verify-policy", "fixed,threshold", "--concurrency", "1,2",
                 "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["by_concurrency"]) == {"1", "2"}
    level = res["by_concurrency"]["2"]
    assert {"ar", "ngram:fixed", "ngram:threshold"} <= set(level)
    assert level["ngram:threshold"]["overall"]["identical_to_ar"] == 1.0
    assert (out / "throughput_vs_per_user.png").exists()
