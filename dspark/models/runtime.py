"""Machine-dependent defaults and the one call that readies a loaded target for inference.

- dtype: bf16 where the hardware multiplies it natively (a CUDA GPU with bf16, or an x86 CPU
  with AVX512-BF16 or AMX-BF16), float32 otherwise. On a CPU without those, bf16 matmuls are
  emulated and run several times slower than float32.
- threads: the physical cores (hyper-threads share a core's vector units, and OpenMP
  workers spin-waiting on a busy sibling slow every step down).
- `prepare`: prepack (or int8-quantize) the linears, then optionally attach the compiled step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from dspark.models.compile import compile_step
from dspark.models.linear import prepack, quantize_int8
from dspark.models.transformer import CausalLM

PARAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.bfloat16}


def cpu_capabilities() -> Mapping[str, object]:
    return torch.cpu.get_capabilities()


def default_dtype(device: str) -> str:
    """`bfloat16` on bf16-capable GPUs and CPUs (AVX512-BF16 / AMX-BF16), else `float32`."""
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    caps = cpu_capabilities()
    return "bfloat16" if caps.get("avx512_bf16") or caps.get("amx_bf16") else "float32"


def default_threads() -> int:
    """$OMP_NUM_THREADS when set, else the physical cores."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = cpu_capabilities().get("num_physical_cores")
    return int(cores) if isinstance(cores, int) and cores > 0 else max(1, (os.cpu_count() or 2) // 2)


def prepare(model: CausalLM, dtype: str, compile: bool = False) -> None:
    """Lay out (bf16/fp32) or quantize (int8) the linears, then attach the compiled
    decode/verify step when asked. `model` was loaded in float32 for int8."""
    if dtype == "int8":
        quantize_int8(model)
    else:
        prepack(model)
    if compile:
        compile_step(model)
