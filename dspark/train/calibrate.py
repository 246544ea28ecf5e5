"""Sequential temperature scaling (STS) of the confidence head, position by position.

With raw logits z_k and observed "drafts 1..k all accepted" indicators y_k:
    for k = 1..K:  (T_k, b_k) = argmin loss( prod_{i<k} c_i * sigmoid(z_k / T + b),  y_k )
keeping the already calibrated c_i = sigmoid(z_i / T_i + b_i), i < k, fixed. The survival
estimate s_k is what the scheduler consumes, so it is s_k (not c_k alone) that must be
calibrated.

The offset b_k extends DSPARK.md's temperature-only STS. A temperature only sharpens or
flattens the head around 50%; when the head is biased (it learned acceptance on training
conversations, and held-out prompts are accepted less often) no temperature removes the
gap. On the shipped SmolLM2 drafter the temperature alone left position 1 at 5.2% ECE.
Ties prefer T closest to 1, then b closest to 0. The loss is log loss (see fit_calibration).

Degenerate positions: where the rounds that reached position k hold fewer than
MIN_OUTCOMES acceptances or rejections, no fit is attempted (a log-loss fit there drives T
to its smallest value and sends c_k to 0 or 1 by the sign of z). Such a position gets a flat
c_k = the smoothed conditional acceptance rate (a + 1/2) / (n + 1), through T = T_MAX (z/T
vanishes) and the matching offset: never a confidence near 1 where nothing was accepted.
Calibration is fitted separately on greedy and on sampled rounds (`dspark calibrate
--temperatures 0,1`), the two ways drafts are used.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

NUM_BINS = 15
T_GRID = torch.logspace(-1.5, 1.5, 61)  # 0.03 .. 31.6, log-spaced
B_GRID = torch.linspace(-3.0, 3.0, 61)  # logit offsets, step 0.1
MIN_OUTCOMES = 10  # acceptances and rejections a position needs before its (T, b) is fitted
T_FLAT = 1e4  # a position too thin to fit: z / T_FLAT ~ 0, c_k = sigmoid(b) = the smoothed rate


def ece(pred: torch.Tensor, obs: torch.Tensor, num_bins: int = NUM_BINS) -> float:
    """Expected calibration error with equal-width bins: sum_b |B|/n |mean(pred) - mean(obs)|."""
    if pred.numel() == 0:
        return float("nan")
    bins = (pred.clamp(0, 1) * num_bins).long().clamp(max=num_bins - 1)
    total = torch.zeros(num_bins).index_add_(0, bins, torch.ones_like(pred))
    gap = torch.zeros(num_bins).index_add_(0, bins, pred - obs.float()).abs()
    return float(gap.sum() / pred.numel()) if total.sum() else float("nan")


def auroc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Probability a random positive outscores a random negative (ties count half)."""
    pos, neg = score[label.bool()], score[~label.bool()]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def survival(conf_logits: torch.Tensor, temps: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """s_k = prod_{i<=k} sigmoid(z_i / T_i + b_i): (R, K) -> (R, K)."""
    b = torch.zeros_like(temps) if offsets is None else offsets
    return torch.cumprod(torch.sigmoid(conf_logits / temps + b), dim=-1)


def fit_calibration(conf_logits: torch.Tensor, num_accepted: torch.Tensor, t_grid: torch.Tensor = T_GRID,
                    b_grid: torch.Tensor = B_GRID, objective: str = "nll") -> tuple[torch.Tensor, torch.Tensor]:
    """conf_logits (R, K) raw z; num_accepted (R,) -> (temperatures (K,), offsets (K,)).

    `objective` "nll" (default) scores each (T, b) by the log loss of s_k against y_k;
    "ece" by ECE, as DSPARK.md states for temperatures alone. With an offset, ECE alone is
    also minimised by a useless constant (T -> large, sigmoid(b) = the base rate: zero ECE,
    no ranking left); log loss is a proper scoring rule and rewards keeping the ranking.
    ECE is still what we report.
    """
    if objective not in ("nll", "ece"):
        raise ValueError(f"unknown calibration objective {objective!r}")
    R, K = conf_logits.shape
    temps, offsets = torch.ones(K), torch.zeros(K)
    prefix = torch.ones(R)  # prod_{i<k} calibrated c_i
    tt, bb = torch.meshgrid(t_grid.double(), b_grid.double(), indexing="ij")
    tt, bb = tt.reshape(-1, 1), bb.reshape(-1, 1)  # (G, 1)
    # Tie-break: |log T| first, then |b| (identity-like calibrations win ties).
    rank = torch.tensor(sorted(range(tt.shape[0]), key=lambda i: (round(abs(math.log(float(tt[i]))), 9),
                                                                 abs(float(bb[i])))))
    for k in range(K):
        obs = num_accepted > k  # drafts 1..k+1 all accepted
        reached = num_accepted >= k  # drafts 1..k accepted: position k+1 was tried
        n, a = int(reached.sum()), int(obs.sum())
        if min(a, n - a) < MIN_OUTCOMES:  # too thin to fit: flat smoothed conditional rate
            rate = (a + 0.5) / (n + 1.0)
            temps[k], offsets[k] = T_FLAT, math.log(rate / (1 - rate))
            prefix = prefix * rate
            continue
        s = prefix.double()[None] * torch.sigmoid(conf_logits[:, k].double()[None] / tt + bb)  # (G, R)
        if objective == "nll":
            errors = torch.nn.functional.binary_cross_entropy(
                s.clamp(1e-9, 1 - 1e-9), obs.double()[None].expand_as(s), reduction="none").mean(1)
        else:
            errors = torch.tensor([ece(row.float(), obs) for row in s])
        ok = errors[rank] <= errors.min() + 1e-9
        g = int(rank[ok.nonzero()[0, 0]])
        temps[k], offsets[k] = float(tt[g]), float(bb[g])
        prefix = prefix * torch.sigmoid(conf_logits[:, k] / temps[k] + offsets[k])
    return temps, offsets


@dataclasses.dataclass
class PositionReport:
    position: int
    ece_before: float
    ece_after: float
    auroc: float  # of the survival estimate for "accepted through k"; unchanged by T > 0 per position
    auroc_after: float
    temperature: float
    offset: float
    num_rounds: int
    accept_rate: float
    ece_heldout: float | None = None  # two-fold cross-fit: each half scored by the other's fit
    ece_floor: float | None = None  # median ECE if the calibrated s_k were exactly right (sampling noise)


def ece_floor(pred: torch.Tensor, draws: int = 50, seed: int = 0) -> float:
    """Median ECE of `pred` against labels drawn from `pred` itself: what a perfectly
    calibrated predictor measures with this many rounds. ECEs near it are noise."""
    g = torch.Generator().manual_seed(seed)
    p = pred.float().clamp(0, 1)
    vals = [ece(p, torch.rand(p.shape, generator=g) < p) for _ in range(draws)]
    return float(torch.tensor(vals).median())


def cross_fitted_ece(conf_logits: torch.Tensor, num_accepted: torch.Tensor, **fit_kw: object) -> list[float]:
    """ECE per position of survival estimates that never saw their own rounds: fit on the
    first half of the rounds, score the second, and the other way round. Rounds are in
    prompt order, so the halves are (nearly) disjoint prompts."""
    R, K = conf_logits.shape
    half = R // 2
    parts = [(slice(0, half), slice(half, R)), (slice(half, R), slice(0, half))]
    scored = torch.empty(R, K)
    for fit_on, score in parts:
        t, b = fit_calibration(conf_logits[fit_on], num_accepted[fit_on], **fit_kw)
        scored[score] = survival(conf_logits[score], t, b).float()
    return [ece(scored[:, k], num_accepted > k) for k in range(K)]


def report(conf_logits: torch.Tensor, num_accepted: torch.Tensor, temps: torch.Tensor,
           offsets: torch.Tensor | None = None, references: bool = False) -> list[PositionReport]:
    """Per-position ECE and AUROC before/after; `references` adds the held-out ECE and the
    noise floor (a few more fits and simulations)."""
    K = conf_logits.shape[1]
    held = cross_fitted_ece(conf_logits, num_accepted) if references else [None] * K
    offsets = torch.zeros(K) if offsets is None else offsets
    before, after = survival(conf_logits, torch.ones(K)), survival(conf_logits, temps, offsets)
    out = []
    for k in range(K):
        obs = num_accepted > k
        rate = float(obs.float().mean()) if obs.numel() else float("nan")
        out.append(PositionReport(k + 1, ece(before[:, k], obs), ece(after[:, k], obs),
                                  auroc(before[:, k], obs), auroc(after[:, k], obs), float(temps[k]),
                                  float(offsets[k]), int(obs.numel()), rate, held[k],
                                  ece_floor(after[:, k]) if references else None))
    return out


def reliability_plot(path: str | Path, conf_logits: torch.Tensor, num_accepted: torch.Tensor,
                     temps: torch.Tensor, offsets: torch.Tensor | None = None, num_bins: int = 10) -> Path:
    """Reliability diagram of s_k before/after calibration, one panel per position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = conf_logits.shape[1]
    fig, axes = plt.subplots(1, K, figsize=(2.6 * K, 2.8), sharey=True, squeeze=False)
    for k, ax in enumerate(axes[0]):
        obs = (num_accepted > k).float()
        for temps_k, offs, label in ((torch.ones(K), None, "raw"), (temps, offsets, "calibrated")):
            s = survival(conf_logits, temps_k, offs)[:, k]
            bins = (s * num_bins).long().clamp(max=num_bins - 1)
            xs, ys = [], []
            for b in range(num_bins):
                sel = bins == b
                if sel.any():
                    xs.append(float(s[sel].mean()))
                    ys.append(float(obs[sel].mean()))
            ax.plot(xs, ys, "o-", ms=3, label=label)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_title(f"position {k + 1}")
        ax.set_xlabel("predicted survival")
    axes[0][0].set_ylabel("observed accepted-through-k")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
