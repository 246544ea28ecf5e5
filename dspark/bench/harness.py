"""Run several decoding methods over the same prompts in one process and aggregate.

Every method sees the same prompts, sampling parameters and target weights; `ar` always
runs first and is the reference for `speedup_vs_ar` and `identical_to_ar`. Performance
numbers are ratios measured side by side in one invocation, never across runs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable

from tqdm import tqdm

from dspark.bench.datasets import Prompt
from dspark.engine.engine import Engine, StepStats
from dspark.engine.sequence import RequestOutput
from dspark.spec.sampling import SamplingParams


@dataclasses.dataclass
class PromptResult:
    prompt_id: str
    category: str
    token_ids: list[int]
    wall_s: float  # decode time of this request (admission to finish)
    num_verify_steps: int
    drafted_per_position: list[int]
    accepted_per_position: list[int]
    reached_per_position: list[int]


@dataclasses.dataclass
class RunResult:
    """One (method, policy, concurrency) over all prompts; categories run one after another."""

    key: str
    concurrency: int
    prompts: list[PromptResult]
    wall_by_category: dict[str, float]
    # process CPU seconds per category: on a shared machine, unlike wall time, it does not
    # count the time other jobs held the cores (with one torch thread it approximates an idle core)
    cpu_by_category: dict[str, float] = dataclasses.field(default_factory=dict)
    steps: list[StepStats] = dataclasses.field(default_factory=list)


def _to_result(p: Prompt, out: RequestOutput) -> PromptResult:
    return PromptResult(p.id, p.category, out.token_ids, out.decode_s, out.num_verify_steps,
                        out.drafted_per_position, out.accepted_per_position, out.reached_per_position)


def run_engine(key: str, engine: Engine, prompts: list[Prompt], encode: Callable[[Prompt], list[int]],
               params: SamplingParams, concurrency: int, bar: tqdm | None = None) -> RunResult:
    """Requests arrive continuously: all are queued and the engine keeps `concurrency` in
    flight (its batch size), admitting the next as one finishes. At concurrency 1 the
    categories run one after another (a clean wall clock each); above it every prompt is in
    the same pool, and a category's wall clock spans its first admission to its last finish."""
    if concurrency > engine.config.max_batch_size:
        raise ValueError(f"concurrency {concurrency} exceeds the engine's batch size "
                         f"{engine.config.max_batch_size}")
    results: list[PromptResult] = []
    walls: dict[str, float] = {}
    steps: list[StepStats] = []
    groups = _by_category(prompts) if concurrency == 1 else [("*", list(prompts))]
    cpus: dict[str, float] = {}
    for category, group in groups:
        t0, c0 = time.perf_counter(), time.process_time()
        ids = [engine.add_request(encode(p), params.nth(i)) for i, p in enumerate(group)]
        while engine.has_work:
            stats = engine.step()
            steps.append(stats)
            if bar is not None:
                bar.update(stats.emitted + stats.num_prefill)
        outs = [engine.pop_finished(i) for i in ids]
        results += [_to_result(p, o) for p, o in zip(group, outs)]
        cpus[category] = time.process_time() - c0
        if category != "*":
            walls[category] = time.perf_counter() - t0
            continue
        for cat, _ in _by_category(group):
            mine = [o for p, o in zip(group, outs) if p.category == cat]
            walls[cat] = max(o.finish_time for o in mine) - min(o.admit_time for o in mine)
        walls["*"] = time.perf_counter() - t0
    return RunResult(key, concurrency, results, walls, cpu_by_category=cpus, steps=steps)


def run_callable(key: str, prompts: list[Prompt], generate: Callable[[Prompt], list[int]],
                 bar: tqdm | None = None) -> RunResult:
    """Peers that decode one prompt at a time (transformers' generate)."""
    results: list[PromptResult] = []
    walls: dict[str, float] = {}
    cpus: dict[str, float] = {}
    for category, group in _by_category(prompts):
        t0, c0 = time.perf_counter(), time.process_time()
        for p in group:
            t = time.perf_counter()
            ids = generate(p)
            results.append(PromptResult(p.id, p.category, ids, time.perf_counter() - t, 0, [], [], []))
            if bar is not None:
                bar.update(len(ids))
        walls[category] = time.perf_counter() - t0
        cpus[category] = time.process_time() - c0
    return RunResult(key, 1, results, walls, cpu_by_category=cpus)


def _by_category(prompts: Iterable[Prompt]) -> list[tuple[str, list[Prompt]]]:
    groups: dict[str, list[Prompt]] = {}
    for p in prompts:
        groups.setdefault(p.category, []).append(p)
    return list(groups.items())


# -- aggregation ---------------------------------------------------------------------------
def summarize(run: RunResult, ar: RunResult | None, greedy: bool) -> dict[str, object]:
    """Per category and overall: the fields `results.json` promises."""
    out: dict[str, object] = {"concurrency": run.concurrency}
    cats = sorted(c for c in run.wall_by_category if c != "*")
    for cat in cats + ["overall"]:
        rows = [r for r in run.prompts if cat == "overall" or r.category == cat]
        wall = _overall_wall(run) if cat == "overall" else run.wall_by_category[cat]
        ar_rows = None if ar is None else [r for r in ar.prompts if cat == "overall" or r.category == cat]
        out[cat] = _stats(rows, wall, ar_rows, ar, cat, greedy, run)
    if run.steps:
        out["overall"].update(_step_stats(run.steps))  # type: ignore[union-attr]
    return out


def _stats(rows: list[PromptResult], wall: float, ar_rows: list[PromptResult] | None,
           ar: RunResult | None, cat: str, greedy: bool, run: RunResult) -> dict[str, object]:
    new_tokens = sum(len(r.token_ids) for r in rows)
    tps = new_tokens / wall if wall > 0 else 0.0
    steps = sum(r.num_verify_steps for r in rows)
    drafted = _sum_lists([r.drafted_per_position for r in rows])
    accepted = _sum_lists([r.accepted_per_position for r in rows])
    reached = _sum_lists([r.reached_per_position for r in rows])
    speedup = None
    if ar is not None and ar_rows is not None:
        ar_wall = _overall_wall(ar) if cat == "overall" else ar.wall_by_category[cat]
        ar_tps = sum(len(r.token_ids) for r in ar_rows) / ar_wall if ar_wall > 0 else 0.0
        speedup = tps / ar_tps if ar_tps > 0 else None
    identical = None
    if greedy and ar_rows is not None:
        ref = {r.prompt_id: r.token_ids for r in ar_rows}
        identical = sum(ref.get(r.prompt_id) == r.token_ids for r in rows) / max(1, len(rows))
    per_user = [len(r.token_ids) / r.wall_s for r in rows if r.wall_s > 0]
    cpu = _cpu(run, cat)
    ar_cpu = _cpu(ar, cat) if ar is not None else None
    per_cpu = new_tokens / cpu if cpu else None
    ar_per_cpu = (sum(len(r.token_ids) for r in ar_rows) / ar_cpu) if (ar_rows and ar_cpu) else None
    return {
        "prompts": len(rows),
        "new_tokens": new_tokens,
        "wall_s": wall,
        "tokens_per_s": tps,
        "per_user_tokens_per_s": sum(per_user) / len(per_user) if per_user else 0.0,
        "speedup_vs_ar": speedup,
        "tokens_per_cpu_s": per_cpu,  # new tokens per second of process CPU time
        "speedup_vs_ar_cpu": per_cpu / ar_per_cpu if (per_cpu and ar_per_cpu) else None,
        # tokens per target verification (bonus included); the prefill token is not a verification
        "mean_accepted_length": (new_tokens - len(rows)) / steps if steps else None,
        # conditional acceptance: P(draft j accepted | drafts < j accepted and j was drafted)
        "accepted_per_position": [a / n if n else None for a, n in zip(accepted, reached)],
        "drafted_per_position": drafted,
        "identical_to_ar": identical,
    }


def _cpu(run: RunResult, cat: str) -> float | None:
    cpus = run.cpu_by_category
    if not cpus:
        return None
    return sum(cpus.values()) if cat == "overall" else cpus.get(cat)


def _overall_wall(run: RunResult) -> float:
    walls = run.wall_by_category
    return walls["*"] if "*" in walls else sum(walls.values())


def _step_stats(steps: list[StepStats]) -> dict[str, object]:
    rounds = [s for s in steps if s.num_seqs]
    drafted = sum(s.drafted for s in rounds)
    accepted = sum(s.accepted for s in rounds)
    return {
        "verify_tokens_per_request_step": (sum(s.verify_tokens for s in rounds) / sum(s.num_seqs for s in rounds)
                                           if rounds else None),
        "rejected_draft_share": (drafted - accepted) / drafted if drafted else None,
        "verified_draft_tokens": drafted,
        "rejected_draft_tokens": drafted - accepted,
        "time_split_s": {"prefill": sum(s.prefill_s for s in steps), "propose": sum(s.propose_s for s in steps),
                         "verify": sum(s.verify_s for s in steps)},
    }


def _sum_lists(lists: list[list[int]]) -> list[int]:
    acc: list[int] = []
    for xs in lists:
        while len(acc) < len(xs):
            acc.append(0)
        for i, x in enumerate(xs):
            acc[i] += x
    return acc
