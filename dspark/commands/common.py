"""Options shared by every subcommand that loads a model, and how they are parsed.

`--model`, `--dtype`, `--device`, `--compile`, `--threads`, `--method`, `--block-size`,
`--draft-model`, `--verify-policy` mean the same everywhere (generate, bench, profile, serve ...).
`--dtype auto` (the default) picks bf16 where the machine computes it natively (a GPU, or a
CPU with AVX512-BF16/AMX) and float32 elsewhere; `int8` is weight-only int8 with bf16
activations (a different target; speculation stays exact relative to it). The parsed options
become an `EngineConfig` (dspark/engine/config.py declares each option's default and help
once); building the engine from one lives in the library
(`dspark.engine.build`), where the fleet's workers build theirs too."""

from __future__ import annotations

import argparse
from typing import Any

from dspark.engine.config import TARGET_DTYPES, EngineConfig


def _field(name: str) -> dict[str, Any]:
    """argparse `default` and `help` of an option, from its `EngineConfig` field."""
    info = EngineConfig.model_fields[name]
    return {"default": info.default, "help": info.description}


def add_model_arguments(p: argparse.ArgumentParser, method_default: str | None = None,
                        compile_default: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", **_field("model"))
    add_runtime_arguments(g, compile_default)
    g.add_argument("--method", **_field("method") | {"default": method_default})
    g.add_argument("--block-size", type=int, **_field("block_size"))
    g.add_argument("--draft-model", **_field("draft_model"))
    g.add_argument("--drafter-checkpoint", **_field("drafter_checkpoint"))
    g.add_argument("--verify-policy", **_field("verify_policy"))
    g.add_argument("--confidence-threshold", type=float, **_field("confidence_threshold"))
    g.add_argument("--no-draft-gate", dest="draft_gate", action="store_false", help=_field("draft_gate")["help"])
    g.add_argument("--max-batch-size", type=int, **_field("max_batch_size"))
    g.add_argument("--max-seq-len", type=int, **_field("max_seq_len"))


def add_runtime_arguments(g: argparse._ActionsContainer, compile_default: bool = True) -> None:
    """--dtype, --device, --compile/--no-compile, --threads: how the target runs. Compiling
    costs about a minute per process even with warm kernel caches (two on a cold one), so
    one-shot commands default to eager. The CLI's dtype default is `auto`; the library's
    (`EngineConfig`) is float32, the exactness reference."""
    g.add_argument("--dtype", choices=TARGET_DTYPES, default="auto", help=_field("dtype")["help"])
    g.add_argument("--device", **_field("device"))
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   **_field("compile") | {"default": compile_default})
    g.add_argument("--threads", type=int, **_field("threads"))


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
