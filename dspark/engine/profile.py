"""SPS(B): the target's verification steps per second as a function of the batch size in
tokens, measured once per (model, dtype, compiled or eager, threads, machine) and cached. The
confidence scheduler trades verified tokens against this curve."""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from dspark.models.runner import ModelRunner, SeqInput
from dspark.paths import cache_dir
from dspark.spec.scheduler import StepCostProfile

DEFAULT_BATCH_TOKENS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
CONTEXT_TOKENS = 256  # cached context per sequence while profiling


def machine_key() -> str:
    info = f"{platform.machine()}|{platform.processor()}|{torch.get_num_threads()}|{torch.__version__}"
    if torch.cuda.is_available():
        info += "|" + torch.cuda.get_device_name()
    return hashlib.sha256(info.encode()).hexdigest()[:12]


def profile_path(model_name: str, dtype: str, compiled: bool = False) -> Path:
    """One file per model, dtype, compile setting and machine key (which holds the threads)."""
    safe = model_name.replace("/", "_")
    mode = "compiled" if compiled else "eager"
    return cache_dir() / "profiles" / f"{safe}-{dtype}-{mode}-{machine_key()}.json"


@torch.inference_mode()
def measure_sps(model: torch.nn.Module, batch_tokens: tuple[int, ...] = DEFAULT_BATCH_TOKENS,
                tokens_per_seq: int = 8, repeats: int = 5) -> dict[int, float]:
    """Median steps/s of one verification forward over B tokens, split into sequences of at
    most `tokens_per_seq` (anchor + drafts) with CONTEXT_TOKENS of cached context each."""
    max_seqs = max(1, -(-max(batch_tokens) // tokens_per_seq))
    cache = model.new_cache(max_seqs, CONTEXT_TOKENS + tokens_per_seq + 1)
    runner = ModelRunner(model, cache)
    runner.warm_up()  # a compiled step: compile its buckets before timing
    slots = [cache.allocate() for _ in range(max_seqs)]
    runner.forward([SeqInput(s, [1] * CONTEXT_TOKENS) for s in slots])
    result: dict[int, float] = {}
    for B in batch_tokens:
        sizes = [tokens_per_seq] * (B // tokens_per_seq) + ([B % tokens_per_seq] if B % tokens_per_seq else [])
        seqs = [SeqInput(slots[i], [2] * n) for i, n in enumerate(sizes)]
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            runner.forward(seqs)
            times.append(time.perf_counter() - t0)
            for s in seqs:
                cache.rollback(s.slot, CONTEXT_TOKENS)
        result[B] = 1.0 / statistics.median(times[1:])
    # A bigger batch never runs more steps per second; noise can make it look so.
    running = float("inf")
    for B in batch_tokens:
        running = result[B] = min(result[B], running)
    return result


def load_or_profile(target: object, dtype: str, max_batch_size: int = 16, block_size: int = 7,
                    refresh: bool = False) -> StepCostProfile:
    compiled = target.model.compiled is not None  # type: ignore[attr-defined]
    path = profile_path(target.name, dtype, compiled)  # type: ignore[attr-defined]
    if path.exists() and not refresh:
        return StepCostProfile.from_json(json.loads(path.read_text())["profile"])
    print(f"dspark: profiling SPS(B) for {target.name} ({dtype}, {'compiled' if compiled else 'eager'}, "  # type: ignore[attr-defined]
          f"{torch.get_num_threads()} threads); cached at {path}", file=sys.stderr)
    points = measure_sps(target.model, tokens_per_seq=block_size + 1)  # type: ignore[attr-defined]
    profile = StepCostProfile.from_points(points)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": target.name, "dtype": dtype, "compiled": compiled,  # type: ignore[attr-defined]
                               "threads": torch.get_num_threads(), "machine": machine_key(),
                               "points": points, "profile": profile.to_json()}, indent=1))
    tmp.replace(path)
    return profile
