"""How an `EngineConfig` (dspark/engine/config.py: the options every model-loading command
and every fleet worker shares) becomes a loaded target, a proposer, a verification policy
and an `Engine`.

The library floor for these helpers: the CLI (`dspark.commands.common` parses the options),
the fleet's workers and `services.config` all build from here, so `services` never imports
`dspark.commands`. Proposers are registered from this floor (`register_builtin_proposers`):
`dspark.spec` keeps only the registry and never names the drafter package above it.
"""

from __future__ import annotations

import torch

from dspark.engine.config import TARGET_DTYPES, EngineConfig, default_device
from dspark.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # parameter dtypes


def register_builtin_proposers() -> None:
    """Import every shipped proposer module; importing runs its `@register_proposer`."""
    import dspark.drafter.hybrid  # noqa: F401
    import dspark.drafter.proposer  # noqa: F401
    import dspark.spec.draft_model  # noqa: F401
    import dspark.spec.ngram  # noqa: F401


def resolve_method(spec: EngineConfig) -> str:
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


def load_target(spec: EngineConfig):  # -> LoadedModel
    """Load the target, lay its weights out for this machine (or quantize them), and attach
    the compiled step when `spec.compile`."""
    from dspark.models.loader import load_model
    from dspark.models.runtime import prepare

    spec = spec.resolved()
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


def build_engine(spec: EngineConfig, target=None):  # -> tuple[LoadedModel, Engine, str]
    """Load the target (unless given), the proposer for `spec.method`, and the engine."""
    from dspark.engine.engine import Engine

    spec = spec.resolved()
    target = target or load_target(spec)
    method = resolve_method(spec)
    proposer = make_proposer(spec, target, method)
    policy, sps = make_policy(spec, target)
    engine = Engine(target.model, target.tokenizer.eos_token_ids, proposer, spec, policy, sps,
                    gate=make_gate(spec, sps, method), tokenizer=target.tokenizer)
    return target, engine, method


def make_gate(spec: EngineConfig, sps, method: str):  # -> DraftGate | None
    """The draft gate, for the confidence policy of a speculative method only. The embedded
    engine and a fleet target worker both build it here, so they gate alike."""
    if spec.verify_policy != "confidence" or not spec.draft_gate or sps is None or method == "ar":
        return None
    from dspark.spec.gate import DraftGate

    return DraftGate(sps)


def make_proposer(spec: EngineConfig, target, method: str):  # -> Proposer | None
    """The proposer for `method` ("ar": none). Fleet drafter workers build theirs here too."""
    from dspark.spec.proposer import create_proposer

    register_builtin_proposers()
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


def make_policy(spec: EngineConfig, target):  # -> (VerifyPolicy | None, StepCostProfile | None)
    """The verification policy and, for `confidence`, the target's measured SPS(B) table
    (profiled once per model, dtype, compile setting, thread count and machine, then cached)."""
    from dspark.spec.scheduler import create_policy

    if spec.verify_policy == "fixed":  # EngineConfig refused names that are not registered
        return None, None
    if spec.verify_policy == "threshold":
        return create_policy("threshold", threshold=spec.confidence_threshold), None
    from dspark.engine.profile import load_or_profile

    return create_policy("confidence"), load_or_profile(target, spec.dtype, spec.max_batch_size, spec.block_size)
