"""The embedded engine: continuous batching of speculative (or plain) decoding.

Every step admits waiting requests (one batched prefill), then runs one round for every
running sequence: the proposer drafts up to K tokens per sequence, the verification policy
picks how many of them to check, the target scores `[anchor, drafts...]` of all sequences
in ONE forward, and each sequence keeps its accepted prefix plus the target's own token.
Plain autoregressive decoding is the same round with zero drafts.

KV invariant: a sequence's cache slot holds every committed token except the last one (the
pending anchor). A round writes anchor + drafts, then rolls back past the accepted prefix.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator

import torch

from dspark.engine.config import EngineConfig
from dspark.engine.sequence import (
    FinishReason,
    RequestOutput,
    Sequence,
    StreamCallback,
    finish_reason_of,
    stop_token_ids,
)
from dspark.engine.stop import TextStream
from dspark.errors import UserError
from dspark.models.runner import ModelRunner, SeqInput
from dspark.models.tokenizer import Tokenizer
from dspark.models.transformer import CausalLM
from dspark.spec.gate import DraftGate
from dspark.spec.logits import TokenLogprob, process_logits, token_logprobs
from dspark.spec.proposer import Draft, DraftRequest, Proposer, take_features
from dspark.spec.sampling import SamplingParams, draw, make_generator, probs_from_logits
from dspark.spec.scheduler import StepCostProfile, VerifyPolicy
from dspark.spec.verify import verify


@dataclasses.dataclass
class StepStats:
    num_seqs: int = 0
    num_prefill: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)
    drafted_per_position: list[int] = dataclasses.field(default_factory=list)
    verify_tokens: int = 0  # target tokens in the verification forward (anchors + drafts)
    proposed: bool = False  # a drafting pass made this step's drafts (False: no proposer, or gated off)
    prefill_s: float = 0.0
    propose_s: float = 0.0
    verify_s: float = 0.0
    step_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """One sequence's outcome of a round (`verify_round`, or `prefill`: its first token,
    nothing drafted); `StepStats` keeps the batch's. What a fleet worker replies is built
    from this alone: it never reads the sequence itself."""

    tokens: list[int]  # committed: accepted drafts + the target's token, cut at a stop / the length limit
    drafted: int  # drafts verified (the policy may verify fewer than were proposed)
    accepted: int
    finish_reason: FinishReason | None  # set when this round finished the sequence
    logprobs: list[TokenLogprob] | None  # one per token, when the request asks
    max_drafts: int = 0  # drafts the next round can use (0 once finished)
    # (n, m, d) tapped features of the positions this round committed to the KV, for a
    # drafter elsewhere; None in an engine with its own proposer (it takes them from the
    # sequence when it next drafts, which a gated-off round postpones) or without taps.
    features: torch.Tensor | None = None

    @property
    def verify_tokens(self) -> int:
        """This sequence's tokens in the verification forward (anchor + drafts)."""
        return 1 + self.drafted


class Engine:
    def __init__(self, model: CausalLM, eos_token_ids: tuple[int, ...] = (),
                 proposer: Proposer | None = None, config: EngineConfig | None = None,
                 policy: VerifyPolicy | None = None, sps: StepCostProfile | None = None,
                 feature_layers: tuple[int, ...] | None = None, gate: DraftGate | None = None,
                 tokenizer: Tokenizer | None = None,
                 on_round: Callable[[Sequence, RoundResult], None] | None = None) -> None:
        self.config = config or EngineConfig()
        # Called for every sequence of every verified round, before a finished one is reaped
        # (its proposer state is still there): measurement (dspark/train/rounds.py) hooks in here.
        self.on_round = on_round
        self.tokenizer = tokenizer  # needed only for requests with stop strings
        self.model = model
        max_len = min(self.config.max_seq_len, model.cfg.max_position_embeddings)
        self.cache = model.new_cache(self.config.max_batch_size, max_len)
        self.runner = ModelRunner(model, self.cache)
        self.proposer = proposer
        self.policy = policy  # None = verify every draft (the `fixed` policy)
        self.sps = sps  # measured steps/s by verification batch size, for the confidence policy
        self.gate = gate  # None = draft every round
        # Whether the next round drafts: the gate's decision, asked here for the first round
        # and at the end of every round for the one after (`_gate_round`).
        self.draft_next = gate is None or gate.should_draft()
        self.eos_token_ids = tuple(eos_token_ids)
        # Target layers to tap. A fleet target worker has no local proposer but taps for the
        # remote drafter, so the layers can be given explicitly.
        if feature_layers is None:
            feature_layers = tuple(proposer.feature_layers) if proposer is not None else ()
        self.taps = tuple(feature_layers)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.finished: dict[int, Sequence] = {}
        self._ids = itertools.count()

    # -- requests ------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    on_tokens: StreamCallback | None = None) -> int:
        seq = self.new_sequence(prompt_ids, params, on_tokens)
        self.waiting.append(seq)
        return seq.seq_id

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams,
                     on_tokens: StreamCallback | None = None, taps: tuple[int, ...] | None = None) -> Sequence:
        """A validated `Sequence` (stop ids, RNG) not yet queued: `add_request` queues it,
        fleet workers drive it through `prefill` / `verify_round` themselves. `taps`: the
        target layers its drafter reads (default: this engine's proposer's)."""
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if len(prompt_ids) >= self.cache.max_len:
            raise UserError(f"prompt has {len(prompt_ids)} tokens; the context holds {self.cache.max_len}")
        if params.stop and self.tokenizer is None:
            raise UserError("stop strings need an engine built with a tokenizer")
        seq = Sequence(next(self._ids), list(prompt_ids), params, stop_token_ids(params, self.eos_token_ids),
                       make_generator(params.seed, self.runner.device), on_tokens,
                       taps=self.taps if taps is None else tuple(taps))
        if params.stop:
            seq.text = TextStream(self.tokenizer, params.stop)  # type: ignore[arg-type]
        return seq

    # -- sequences driven from outside: the fleet's prefill and target workers ------------
    def open_sequence(self, prompt_ids: list[int], params: SamplingParams,
                      taps: tuple[int, ...] = ()) -> Sequence:
        """A validated sequence holding a KV slot, not queued: the caller fills its KV
        (`prefill`, or `import_kv_layer` + `imported`), runs `verify_round` on it and gives
        the slot back with `close_sequence`. The caller treats it as a handle: what it needs
        comes back in `RoundResult`s, with the features of `taps` (a remote drafter's
        layers) for every position committed to the KV."""
        seq = self.new_sequence(prompt_ids, params, taps=taps)
        seq.slot = self.cache.allocate()
        return seq

    def import_kv_layer(self, seq: Sequence, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """One layer's KV of the sequence's committed positions, from another engine."""
        self.cache.import_layer(seq.slot, layer, k, v)

    def imported(self, seq: Sequence, num_tokens: int, output_ids: list[int]) -> None:
        """The KV of `num_tokens` positions is in; the sequence continues after `output_ids`
        (its last token is the pending anchor, not in the KV: the engine's invariant)."""
        self.cache.set_length(seq.slot, num_tokens)
        seq.output_ids = list(output_ids)

    def export_kv(self, seq: Sequence) -> tuple[int, Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """(positions in the KV, an iterator of (k, v) per layer) of the sequence."""
        return self.cache.lengths[seq.slot], self.cache.export_layers(seq.slot)

    def close_sequence(self, seq: Sequence) -> None:
        """Free the sequence's KV slot (idempotent)."""
        if seq.slot >= 0:
            self.cache.free(seq.slot)
            seq.slot = -1

    @property
    def num_free_slots(self) -> int:
        return self.cache.num_free

    @property
    def max_context(self) -> int:
        """Tokens a sequence may hold (prompt + output)."""
        return self.cache.max_len

    def abort(self, seq_id: int) -> None:
        for seq in itertools.chain(self.waiting, self.running):
            if seq.seq_id == seq_id and not seq.finished:
                seq.finish_reason = FinishReason.ABORT

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def pop_finished(self, seq_id: int) -> RequestOutput:
        return RequestOutput.from_sequence(self.finished.pop(seq_id))

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 on_tokens: StreamCallback | None = None) -> list[RequestOutput]:
        """Run `prompts` to completion (continuous batching) and return outputs in order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp, on_tokens) for p, sp in zip(prompts, plist)]
        while self.has_work:
            self.step()
        return [self.pop_finished(i) for i in ids]

    # -- one engine step -----------------------------------------------------------------
    def step(self) -> StepStats:
        stats = StepStats()
        t0 = time.perf_counter()
        self._admit(stats)
        live = [s for s in self.running if not s.finished]
        if live:
            self._round(live, stats)
        self._reap()
        stats.step_s = time.perf_counter() - t0
        return stats

    def _admit(self, stats: StepStats) -> None:
        new: list[Sequence] = []
        while self.waiting and len(self.running) + len(new) < self.config.max_batch_size:
            seq = self.waiting.popleft()
            if seq.finished:  # aborted while waiting
                self.finished[seq.seq_id] = seq
                continue
            seq.slot = self.cache.allocate()
            seq.admit_s = time.perf_counter()
            new.append(seq)
        if not new:
            return
        self.prefill(new, stats)
        for seq in new:
            if self.proposer is not None:
                self.proposer.start(seq.seq_id, seq.prompt_ids)
            self.running.append(seq)
        # Slot order: a full batch then reads its KV through a view (slot_range), not a gather.
        self.running.sort(key=lambda s: s.slot)

    def prefill(self, seqs: list[Sequence], stats: StepStats) -> list[RoundResult]:
        """Batched forwards over the prompts of `seqs` (slots already allocated): fills their
        KV, samples each first token (emitted) and keeps the prompt's tapped features.
        Public so a fleet prefill worker runs exactly this; returns each sequence's first
        token as a `RoundResult` (nothing drafted), in order."""
        t0 = time.perf_counter()
        results: dict[int, RoundResult] = {}
        for group in length_groups(seqs):
            taps = _forward_taps(group)
            out = self.runner.forward([SeqInput(s.slot, s.prompt_ids) for s in group], taps, last_only=True)
            for b, seq in enumerate(group):
                logits = process_logits(out.logits[b][-1:], seq.params, seq.output_ids)  # (1, V)
                token = self._sample_one(logits, seq)
                if seq.taps and out.taps is not None:
                    seq.pending_features.append(out.taps[b])
                logprobs = _logprobs(logits, [token], seq)
                tokens = self._emit(seq, [token], logprobs)
                results[id(seq)] = self._result(seq, tokens, 0, 0, logprobs)
        stats.num_prefill = len(seqs)
        stats.prefill_s = time.perf_counter() - t0
        return [results[id(s)] for s in seqs]

    def _result(self, seq: Sequence, tokens: list[int], drafted: int, accepted: int,
                logprobs: list[TokenLogprob] | None) -> RoundResult:
        features = take_features(seq.pending_features) if self.proposer is None and seq.taps else None
        return RoundResult(tokens, drafted, accepted, seq.finish_reason,
                           None if logprobs is None else logprobs[: len(tokens)],
                           0 if seq.finished else self.max_drafts(seq), features)

    def _sample_one(self, logits: torch.Tensor, seq: Sequence) -> int:
        """One token from (1, V) logits."""
        return int(draw(probs_from_logits(logits, seq.params), seq.params, seq.generator)[0])

    def _round(self, seqs: list[Sequence], stats: StepStats) -> None:
        t0 = time.perf_counter()
        if self.draft_next:
            drafts = self._propose(seqs)
            stats.proposed = self.proposer is not None
        else:
            drafts = [Draft([]) for _ in seqs]  # gated off: a plain target step; features keep pending
        stats.propose_s = time.perf_counter() - t0
        self.verify_round(seqs, drafts, stats)

    def verify_round(self, seqs: list[Sequence], drafts: list[Draft], stats: StepStats) -> list[RoundResult]:
        """The verify-and-commit half of a round, for drafts made anywhere (the local
        proposer, or a remote drafter worker in the fleet): apply the verification policy to
        the whole batch, score `[anchor, drafts...]` of every sequence in ONE forward, keep
        each accepted prefix plus the target's token, roll the KV back past the rest.

        The caller says in `stats.proposed` / `stats.propose_s` whether a drafting pass made
        the drafts and what it cost (`_round` measures its proposer; a fleet target worker
        passes the router's measurement): the round ends with the draft gate's bookkeeping
        (`_gate_round`), so the gate decides alike embedded and in the fleet. Returns each
        sequence's `RoundResult`, in order."""
        t1 = time.perf_counter()
        lengths = self._schedule(seqs, drafts)
        inputs = [SeqInput(s.slot, [s.token_ids[-1]] + d.tokens[:n]) for s, d, n in zip(seqs, drafts, lengths)]
        out = self.runner.forward(inputs, _forward_taps(seqs))
        results = []
        for b, (seq, draft, n) in enumerate(zip(seqs, drafts, lengths)):
            probs = draft.probs[:n] if draft.probs is not None else None
            # Penalties / logit bias first: drafts are judged by the processed target distribution.
            logits = process_logits(out.logits[b], seq.params, seq.output_ids, draft.tokens[:n])  # (n+1, V)
            res = verify(draft.tokens[:n], probs, logits, seq.params, seq.generator, seq.stop_ids)
            # Keep the anchor and the accepted drafts; the emitted token becomes the next anchor.
            self.cache.rollback(seq.slot, self.cache.lengths[seq.slot] - n + res.num_accepted)
            if seq.taps and out.taps is not None:
                seq.pending_features.append(out.taps[b][: 1 + res.num_accepted])
            seq.record_round(n, res.num_accepted)
            logprobs = _logprobs(logits, res.tokens, seq)
            tokens = self._emit(seq, res.tokens, logprobs)
            result = self._result(seq, tokens, n, res.num_accepted, logprobs)
            if self.on_round is not None:
                self.on_round(seq, result)
            results.append(result)
            stats.drafted += n
            stats.accepted += res.num_accepted
            stats.emitted += len(res.tokens)
            _add_at(stats.drafted_per_position, [1] * n)
            _add_at(stats.accepted_per_position, [1] * res.num_accepted)
        stats.num_seqs = len(seqs)
        stats.verify_tokens = sum(len(i.tokens) for i in inputs)
        stats.verify_s = time.perf_counter() - t1
        self._gate_round(stats)
        return results

    def _gate_round(self, stats: StepStats) -> None:
        """The draft gate after a round: a drafted round's payoff is observed, then the gate
        decides whether the NEXT round drafts (`draft_next`). Decided at the end of a round,
        not the start of the next, so a fleet target worker can hand the decision back with
        its verify replies (one verify batch = one engine step) and the router skips the
        drafter call itself."""
        if self.gate is None:
            return
        if stats.proposed:
            self.gate.observe(stats.num_seqs, stats.emitted, stats.propose_s, stats.verify_tokens)
        self.draft_next = self.gate.should_draft()

    def _propose(self, seqs: list[Sequence]) -> list[Draft]:
        if self.proposer is None or self.config.block_size == 0:
            return [Draft([]) for _ in seqs]
        requests = []
        for seq in seqs:
            requests.append(DraftRequest(seq.seq_id, seq.token_ids, self.max_drafts(seq), seq.params,
                                         take_features(seq.pending_features), seq.generator))
        return self.proposer.propose(requests)

    def max_drafts(self, seq: Sequence) -> int:
        """How many drafts `seq` can use next round (block size, tokens left, KV room)."""
        remaining = seq.params.max_new_tokens - len(seq.output_ids)
        room = self.cache.max_len - self.cache.lengths[seq.slot] - 1
        return max(0, min(self.config.block_size, remaining - 1, room))

    def _schedule(self, seqs: list[Sequence], drafts: list[Draft]) -> list[int]:
        lengths = [min(len(d.tokens), self.max_drafts(s)) for s, d in zip(seqs, drafts)]
        if self.policy is None:
            return lengths
        confidences = [None if d.confidences is None else d.confidences[:n] for d, n in zip(drafts, lengths)]
        return [min(a, b) for a, b in zip(self.policy(confidences, lengths, self.sps), lengths)]

    def _emit(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> list[int]:
        """Commit `tokens` (with their log-probs) up to a stop or the length limit, set the
        finish reason, stream them; returns the tokens committed."""
        if seq.first_token_s is None:
            seq.first_token_s = time.perf_counter()
        tokens = tokens[: seq.params.max_new_tokens - len(seq.output_ids)]
        stopped = False
        if seq.text is not None:  # stop strings: drop whatever follows the one that matched
            delta = seq.text.push(tokens)
            tokens, stopped = tokens[: delta.num_tokens], delta.stopped
        seq.output_ids.extend(tokens)
        if logprobs is not None:
            seq.logprobs.extend(logprobs[: len(tokens)])
        reason = FinishReason.STOP if stopped else finish_reason_of(seq.output_ids, seq.stop_ids,
                                                                    seq.params.max_new_tokens)
        if reason is None and self.cache.lengths[seq.slot] + 1 >= self.cache.max_len:
            reason = FinishReason.LENGTH  # the KV context is full
        if reason is not None:
            seq.finish_reason = reason
            if seq.text is not None:
                seq.text.flush()
        if seq.on_tokens is not None:
            seq.on_tokens(seq.seq_id, tokens, seq.finished)
        return tokens

    def _reap(self) -> None:
        keep = []
        for seq in self.running:
            if seq.finished:
                seq.finish_s = time.perf_counter()
                if seq.finish_reason is FinishReason.ABORT and seq.on_tokens is not None:
                    seq.on_tokens(seq.seq_id, [], True)
                self.cache.free(seq.slot)
                if self.proposer is not None:
                    self.proposer.finish(seq.seq_id)
                self.finished[seq.seq_id] = seq
            else:
                keep.append(seq)
        self.running = keep


MAX_PREFILL_PADDING = 1.25  # padded / real prompt tokens allowed in one batched prefill


def length_groups(seqs: list[Sequence]) -> list[list[Sequence]]:
    """Split a prefill into forwards of similar prompt lengths. Prefill is compute-bound and
    rows are right-padded to the longest, so 16 prompts of 20..420 tokens in one forward
    paid for 4x the tokens they hold. Groups are formed in length order and closed when the
    next prompt would push padded tokens past MAX_PREFILL_PADDING x real ones."""
    groups: list[list[Sequence]] = []
    real = 0
    for seq in sorted(seqs, key=lambda s: len(s.prompt_ids)):
        n = len(seq.prompt_ids)
        if groups and (len(groups[-1]) + 1) * n <= MAX_PREFILL_PADDING * (real + n):
            groups[-1].append(seq)
            real += n
        else:
            groups.append([seq])
            real = n
    return groups


def _forward_taps(seqs: list[Sequence]) -> tuple[int, ...]:
    """The layers one forward taps: those of its sequences that read features. An engine
    serves one drafter model (embedded: its proposer; in a fleet: the drafter deployment),
    so two different non-empty sets in one batch are a bug, not a case to merge."""
    taps = {s.taps for s in seqs if s.taps}
    if len(taps) > 1:
        raise ValueError(f"sequences tapping different target layers in one forward: {sorted(taps)}")
    return taps.pop() if taps else ()


def _logprobs(logits: torch.Tensor, tokens: list[int], seq: Sequence) -> list[TokenLogprob] | None:
    """Log-probs of the emitted `tokens` under the target rows that produced them, when asked."""
    if seq.params.logprobs is None:
        return None
    return token_logprobs(logits, tokens, seq.params.logprobs)


def _add_at(acc: list[int], values: list[int]) -> None:
    while len(acc) < len(values):
        acc.append(0)
    for i, v in enumerate(values):
        acc[i] += v
