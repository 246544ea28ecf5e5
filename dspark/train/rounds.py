"""Real draft + verify rounds, one sequence at a time: the measurement behind
`dspark eval-drafter` (accepted length tau, per-position acceptance) and the dev rounds that
`dspark calibrate` fits temperatures on.

The rounds are the embedded engine's own (`Engine.verify_round`, observed through its
`on_round` hook), so what is measured here is what `dspark generate` runs: the same first
token, the same verification and rollback, the same feature hand-over to the drafter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection

import torch

from dspark.drafter.proposer import DrafterProposer
from dspark.engine.config import EngineConfig
from dspark.engine.engine import Engine, RoundResult
from dspark.engine.sequence import Sequence
from dspark.models.transformer import CausalLM
from dspark.spec.sampling import SamplingParams


@dataclasses.dataclass
class Round:
    num_drafted: int
    num_accepted: int  # tau = num_accepted + 1 (the target's own token)
    conf_logits: torch.Tensor | None  # (num_drafted,) raw z_k


@dataclasses.dataclass
class RoundStats:
    rounds: list[Round]

    @property
    def tau(self) -> float:
        """Mean tokens per round, bonus/correction token included."""
        return sum(r.num_accepted + 1 for r in self.rounds) / max(1, len(self.rounds))

    def conditional_acceptance(self, K: int) -> list[float]:
        """P(draft k accepted | drafts 1..k-1 accepted), over full-length rounds."""
        full = [r for r in self.rounds if r.num_drafted == K]
        out = []
        for k in range(1, K + 1):
            reached = sum(r.num_accepted >= k - 1 for r in full)
            out.append(sum(r.num_accepted >= k for r in full) / reached if reached else float("nan"))
        return out

    def calibration_data(self, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conf logits (R, K), accepted counts (R,)) over full-length rounds."""
        full = [r for r in self.rounds if r.num_drafted == K and r.conf_logits is not None]
        if not full:
            return torch.zeros(0, K), torch.zeros(0, dtype=torch.long)
        return (torch.stack([r.conf_logits.float().cpu() for r in full]),
                torch.tensor([r.num_accepted for r in full]))


@torch.inference_mode()
def run_rounds(target: CausalLM, proposer: DrafterProposer, prompts: list[list[int]], params: SamplingParams,
               block_size: int, stop_ids: Collection[int] = (),
               on_prompt: Callable[[int], None] | None = None) -> RoundStats:
    """Generate up to params.max_new_tokens per prompt with draft + verify rounds of the
    embedded engine (one sequence at a time, every draft verified) and record each round.
    Prompt i samples with seed `params.seed + i`."""
    rounds: list[Round] = []

    def record(seq: Sequence, r: RoundResult) -> None:
        rounds.append(Round(r.drafted, r.accepted, proposer.last_conf_logits.get(seq.seq_id)))

    longest = max((len(p) for p in prompts), default=0)
    config = EngineConfig(max_batch_size=1, max_seq_len=longest + params.max_new_tokens + block_size + 2,
                          block_size=block_size)
    engine = Engine(target, tuple(stop_ids), proposer, config, on_round=record)
    index = {engine.add_request(p, params.nth(i)): i for i, p in enumerate(prompts)}
    while engine.has_work:
        engine.step()
        for seq_id in list(engine.finished):
            engine.pop_finished(seq_id)
            on_prompt and on_prompt(index[seq_id])
    return RoundStats(rounds)
