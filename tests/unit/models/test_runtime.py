"""Machine-dependent defaults: dtype by CPU flags / GPU, threads by physical cores."""

from __future__ import annotations

import pytest
import torch

from dspark.models import runtime

AVX2_ONLY = {"avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False, "num_physical_cores": 4}


@pytest.mark.parametrize(("flags", "want"), [
    ({}, "float32"),  # AVX2 only: bf16 would be emulated
    ({"avx512_f": True}, "float32"),  # AVX-512 without its bf16 extension
    ({"avx512_f": True, "avx512_bf16": True}, "bfloat16"),
    ({"amx_bf16": True, "amx_tile": True}, "bfloat16"),
    ({"avx512_bf16": True, "amx_bf16": True}, "bfloat16"),
])
def test_cpu_dtype_follows_bf16_flags(monkeypatch: pytest.MonkeyPatch, flags: dict, want: str) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**AVX2_ONLY, **flags})
    assert runtime.default_dtype("cpu") == want


@pytest.mark.parametrize(("bf16", "want"), [(True, "bfloat16"), (False, "float32")])
def test_gpu_dtype_follows_bf16_support(monkeypatch: pytest.MonkeyPatch, bf16: bool, want: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: AVX2_ONLY)
    assert runtime.default_dtype("cuda") == want
    assert runtime.default_dtype("cuda:1") == want


def test_threads_default_to_physical_cores_unless_omp_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: AVX2_ONLY)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.default_threads() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert runtime.default_threads() == 1


def test_cli_auto_dtype_resolves_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from dspark.commands.common import add_model_arguments
    from dspark.engine.config import EngineConfig

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**AVX2_ONLY, "amx_bf16": True})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    spec = EngineConfig.from_args(p.parse_args(["--device", "cpu"]))
    assert (spec.dtype, spec.compile, spec.threads) == ("bfloat16", True, 4)
    args = ["--device", "cpu", "--dtype", "int8", "--no-compile", "--threads", "2"]
    spec = EngineConfig.from_args(p.parse_args(args))
    assert (spec.dtype, spec.compile, spec.threads) == ("int8", False, 2)
    assert EngineConfig().dtype == "float32" and not EngineConfig().compile  # the library default: the reference
