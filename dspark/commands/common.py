"""Options shared by every subcommand that loads a model, and how they become an engine.

`--model`, `--dtype`, `--device`, `--compile`, `--threads`, `--method`, `--block-size`,
`--draft-model`, `--verify-policy` mean the same everywhere (generate, bench, profile, serve ...).
`--dtype auto` (the default) picks bf16 where the machine computes it natively (a GPU, or a
CPU with AVX512-BF16/AMX) and float32 elsewhere; `int8` is weight-only int8 with bf16
activations (a different target; speculation stays exact relative to it)."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from dspark.errors import UserError
from dspark.models.registry import DEFAULT_MODEL

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # parameter dtypes
TARGET_DTYPES = ("auto", "float32", "bfloat16", "int8")  # --dtype of commands that build an engine


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_arguments(p: argparse.ArgumentParser, method_default: str | None = None) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="registry name or local checkpoint path")
    add_runtime_arguments(g)
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


def add_runtime_arguments(g: argparse._ActionsContainer) -> None:
    """--dtype, --device, --compile/--no-compile, --threads: how the target runs."""
    g.add_argument("--dtype", choices=TARGET_DTYPES, default="auto",
                   help="auto: bfloat16 on a GPU or a CPU with AVX512-BF16/AMX, else float32; "
                        "int8: weight-only int8 (bf16 activations)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
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


@dataclasses.dataclass
class EngineSpec:
    """Everything needed to build one engine; picklable, so Ray workers can rebuild it."""

    model: str = DEFAULT_MODEL
    dtype: str = "float32"  # float32 | bfloat16 | int8 (the CLI resolves `auto` in from_args)
    device: str | None = None
    compile: bool = False  # attach the compiled decode/verify step (dspark/models/compile.py)
    threads: int | None = None  # torch threads set by load_target; None leaves them alone
    method: str | None = None
    block_size: int = 7
    draft_model: str | None = None
    drafter_checkpoint: str | None = None
    verify_policy: str = "fixed"
    confidence_threshold: float = 0.5
    draft_gate: bool = True  # confidence policy only: skip drafting while it does not pay (spec/gate.py)
    max_batch_size: int = 16
    max_seq_len: int = 2048

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineSpec:
        from dspark.models.runtime import default_dtype, default_threads

        names = {f.name for f in dataclasses.fields(cls)}
        spec = cls(**{k: v for k, v in vars(args).items() if k in names})
        if spec.dtype == "auto":
            spec.dtype = default_dtype(spec.device or default_device())
        if spec.threads is None and "threads" in vars(args):  # the CLI: physical cores by default
            spec.threads = default_threads()
        return spec


def resolve_method(spec: EngineSpec) -> str:
    if spec.method:
        return spec.method
    from dspark.drafter.checkpoint import default_checkpoint

    return "dspark" if (default_checkpoint(spec.model, "dspark") / "config.json").is_file() else "ar"


def param_dtype(dtype: str) -> torch.dtype:
    """Parameter dtype of a target dtype name (int8 targets keep bf16 activations)."""
    from dspark.models.runtime import PARAM_DTYPES

    if dtype not in PARAM_DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(TARGET_DTYPES)}")
    return PARAM_DTYPES[dtype]


def load_target(spec: EngineSpec):  # -> LoadedModel
    """Load the target, lay its weights out for this machine (or quantize them), and attach
    the compiled step when `spec.compile`."""
    from dspark.models.loader import load_model
    from dspark.models.runtime import prepare

    param_dtype(spec.dtype)  # validates
    device = spec.device or default_device()
    if spec.dtype == "int8" and device != "cpu":
        raise UserError("--dtype int8 uses torch's CPU int8 kernels; use bfloat16 on a GPU")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.compile:
        from dspark.models.compile import use_inductor_cache

        use_inductor_cache()  # before loading: inductor may fix its cache directory on first use
    load_dtype = torch.float32 if spec.dtype == "int8" else DTYPES[spec.dtype]  # quantize from fp32
    target = load_model(spec.model, dtype=load_dtype, device=device)
    prepare(target.model, spec.dtype, spec.compile)
    return target


def build_engine(spec: EngineSpec, target=None):  # -> tuple[LoadedModel, Engine, str]
    """Load the target (unless given), the proposer for `spec.method`, and the engine."""
    from dspark.engine.engine import Engine, EngineConfig

    if spec.block_size < 0 or spec.block_size > 64:
        raise UserError(f"block-size must be in [0, 64], got {spec.block_size}")
    target = target or load_target(spec)
    method = resolve_method(spec)
    proposer = make_proposer(spec, target, method)
    config = EngineConfig(max_batch_size=spec.max_batch_size, max_seq_len=spec.max_seq_len,
                          block_size=spec.block_size, verify_policy=spec.verify_policy,
                          confidence_threshold=spec.confidence_threshold)
    policy, sps = make_policy(spec, target)
    gate = None
    if spec.verify_policy == "confidence" and spec.draft_gate and sps is not None:
        from dspark.spec.gate import DraftGate

        gate = DraftGate(sps)
    engine = Engine(target.model, target.tokenizer.eos_token_ids, proposer, config, policy, sps, gate=gate,
                    tokenizer=target.tokenizer)
    return target, engine, method


def make_proposer(spec: EngineSpec, target, method: str):  # -> Proposer | None
    """The proposer for `method` ("ar": none). Fleet drafter workers build theirs here too."""
    from dspark.spec.proposer import create_proposer

    if method == "ar":
        return None
    try:
        return create_proposer(
            method, target=target, block_size=spec.block_size, draft_model=spec.draft_model,
            checkpoint=spec.drafter_checkpoint, max_batch_size=spec.max_batch_size,
            max_seq_len=spec.max_seq_len, dtype=param_dtype(spec.dtype),
            device=spec.device or default_device())
    except KeyError as e:
        raise UserError(str(e.args[0])) from None


def make_policy(spec: EngineSpec, target):  # -> (VerifyPolicy | None, StepCostProfile | None)
    """The verification policy and, for `confidence`, the target's measured SPS(B) table
    (profiled once per model, dtype, compile setting, thread count and machine, then cached)."""
    from dspark.spec.scheduler import create_policy, policy_names

    if spec.verify_policy == "fixed":
        return None, None
    if spec.verify_policy not in policy_names():
        raise UserError(f"unknown verify policy {spec.verify_policy!r}; known: {', '.join(policy_names())}")
    if spec.verify_policy == "threshold":
        return create_policy("threshold", threshold=spec.confidence_threshold), None
    from dspark.engine.profile import load_or_profile

    return create_policy("confidence"), load_or_profile(target, spec.dtype, spec.max_batch_size, spec.block_size)
