"""The engine's one configuration model, declared once.

`EngineOptions` are the knobs that mean the same to every caller (what model, how it runs,
how it speculates); `EngineConfig` adds what one engine process decides for itself (device,
threads, batch size). The CLI builds an `EngineConfig` from its parsed options (defaults and
help come from these fields), `services.config.FleetConfig` inherits `EngineOptions` and
derives one `EngineConfig` per pool, the fleet's workers build their engines from it and
`Engine` reads its limits from it. Unknown keys and wrong types are refused (`extra="forbid"`,
strict), and so is a verification policy that is not registered.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dspark.errors import UserError
from dspark.models.registry import DEFAULT_MODEL

TargetDtype = Literal["auto", "float32", "bfloat16", "int8"]
TARGET_DTYPES: tuple[str, ...] = TargetDtype.__args__  # type: ignore[attr-defined]


class EngineOptions(BaseModel):
    """What the engine runs: shared by `dspark generate/bench/serve ...` and the fleet config."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: str = Field(DEFAULT_MODEL, description="target model: registry name or local checkpoint path")
    dtype: TargetDtype = Field(
        "float32", description="auto: bfloat16 on a GPU or a CPU with AVX512-BF16/AMX, else float32; "
        "float32 is the exactness reference; int8: weight-only int8 (bf16 activations)")
    compile: bool = Field(False, description="torch.compile the decode/verify step (inductor with frozen "
                          "weights on CPU, CUDA graphs on GPU); compiled once per model, dtype and token bucket")
    method: str | None = Field(None, description="ar or a registered proposer: ngram, draft-model, dspark, "
                               "dflash, hybrid (default: dspark when a shipped drafter exists, else ar)")
    block_size: int = Field(7, ge=0, le=64, description="K: drafts per round")
    draft_model: str | None = Field(None, description="draft model for --method draft-model")
    drafter_checkpoint: str | None = Field(None, description="DSpark/DFlash drafter checkpoint dir")
    verify_policy: str = Field("fixed", description="fixed | threshold | confidence: how many drafts of "
                               "each sequence the target verifies")
    confidence_threshold: float = Field(0.5, ge=0.0, le=1.0, description="threshold policy's cut-off")
    draft_gate: bool = Field(True, description="confidence policy: skip drafting while it costs more "
                             "than it returns")
    max_seq_len: int = Field(2048, ge=2, description="prompt + output tokens per sequence")

    @field_validator("verify_policy")
    @classmethod
    def _registered_policy(cls, name: str) -> str:
        from dspark.spec.scheduler import policy_names

        if name not in policy_names():
            raise ValueError(f"unknown verify policy {name!r}; known: {', '.join(policy_names())}")
        return name


class EngineConfig(EngineOptions):
    """One engine: `EngineOptions` plus what its process decides (device, threads, slots)."""

    device: str | None = Field(None, description="cpu | cuda (default: cuda when available)")
    threads: int | None = Field(None, ge=1, description="torch threads (default: $OMP_NUM_THREADS, "
                                "else the physical cores)")
    max_batch_size: int = Field(16, ge=1, description="sequences decoded together (the KV slots)")

    @classmethod
    def of(cls, **values: Any) -> EngineConfig:
        """Validated construction with a one-line `UserError` for bad input."""
        try:
            return cls(**values)
        except ValidationError as e:
            raise UserError(f"invalid engine config: {_first_error(e)}") from None

    @classmethod
    def from_args(cls, args: object) -> EngineConfig:
        """From parsed options (an argparse namespace): the attributes named like fields,
        unset ones (None) left at their defaults, `auto` resolved for this machine (dtype;
        threads = physical cores)."""
        from dspark.models.runtime import default_threads

        values = {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}
        if values.get("threads") is None and "threads" in vars(args):
            values["threads"] = default_threads()
        return cls.of(**values).resolved()

    def resolved(self) -> EngineConfig:
        """`dtype="auto"` made concrete for the device this engine runs on."""
        if self.dtype != "auto":
            return self
        from dspark.models.runtime import default_dtype

        return self.model_copy(update={"dtype": default_dtype(self.device or default_device())})

    def replace(self, **changes: Any) -> EngineConfig:
        """A validated copy with `changes` (pydantic's model_copy does not validate)."""
        return type(self).of(**{**self.model_dump(), **changes})


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    return f"{where}: {err['msg']}"


__all__ = ["TARGET_DTYPES", "EngineConfig", "EngineOptions", "TargetDtype", "default_device"]
