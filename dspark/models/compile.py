"""`torch.compile` of the decode/verify step: forward + logits over a few bucketed token counts.

The runner pads a step's token count T up to the next bucket and calls `CompiledStep`; longer
steps (prefill) stay eager. What the compiler sees is `CausalLM.step` over `CacheView`s, so
slot numbers and lengths are never Python ints in the graph:

- CPU (inductor, `options={"freezing": True}`): the context length S (and the batch B, once it is >= 2) are dynamic
  dimensions, T is static. One graph per (bucket, B == 1 or not, mask or not, tapped layers); a batch
  in scattered slots (a gather) runs eager. Under torch 2.13 that option does not freeze
  anything: dynamo lifts the parameters to graph inputs unless the *global*
  `torch._inductor.config.freezing` is on while it traces, so the linears run as `aten::mm`
  over the live weights. Forcing it (the config patched around the call) packs them for
  oneDNN/MKL, but measured no faster in bf16 (docs/performance.md), and it keeps a second
  copy of every weight, so it is not done.
- CUDA (`mode="reduce-overhead"`, CUDA graphs): shapes are fully static. The context spans
  the whole cache (`ForwardBatch.build(context=...)`), slots are gathered inside the graph
  from stores at fixed addresses, and there is one graph per (bucket, B).

Compiled code is cached on disk under `$DSPARK_CACHE/inductor` (inductor's FX graph cache;
tracing still runs in each new process), unless $TORCHINDUCTOR_CACHE_DIR was set before dspark
was imported. Without a C++ compiler, inductor cannot build CPU
kernels: `compile_step` prints one line and the model stays eager.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import torch

from dspark.kv.cache import KVCache
from dspark.models.transformer import SPARE_POSITIONS, CacheView, CausalLM, ForwardBatch
from dspark.paths import cache_dir

_USER_INDUCTOR_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # the user's choice, if any
TOKEN_BUCKETS = (1, 4, 8)  # decode (1) and verification of up to 7 drafts; few graphs to compile


def bucket_for(num_tokens: int, buckets: tuple[int, ...]) -> int | None:
    """Smallest bucket >= num_tokens; None past the largest (the step runs eager)."""
    return next((b for b in buckets if b >= num_tokens), None)


def use_inductor_cache() -> None:
    """Point inductor at `$DSPARK_CACHE/inductor`. Inductor writes its own default
    (/tmp/torchinductor_$USER) into the environment the first time it looks, which can happen
    while a model loads, so a plain `setdefault` would lose: callers run this first."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _USER_INDUCTOR_DIR or str(cache_dir() / "inductor")


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use for CPU kernels, if one is installed."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for n in names if (path := shutil.which(n))), None)


class CompiledStep:
    """forward + logits of one model, compiled lazily per bucket; called by `ModelRunner`."""

    def __init__(self, model: CausalLM, buckets: tuple[int, ...] = TOKEN_BUCKETS) -> None:
        if max(buckets) > SPARE_POSITIONS:
            raise ValueError(f"buckets above {SPARE_POSITIONS} tokens would write past the cache")
        self.model, self.buckets = model, tuple(sorted(buckets))
        self.static = model.lm_head.weight.device.type == "cuda"
        self.compile_s: dict[str, float] = {}  # "T=8 B=1": seconds of the first call (compilation)
        use_inductor_cache()
        # All graphs share one code object (`_forward_logits`): room for every bucket x variant.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        if self.static:
            self._fn = torch.compile(self._forward_logits, mode="reduce-overhead", dynamic=False)
        else:
            self._fn = torch.compile(self._forward_logits, dynamic=False, options={"freezing": True})

    def _forward_logits(self, input_ids: torch.Tensor, batch: ForwardBatch, view: CacheView,
                        taps: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        hidden, tapped = self.model.step(input_ids, batch, view, taps)
        return self.model.logits(hidden), hidden, tapped

    def padded_length(self, slots: list[int], num_new: list[int]) -> int | None:
        """T to pad this step to, or None to run it eager (too long, or a CPU gather)."""
        T = bucket_for(max(num_new), self.buckets)
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        return T if (self.static or contiguous) else None

    def build_batch(self, slots: list[int], starts: list[int], T: int, cache: KVCache,
                    sliding_window: int | None) -> ForwardBatch:
        """The batch of a padded step: every row has T tokens (pads land in the spare rows)."""
        context = cache.k_store[0].shape[2] if self.static else None
        return ForwardBatch.build(slots, starts, [T] * len(slots), cache.k_store[0].device, sliding_window,
                                  context=context)

    def __call__(self, input_ids: torch.Tensor, batch: ForwardBatch, cache: KVCache,
                 taps: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(logits (B, T, V) float32, hidden (B, T, d), taps) of a padded step."""
        B, T = input_ids.shape
        key = f"T={T} B={B if (self.static or B == 1) else '2+'}"
        if taps:  # the tapped layers are part of the graph
            key += f" taps={','.join(map(str, taps))}"
        if batch.sliding_mask is not None:
            key += " window"
        if key in self.compile_s:
            return self._run(input_ids, batch, cache, taps)
        print(f"dspark: compiling the decode/verify step ({key}; once per process, kernels cached on disk)",
              file=sys.stderr)
        t0 = time.perf_counter()
        out = self._run(input_ids, batch, cache, taps)
        self.compile_s[key] = time.perf_counter() - t0
        return out

    def _run(self, input_ids: torch.Tensor, batch: ForwardBatch, cache: KVCache,
             taps: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        view = batch.cache_view(cache, gather_in_graph=self.static)
        if self.static:
            for t in view.k + view.v:
                torch._dynamo.mark_static_address(t)  # the stores: written in place by the graph
            logits, hidden, tapped = self._fn(input_ids, batch, view, taps)
            # CUDA-graph outputs are overwritten by the next replay
            return logits.clone(), hidden.clone(), [t.clone() for t in tapped]
        _mark_dynamic(input_ids, batch, view)
        return self._fn(input_ids, batch, view, taps)


def _mark_dynamic(input_ids: torch.Tensor, batch: ForwardBatch, view: CacheView) -> None:
    """S (context) is always dynamic; B too once it is >= 2 (B == 1 keeps its own graph)."""
    for t in view.k + view.v:
        torch._dynamo.maybe_mark_dynamic(t, 2)
    for m in (batch.full_mask, batch.sliding_mask):
        if m is not None:
            torch._dynamo.maybe_mark_dynamic(m, 3)
    if input_ids.shape[0] < 2:
        return
    batch_dim = [input_ids, batch.positions, batch.write_tokens, batch.write_positions, view.write_rows,
                 *view.k, *view.v]
    for t in batch_dim + [m for m in (batch.full_mask, batch.sliding_mask) if m is not None]:
        torch._dynamo.maybe_mark_dynamic(t, 0)


def compile_step(model: CausalLM, buckets: tuple[int, ...] = TOKEN_BUCKETS) -> bool:
    """Attach a `CompiledStep` to `model` (the runner then uses it); False, with a one-line
    notice, where it cannot work (no C++ compiler for CPU kernels)."""
    if model.lm_head.weight.device.type == "cpu" and cpp_compiler() is None:
        print("dspark: no C++ compiler (g++/clang++, or $CXX) found, so torch.compile cannot build CPU "
              "kernels; running the eager forward (--no-compile silences this)", file=sys.stderr)
        return False
    model.compiled = CompiledStep(model, buckets)
    return True
