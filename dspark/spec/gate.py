"""Draft gating: skip the proposer when drafting costs more than it returns.

The confidence scheduler decides how many drafts to verify *after* they exist, so the
drafter's own pass is always paid. When that pass does not pay for itself (a weak drafter,
or low load where verification is cheap and drafting is not), a speculative round is slower
than a plain autoregressive one even if the scheduler verifies nothing. The gate compares,
after every drafted round,

    speculative rate  = emitted / (propose_s + 1 / SPS(verify_tokens))
    autoregressive    = num_seqs / (1 / SPS(num_seqs))

(SPS from the engine's measured profile, `propose_s` measured), keeps a running mean of
their ratio, and while it is below 1 runs plain rounds for 1, 2, 4, ... up to `max_skip`
steps before probing the drafter again. Skipped rounds stay lossless: a round without
drafts is an ordinary target step, and the choice depends only on past rounds. Features of
the skipped positions wait in each sequence's pending list (in the fleet, the router's list
for the request), so the next drafted round hands the drafter everything it missed.
"""

from __future__ import annotations

import dataclasses

from dspark.spec.scheduler import StepCostProfile


@dataclasses.dataclass
class DraftGate:
    sps: StepCostProfile
    max_skip: int = 16  # longest run of plain rounds before the drafter is probed again
    smoothing: float = 0.5  # weight of the newest round in the running ratio
    ratio: float | None = None  # running speculative / autoregressive rate
    skip_left: int = 0
    backoff: int = 1
    drafted_rounds: int = 0
    skipped_rounds: int = 0

    def should_draft(self) -> bool:
        """Whether the next round drafts (the engine asks once for its first round, then at
        the end of every round); False = run that round without drafts."""
        if self.skip_left > 0:
            self.skip_left -= 1
            self.skipped_rounds += 1
            return False
        self.drafted_rounds += 1
        return True

    def observe(self, num_seqs: int, emitted: int, propose_s: float, verify_tokens: int) -> None:
        """Record one drafted round of `num_seqs` sequences that emitted `emitted` tokens."""
        if num_seqs <= 0:
            return
        spec_rate = emitted / (propose_s + 1.0 / self.sps(verify_tokens))
        ar_rate = num_seqs * self.sps(num_seqs)
        r = spec_rate / ar_rate
        self.ratio = r if self.ratio is None else self.smoothing * r + (1 - self.smoothing) * self.ratio
        if self.ratio >= 1.0:
            self.backoff = 1
        else:
            self.skip_left = self.backoff
            self.backoff = min(2 * self.backoff, self.max_skip)
