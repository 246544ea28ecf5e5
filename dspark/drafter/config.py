"""Configuration of a DSpark (or DFlash-style) drafter.

Sizes are copied from the target so the drafter's layers are "target-shaped"; `for_target`
fills them, and `check_target` refuses to attach a checkpoint to a different model.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from dspark.errors import UserError
from dspark.models.config import ModelConfig

CONFIG_FILE = "config.json"


def default_taps(num_layers: int, m: int = 4) -> list[int]:
    """`m` layers evenly spaced from 1 to L-3 (never the last layer): SmolLM2 (L=30) -> [1, 10, 18, 27]."""
    lo, hi = 1, max(1, num_layers - 3)
    if m == 1 or hi == lo:
        return [lo]
    return sorted({round(lo + i * (hi - lo) / (m - 1)) for i in range(m)})


class DrafterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="name of the target model this drafter reads")
    taps: list[int] = Field(description="target layers whose raw outputs form the context")
    num_layers: int = Field(1, ge=1, description="decoder layers of the drafter backbone")
    block_size: int = Field(7, ge=1, description="K: draft slots per block, x0 included")
    markov_rank: int = Field(64, ge=0, description="r of the Markov head; 0 = DFlash-style parallel")
    confidence_head: bool = Field(True, description="train and run the confidence head")
    gamma: float = Field(4.0, gt=0, description="position weights w_j = exp(-j / gamma)")
    mask_token_id: int = Field(description="MASK id filling block slots 1..K-1 (never in real data); "
                                           ">= vocab_size: a dedicated trained embedding row no text can produce")
    direct_path: bool = Field(False, description="add a projection of the fused feature of the last context "
                                                 "position (a - 1, never the anchor's own) to every block slot "
                                                 "(an extension beyond the paper; False = the paper's drafter)")
    draft_vocab_size: int | None = Field(
        None, description="frequency-ranked draft vocabulary size; None = full")
    # Copied from the target.
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048

    @classmethod
    def for_target(cls, name: str, cfg: ModelConfig, **kw: object) -> DrafterConfig:
        kw.setdefault("taps", default_taps(cfg.num_layers))
        return cls(target=name, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                   intermediate_size=cfg.intermediate_size, num_heads=cfg.num_heads,
                   num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                   rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                   hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings,
                   **kw)

    @property
    def dedicated_mask(self) -> bool:
        """MASK is a row of its own, outside the target's vocabulary."""
        return self.mask_token_id >= self.vocab_size

    @property
    def num_draft_vocab(self) -> int:
        return self.draft_vocab_size or self.vocab_size

    def check_target(self, cfg: ModelConfig) -> None:
        got = (cfg.vocab_size, cfg.hidden_size, cfg.num_layers > max(self.taps))
        want = (self.vocab_size, self.hidden_size, True)
        if got != want:
            raise UserError(f"drafter for {self.target!r} does not fit this target "
                            f"(vocab, hidden, taps) {got} != {want}")

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / CONFIG_FILE).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> DrafterConfig:
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise UserError(f"no drafter config at {path}")
        return cls.model_validate_json(path.read_text())
