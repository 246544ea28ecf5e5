"""Options shared by every subcommand that loads a model, and how they are parsed.

`--model`, `--dtype`, `--device`, `--compile`, `--threads`, `--method`, `--block-size`,
`--draft-model`, `--verify-policy` mean the same everywhere (generate, bench, profile, serve ...).
`--dtype auto` (the default) picks bf16 where the machine computes it natively (a GPU, or a
CPU with AVX512-BF16/AMX) and float32 elsewhere; `int8` is weight-only int8 with bf16
activations (a different target; speculation stays exact relative to it). The parsed options
become an `EngineSpec`; building the engine from one lives in the library
(`dspark.engine.build`), where the fleet's workers build theirs too."""

from __future__ import annotations

import argparse

from dspark.engine.build import TARGET_DTYPES
from dspark.models.registry import DEFAULT_MODEL


def add_model_arguments(p: argparse.ArgumentParser, method_default: str | None = None,
                        compile_default: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="registry name or local checkpoint path")
    add_runtime_arguments(g, compile_default)
    g.add_argument("--method", default=method_default,
                   help="ar or a registered proposer: ngram, draft-model, dspark, dflash (default: dspark "
                        "when a shipped drafter exists for the model, else ar)")
    g.add_argument("--block-size", type=int, default=7, help="K: drafts per round")
    g.add_argument("--draft-model", default=None, help="draft model for --method draft-model")
    g.add_argument("--drafter-checkpoint", default=None, help="DSpark/DFlash drafter checkpoint dir")
    g.add_argument("--verify-policy", default="fixed", help="fixed | threshold | confidence")
    g.add_argument("--confidence-threshold", type=float, default=0.5)
    g.add_argument("--no-draft-gate", dest="draft_gate", action="store_false",
                   help="confidence policy: draft every round even when drafting costs more than it returns")
    g.add_argument("--max-batch-size", type=int, default=16)
    g.add_argument("--max-seq-len", type=int, default=2048)


def add_runtime_arguments(g: argparse._ActionsContainer, compile_default: bool = True) -> None:
    """--dtype, --device, --compile/--no-compile, --threads: how the target runs. Compiling
    costs about a minute per process even with warm kernel caches (two on a cold one), so
    one-shot commands default to eager."""
    g.add_argument("--dtype", choices=TARGET_DTYPES, default="auto",
                   help="auto: bfloat16 on a GPU or a CPU with AVX512-BF16/AMX, else float32; "
                        "int8: weight-only int8 (bf16 activations)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=compile_default,
                   help="torch.compile the decode/verify step (inductor with frozen weights on CPU, "
                        "CUDA graphs on GPU); compiled once per model, dtype and token bucket")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: $OMP_NUM_THREADS, else the physical cores)")


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)


def sampling_from_args(args: argparse.Namespace):  # -> SamplingParams
    from dspark.spec.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          seed=args.seed, max_new_tokens=args.max_new_tokens)
