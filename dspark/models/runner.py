"""Model runner: one target forward over the new tokens of several sequences.

The runner owns nothing but the call: the engine owns the `KVCache` and decides what to
keep. A forward over `tokens` for a sequence whose slot holds `start` tokens writes their
K/V at positions [start, start + n) and advances the slot length by n; the caller rolls
back whatever it does not commit.
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
        T = max(counts)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : counts[b]] = torch.tensor(s.tokens)
        batch = ForwardBatch.build([s.slot for s in seqs], starts, counts, self.device, self._window)
        hidden, tapped = self.model(ids.to(self.device), batch, self.cache, taps)  # (B, T, d)
        for s, n in zip(seqs, counts):
            self.cache.lengths[s.slot] += n
        if last_only:
            rows = torch.tensor(counts, device=self.device) - 1
            last = hidden[torch.arange(len(seqs), device=self.device), rows]  # (B, d)
            logits = self.model.logits(last)
            out_logits = [logits[b : b + 1] for b in range(len(seqs))]
        else:
            flat = self.model.logits(hidden)  # (B, T, V)
            out_logits = [flat[b, :n] for b, n in enumerate(counts)]
        out_taps = None
        if taps:
            stacked = torch.stack(tapped, dim=2)  # (B, T, m, d)
            out_taps = [stacked[b, :n] for b, n in enumerate(counts)]
        return RunnerOutput(out_logits, [hidden[b, :n] for b, n in enumerate(counts)], out_taps)
