"""Real draft + verify rounds, one sequence at a time: the measurement behind
`dspark eval-drafter` (accepted length tau, per-position acceptance) and the dev rounds that
`dspark calibrate` fits temperatures on.

KV invariant (as in the engine): the target cache holds every committed token except the
pending anchor. A round writes [x0, x_1..x_l], keeps x0 plus the n accepted drafts, and
hands their n + 1 features to the drafter; the target's own token becomes the next anchor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection

import torch

from dspark.drafter.proposer import DrafterProposer
from dspark.models.runner import ModelRunner, SeqInput
from dspark.models.transformer import CausalLM
from dspark.spec.proposer import DraftRequest
from dspark.spec.sampling import SamplingParams, draw, make_generator, probs_from_logits
from dspark.spec.verify import verify


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


def _first_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    return int(draw(probs_from_logits(logits[None], params), params, gen)[0])


@torch.inference_mode()
def run_rounds(target: CausalLM, proposer: DrafterProposer, prompts: list[list[int]], params: SamplingParams,
               block_size: int, stop_ids: Collection[int] = (),
               on_prompt: Callable[[int], None] | None = None) -> RoundStats:
    """Generate up to params.max_new_tokens per prompt with draft + verify rounds."""
    rounds: list[Round] = []
    taps = proposer.feature_layers
    for i, prompt in enumerate(prompts):
        gen = make_generator(None if params.seed is None else params.seed + i, target.lm_head.weight.device)
        cache = target.new_cache(1, len(prompt) + params.max_new_tokens + block_size + 2)
        runner = ModelRunner(target, cache)
        slot = cache.allocate()
        out = runner.forward([SeqInput(slot, prompt)], taps=taps, last_only=True)
        tokens = list(prompt) + [_first_token(out.logits[0][-1], params, gen)]
        features = out.taps[0]  # (P, m, d): every prompt position, all before the anchor
        proposer.start(i, prompt)
        produced = 1
        while produced < params.max_new_tokens and tokens[-1] not in stop_ids:
            (draft,) = proposer.propose([DraftRequest(i, tokens, block_size, params, features, gen)])
            v = runner.forward([SeqInput(slot, [tokens[-1], *draft.tokens])], taps=taps)
            res = verify(draft.tokens, draft.probs, v.logits[0], params, gen, stop_ids)
            rounds.append(Round(len(draft.tokens), res.num_accepted, proposer.last_conf_logits.get(i)))
            cache.rollback(slot, len(tokens) + res.num_accepted)
            features = v.taps[0][: res.num_accepted + 1]
            tokens += res.tokens
            produced += len(res.tokens)
            if res.finished_by_stop:
                break
        proposer.finish(i)
        on_prompt and on_prompt(i)
    return RoundStats(rounds)
