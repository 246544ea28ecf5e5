"""Options shared by every subcommand that loads a model, and how they become an engine.

`--model`, `--dtype`, `--device`, `--method`, `--block-size`, `--draft-model`,
`--verify-policy` mean the same everywhere (generate, bench, eval-drafter, serve ...)."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from dspark.errors import UserError
from dspark.models.registry import DEFAULT_MODEL

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_arguments(p: argparse.ArgumentParser, method_default: str | None = None) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="registry name or local checkpoint path")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
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
    dtype: str = "float32"
    device: str | None = None
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
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


def resolve_method(spec: EngineSpec) -> str:
    if spec.method:
        return spec.method
    from dspark.drafter.checkpoint import default_checkpoint

    return "dspark" if (default_checkpoint(spec.model, "dspark") / "config.json").is_file() else "ar"


def load_target(spec: EngineSpec):  # -> LoadedModel
    from dspark.models.loader import load_model

    if spec.dtype not in DTYPES:
        raise UserError(f"unknown dtype {spec.dtype!r}; use one of {', '.join(DTYPES)}")
    return load_model(spec.model, dtype=DTYPES[spec.dtype], device=spec.device or default_device())


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
            max_seq_len=spec.max_seq_len, dtype=DTYPES[spec.dtype],
            device=spec.device or default_device())
    except KeyError as e:
        raise UserError(str(e.args[0])) from None


def make_policy(spec: EngineSpec, target):  # -> (VerifyPolicy | None, StepCostProfile | None)
    """The verification policy and, for `confidence`, the target's measured SPS(B) table
    (profiled once per model, dtype and machine, then cached)."""
    from dspark.spec.scheduler import create_policy, policy_names

    if spec.verify_policy == "fixed":
        return None, None
    if spec.verify_policy not in policy_names():
        raise UserError(f"unknown verify policy {spec.verify_policy!r}; known: {', '.join(policy_names())}")
    if spec.verify_policy == "threshold":
        return create_policy("threshold", threshold=spec.confidence_threshold), None
    from dspark.engine.profile import load_or_profile

    return create_policy("confidence"), load_or_profile(target, spec.dtype, spec.max_batch_size, spec.block_size)
