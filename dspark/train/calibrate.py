"""Sequential temperature scaling (STS) of the confidence head, position by position.

With raw logits z_k and observed "drafts 1..k all accepted" indicators y_k:
    for k = 1..K:  T_k = argmin_T ECE( prod_{i<k} sigmoid(z_i / T_i) * sigmoid(z_k / T),  y_k )
keeping the already calibrated c_1..c_{k-1} fixed. The survival estimate s_k is what the
scheduler consumes, so it is s_k (not c_k alone) that must be calibrated.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

NUM_BINS = 15
T_GRID = torch.logspace(-1.5, 1.5, 121)  # 0.03 .. 31.6, log-spaced


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


def survival(conf_logits: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """s_k = prod_{i<=k} sigmoid(z_i / T_i): (R, K) -> (R, K)."""
    return torch.cumprod(torch.sigmoid(conf_logits / temps), dim=-1)


def fit_temperatures(conf_logits: torch.Tensor, num_accepted: torch.Tensor,
                     grid: torch.Tensor = T_GRID) -> torch.Tensor:
    """conf_logits (R, K) raw z; num_accepted (R,) -> temperatures (K,)."""
    R, K = conf_logits.shape
    temps = torch.ones(K)
    prefix = torch.ones(R)  # prod_{i<k} calibrated c_i
    for k in range(K):
        obs = num_accepted > k  # drafts 1..k+1 all accepted
        z = conf_logits[:, k]
        errors = torch.tensor([ece(prefix * torch.sigmoid(z / t), obs) for t in grid])
        best = (errors <= errors.min() + 1e-9).nonzero().squeeze(1)  # ties: the T closest to 1
        temps[k] = grid[best[grid[best].log().abs().argmin()]]
        prefix = prefix * torch.sigmoid(z / temps[k])
    return temps


@dataclasses.dataclass
class PositionReport:
    position: int
    ece_before: float
    ece_after: float
    auroc: float  # of the survival estimate for "accepted through k"; unchanged by T > 0 per position
    auroc_after: float
    temperature: float
    num_rounds: int
    accept_rate: float


def report(conf_logits: torch.Tensor, num_accepted: torch.Tensor,
           temps: torch.Tensor) -> list[PositionReport]:
    K = conf_logits.shape[1]
    before, after = survival(conf_logits, torch.ones(K)), survival(conf_logits, temps)
    out = []
    for k in range(K):
        obs = num_accepted > k
        rate = float(obs.float().mean()) if obs.numel() else float("nan")
        out.append(PositionReport(k + 1, ece(before[:, k], obs), ece(after[:, k], obs),
                                  auroc(before[:, k], obs), auroc(after[:, k], obs), float(temps[k]),
                                  int(obs.numel()), rate))
    return out


def reliability_plot(path: str | Path, conf_logits: torch.Tensor, num_accepted: torch.Tensor,
                     temps: torch.Tensor, num_bins: int = 10) -> Path:
    """Reliability diagram of s_k before/after calibration, one panel per position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = conf_logits.shape[1]
    fig, axes = plt.subplots(1, K, figsize=(2.6 * K, 2.8), sharey=True, squeeze=False)
    for k, ax in enumerate(axes[0]):
        obs = (num_accepted > k).float()
        for temps_k, label in ((torch.ones(K), "raw"), (temps, "calibrated")):
            s = survival(conf_logits, temps_k)[:, k]
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
