"""`hybrid`: the DSpark drafter and prompt lookup, whichever promises more, one verification.

Text that copies long spans (code edits, RAG, summaries, a maths answer restating the
question) is where prompt lookup shines and a small drafter struggles; free text is the
reverse. Per round and sequence:

    E_ng(L) = sum_{j <= L} p^j            lookup draft of L tokens; p = this sequence's observed
                                          per-token acceptance of lookup drafts (Beta(1, 1) prior)
    E_ds    = sum_{j <= K} s_j            the drafter's calibrated survival (its own confidence)

The block with the larger expected accepted length is verified. While lookup keeps
promising more than the drafter has recently delivered (an EMA of E_ds), the drafter's pass
is skipped for that sequence; its context still takes every committed feature (a cheap
extension, no block drafted) whenever the batch's pass runs, so it can take over the next
round. Either way the target verifies one block against the exact distribution the block
was drawn from (one-hot for lookup), so the output is lossless.

The drafter's pass is not free, lookup nearly is. So the batch's pass runs only when it
pays for its time. Measured online as EMAs of this process's wall clock: t_pass, the pass;
t_with and t_without, the rest of a round (verification and the engine, from one proposal to
the next) after a round with and without the pass (a drafter block verifies more tokens):

    run the pass  iff  sum_i (1 + max(E_ds_i, E_ng_i)) / (t_pass + t_with)
                           >  sum_i (1 + E_ng_i) / t_without

(tokens per second with the pass against lookup-only rounds; E_ds_i is the sequence's
recent expected length, E_ng_i = 0 without a match). A skipped pass is probed again after
`probe_every` rounds (doubling, up to `MAX_PROBE_GAP`, while the probes keep not paying), so a
drafter that starts to pay is noticed. Rounds without the pass do not call the drafter at
all: each sequence's committed features wait in a backlog that the next pass extends its
context with in one call. This is the draft gate's trade-off (dspark/spec/gate.py) made
inside the proposer, where lookup can stand in for the drafter instead of no draft at all;
it needs no step-cost profile, so it works under every verification policy.

Acceptance of the previous round is read from the feature contract: a round that accepted
n drafts delivers n + 1 new features.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from dspark.drafter.proposer import DrafterProposer, drafter_factory
from dspark.spec.ngram import lookup
from dspark.spec.proposer import Draft, DraftRequest, register_proposer, take_features

EMA = 0.3  # weight of the newest round in the drafter's expected-length and timing averages
PROBE_EVERY = 8  # rounds without the drafter's pass before it is run again to re-measure
MAX_PROBE_GAP = 64  # the gap doubles from PROBE_EVERY while probes keep not paying


@dataclasses.dataclass
class _SeqStats:
    hits: float = 0.0  # lookup drafts accepted
    trials: float = 0.0  # lookup drafts that were reached (accepted, or the first rejected)
    ds_expect: float | None = None  # EMA of the drafter's expected accepted length
    last_lookup: int = 0  # length of last round's lookup draft (0: the drafter's block, or none)
    backlog: list[torch.Tensor] = dataclasses.field(default_factory=list)  # features the drafter has not seen

    @property
    def p_lookup(self) -> float:
        return (self.hits + 1.0) / (self.trials + 2.0)

    def lookup_expect(self, length: int) -> float:
        p = self.p_lookup
        return sum(p ** j for j in range(1, length + 1))


class HybridProposer:
    def __init__(self, drafter: DrafterProposer, max_ngram: int = 3, min_ngram: int = 2,
                 probe_every: int = PROBE_EVERY, clock: Callable[[], float] = time.perf_counter) -> None:
        self.drafter, self.name = drafter, "hybrid"
        self.feature_layers = drafter.feature_layers
        self.max_drafts = drafter.max_drafts
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.probe_every, self.clock = probe_every, clock
        self._stats: dict[int, _SeqStats] = {}
        self.rounds = {"drafter": 0, "lookup": 0, "lookup_skipped_drafter": 0, "pass_skipped": 0}  # for reports
        self.pass_s: float | None = None  # EMA of the drafter's pass (a batch's blocks drafted)
        # EMAs of the rest of a round (end of one proposal to the next), after a round with / without the pass
        self.rest_with_s: float | None = None
        self.rest_without_s: float | None = None
        self._returned_at: float | None = None
        self._last_ran = False
        self._since_pass = 0  # rounds since the pass last ran
        self._probe_gap = probe_every

    @property
    def round_times(self) -> tuple[float, float] | None:
        """(seconds of a round with the pass, without it); None until both kinds are measured
        (a round without the pass has not happened yet: it is first tried as if it cost what
        the rest of a round with the pass does)."""
        if self.pass_s is None or self.rest_with_s is None:
            return None
        with_pass, without = self.pass_s + self.rest_with_s, self.rest_without_s or self.rest_with_s
        return (with_pass, without) if with_pass > 0 and without > 0 else None

    @property
    def last_conf_logits(self) -> dict[int, torch.Tensor]:
        return self.drafter.last_conf_logits

    def start(self, seq_id: int, prompt_ids: list[int]) -> None:
        self.drafter.start(seq_id, prompt_ids)
        self._stats[seq_id] = _SeqStats()
        self._returned_at = None  # the gap to the next round holds an admission: not a round's rest

    def finish(self, seq_id: int) -> None:
        self.drafter.finish(seq_id)
        self._stats.pop(seq_id, None)
        self._returned_at = None

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        start = self.clock()
        if self._returned_at is not None:
            rest = start - self._returned_at
            if self._last_ran:
                self.rest_with_s = _ema(self.rest_with_s, rest)
            else:
                self.rest_without_s = _ema(self.rest_without_s, rest)
        matches, run_drafter = [], []
        for req in requests:
            st = self._stats[req.seq_id]
            self._account(st, req)
            if req.new_features is not None:  # until the drafter's next pass takes them
                st.backlog.append(req.new_features)
            k = min(req.max_tokens, self.max_drafts)
            match = lookup(req.token_ids, k, self.max_ngram, self.min_ngram) if k > 0 else []
            matches.append(match)
            skip = bool(match) and st.ds_expect is not None and st.lookup_expect(len(match)) > st.ds_expect
            run_drafter.append(k > 0 and not skip)
        if any(run_drafter) and not self._pass_pays(requests, matches):
            run_drafter = [False] * len(requests)
            self.rounds["pass_skipped"] += 1
        if any(run_drafter):
            # The drafter sees every request with its backlog: those it does not draft for
            # still extend their context.
            ds_requests = [dataclasses.replace(req, max_tokens=req.max_tokens if run else 0,
                                               new_features=take_features(self._stats[req.seq_id].backlog))
                           for req, run in zip(requests, run_drafter, strict=True)]
            t0 = self.clock()
            ds_drafts = self.drafter.propose(ds_requests)
            self.pass_s = _ema(self.pass_s, self.clock() - t0)
            self._since_pass = 0
        else:  # no pass: not even a context extension; the features wait in the backlog
            ds_drafts = [Draft(tokens=[]) for _ in requests]
            self._since_pass += 1
        out = []
        for req, match, ran, ds in zip(requests, matches, run_drafter, ds_drafts, strict=True):
            st = self._stats[req.seq_id]
            e_ds = None
            if ran and ds.confidences is not None and ds.tokens:
                e_ds = float(torch.cumprod(ds.confidences.float(), 0).sum())
                st.ds_expect = e_ds if st.ds_expect is None else (1 - EMA) * st.ds_expect + EMA * e_ds
            use_lookup = bool(match) and (not ran or e_ds is None or st.lookup_expect(len(match)) > e_ds)
            if use_lookup:
                self.rounds["lookup"] += 1
                self.rounds["lookup_skipped_drafter"] += not ran
                st.last_lookup = len(match)
                p = st.p_lookup
                out.append(Draft(tokens=match, probs=None, confidences=torch.full((len(match),), p)))
            else:
                self.rounds["drafter"] += bool(ds.tokens)
                st.last_lookup = 0
                out.append(ds)
        self._returned_at, self._last_ran = self.clock(), any(run_drafter)
        return out

    def _pass_pays(self, requests: list[DraftRequest], matches: list[list[int]]) -> bool:
        """Whether the drafter's pass is expected to emit more tokens per unit time than
        lookup-only rounds (module docstring). Runs while anything is unmeasured, and as a
        probe once `_probe_gap` rounds went without it (the gap doubles per probe until the
        pass pays again)."""
        times = self.round_times
        if times is None:
            return True
        if self._since_pass >= self._probe_gap:
            self._probe_gap = min(2 * self._probe_gap, MAX_PROBE_GAP)
            return True
        with_pass = without = 0.0
        for req, match in zip(requests, matches, strict=True):
            st = self._stats[req.seq_id]
            if st.ds_expect is None:
                return True
            e_ng = st.lookup_expect(len(match)) if match else 0.0
            with_pass += 1.0 + max(st.ds_expect, e_ng)
            without += 1.0 + e_ng
        pays = with_pass / times[0] > without / times[1]
        if pays:
            self._probe_gap = self.probe_every
        return pays

    @staticmethod
    def _account(st: _SeqStats, req: DraftRequest) -> None:
        """Credit last round's lookup draft with what the target accepted of it."""
        if st.last_lookup and req.new_features is not None:
            accepted = min(req.new_features.shape[0] - 1, st.last_lookup)
            st.hits += accepted
            st.trials += min(accepted + 1, st.last_lookup)
        st.last_lookup = 0


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new


@register_proposer("hybrid")
def _make_hybrid(target: Any, block_size: int | None = None, checkpoint: Any = None, **kw: Any) -> HybridProposer:
    return HybridProposer(drafter_factory("dspark")(target, block_size=block_size, checkpoint=checkpoint, **kw))
