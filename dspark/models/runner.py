"""Model runner: one target forward over the new tokens of several sequences.

The runner owns nothing but the call: the engine owns the `KVCache` and decides what to
keep. A forward over `tokens` for a sequence whose slot holds `start` tokens writes their
K/V at positions [start, start + n) and advances the slot length by n; the caller rolls
back whatever it does not commit. When the model carries a `CompiledStep` and the step is
short (decode, verification), every row is padded to the step's token bucket and the
compiled graph runs it; the padding's K/V land past the slot's length, where they are
never read.
"""

from __future__ import annotations

import dataclasses

import torch

from dspark.kv.cache import KVCache
from dspark.models.transformer import CausalLM, ForwardBatch


@dataclasses.dataclass
class SeqInput:
    slot: int
    tokens: list[int]  # new tokens (>= 1)


@dataclasses.dataclass
class RunnerOutput:
    logits: list[torch.Tensor]  # per sequence (n_i, V) float32, or (1, V) with last_only
    hidden: list[torch.Tensor]  # per sequence (n_i, d) final-normed hidden states
    taps: list[torch.Tensor] | None  # per sequence (n_i, m, d) raw tapped layer outputs


class ModelRunner:
    def __init__(self, model: CausalLM, cache: KVCache) -> None:
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device
        self._window = model.cfg.sliding_window if model.cfg.layer_types else None

    @torch.inference_mode()
    def forward(self, seqs: list[SeqInput], taps: tuple[int, ...] = (),
                last_only: bool = False) -> RunnerOutput:
        starts = [self.cache.lengths[s.slot] for s in seqs]
        counts = [len(s.tokens) for s in seqs]
        for s, n in zip(seqs, counts):
            self.cache.reserve(s.slot, n)
        slots = [s.slot for s in seqs]
        compiled = self.model.compiled
        T = compiled.padded_length(slots, counts) if compiled is not None else None
        ids = torch.zeros(len(seqs), T or max(counts), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : counts[b]] = torch.tensor(s.tokens)
        ids = ids.to(self.device)
        flat = None
        if T is not None:
            batch = compiled.build_batch(slots, starts, T, self.cache, self._window)
            flat, hidden, tapped = compiled(ids, batch, self.cache, taps)  # (B, T, V), (B, T, d)
        else:
            batch = ForwardBatch.build(slots, starts, counts, self.device, self._window)
            hidden, tapped = self.model(ids, batch, self.cache, taps)  # (B, T, d)
        for s, n in zip(seqs, counts):
            self.cache.lengths[s.slot] += n
        rows = torch.tensor(counts, device=self.device) - 1
        if last_only:
            if flat is None:
                last = hidden[torch.arange(len(seqs), device=self.device), rows]  # (B, d)
                logits = self.model.logits(last)
            else:
                logits = flat[torch.arange(len(seqs), device=self.device), rows]  # (B, V)
            out_logits = [logits[b : b + 1] for b in range(len(seqs))]
        else:
            flat = self.model.logits(hidden) if flat is None else flat  # (B, T, V)
            out_logits = [flat[b, :n] for b, n in enumerate(counts)]
        out_taps = None
        if taps:
            stacked = torch.stack(tapped, dim=2)  # (B, T, m, d)
            out_taps = [stacked[b, :n] for b, n in enumerate(counts)]
        return RunnerOutput(out_logits, [hidden[b, :n] for b, n in enumerate(counts)], out_taps)

    @torch.inference_mode()
    def warm_up(self, taps: tuple[int, ...] = (), context: int = 16) -> None:
        """Compile every bucket of the compiled step now (batch 1, and batch 2 when the cache
        has the slots), with the layer taps the caller's steps will ask for, so no step pays
        for compilation later; no-op when eager. Uses free slots and leaves them free."""
        compiled = self.model.compiled
        if compiled is None or self.cache.num_free == 0:
            return
        slots = [self.cache.allocate() for _ in range(min(2, self.cache.num_free))]
        try:
            self.forward([SeqInput(s, [0] * context) for s in slots], taps)
            for num in sorted({1, len(slots)}):
                for T in compiled.buckets:
                    self.forward([SeqInput(s, [0] * T) for s in slots[:num]], taps)
                    for s in slots[:num]:
                        self.cache.rollback(s, context)
        finally:
            for s in slots:
                self.cache.free(s)
