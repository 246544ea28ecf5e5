"""`dspark train` configuration (YAML), validated once at the edge."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dspark.errors import UserError
from dspark.paths import cache_dir


class DrafterShape(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_layers: int = Field(1, ge=1, description="drafter decoder layers")
    block_size: int = Field(7, ge=1, description="K")
    markov_rank: int = Field(64, ge=0, description="r (ignored for method dflash: 0)")
    gamma: float = Field(4.0, gt=0, description="position-weight decay")
    draft_vocab_size: int | None = Field(None, ge=2, description="frequency-ranked draft vocabulary")
    direct_path: bool = Field(False, description="add the fused feature of position a - 1 to every slot input")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("smollm2-135m-instruct", description="target model (registry name or path)")
    method: Literal["dspark", "dflash"] = Field(
        "dspark", description="dflash = CE only, no Markov/confidence")
    data: str | list[str] = Field(description="regenerated data: JSONL or JSONL.gz files written by "
                                              "`dspark data regenerate` (token ids), used as one set")
    heldout: int = Field(64, ge=0, description="examples held out of training for the learning curve: the "
                                               "first N of `heldout_data`, else the last N of `data`")
    heldout_data: str | None = Field(None, description="held-out file (e.g. the dev split, regenerated)")
    out: str = Field(description="run directory: log.jsonl, checkpoint/, drafter/")
    export: str | None = Field(None, description="also copy the final drafter checkpoint here")
    init_from: str | None = Field(
        None, description="warm start: the `out` of an earlier run, or a drafter checkpoint directory, with "
                          "the same shape; its last weights, draft vocabulary and MASK id (fresh optimizer "
                          "and schedule)")
    drafter: DrafterShape = Field(default_factory=DrafterShape)
    lr: float = Field(6e-4, gt=0, description="peak learning rate")
    warmup_frac: float = Field(0.04, ge=0, lt=1, description="linear warmup share of the steps")
    decay_frac: float = Field(1.0, gt=0, le=1, description="cosine decay over this last share of the steps "
                                                           "(1: all after warmup; e.g. 0.1: warmup-stable-decay)")
    epochs: float = Field(1.0, gt=0, description="passes over the cache")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (overrides epochs)")
    batch_size: int = Field(2, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    anchors_per_seq: int = Field(32, ge=1, description="N: anchors sampled per sequence visit")
    steps_per_capture: int = Field(1, ge=1, description="optimizer steps taken on slices of one target capture")
    max_len: int = Field(1024, ge=8, description="tokens per example (prompt + answer), longer ones are cut")
    top_k: int = Field(64, ge=1, description="target distribution kept as its top k + tail mass")
    feature_weight: float = Field(0.0, ge=0, description="weight of the feature regression term (0: the paper's "
                                                         "loss); regresses the drafter's final-normed state on "
                                                         "the target's LM-head input at a + j")
    greedy_chains: bool = Field(False, description="teacher-forced text: supervise slot j only while the "
                                "text's tokens a+1..a+j equal the target's argmax (the labels then form "
                                "the target's own greedy continuation, as at inference)")
    clip_norm: float = Field(1.0, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between resumable checkpoints")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="drafter master weights")
    autocast: bool = Field(False, description="bf16 autocast of the drafter's matmuls (fast on AVX512-BF16/AMX)")
    target_dtype: Literal["float32", "bfloat16"] = Field("float32", description="target used for online capture")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's)")
    eval_every: int = Field(100, ge=1, description="optimizer steps between held-out evaluations")
    export_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    device: str = "cpu"

    @field_validator("data", "out", "export", "init_from", "heldout_data")
    @classmethod
    def _expand(cls, v: str | list[str] | None) -> str | list[str] | None:
        """`~` and a leading `{cache}` (= dspark.paths.cache_dir()) are expanded."""
        if isinstance(v, list):
            return [str(Path(x.replace("{cache}", str(cache_dir()))).expanduser()) for x in v]
        return None if v is None else str(Path(v.replace("{cache}", str(cache_dir()))).expanduser())

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"no training config at {p}")
        try:
            return cls.model_validate(yaml.safe_load(p.read_text()) or {})
        except (ValueError, yaml.YAMLError) as e:
            raise UserError(f"{p}: {e}") from e
