from __future__ import annotations

import torch

from dspark.train.calibrate import auroc, ece, fit_calibration, reliability_plot, report, survival


def test_ece_and_auroc_by_hand() -> None:
    pred = torch.tensor([0.9, 0.9, 0.1, 0.1])
    obs = torch.tensor([1, 0, 0, 0])
    # bin 0.9: |0.9 - 0.5| * 2/4 = 0.2; bin 0.1: |0.1 - 0| * 2/4 = 0.05
    assert abs(ece(pred, obs) - 0.25) < 1e-6
    # Unequal bins, gaps of both signs: 4 rounds at 0.9 (3 accepted: over-confident by 0.15)
    # and 2 at 0.2 (1 accepted: under-confident by 0.3).
    #   binned, weighted by bin size:  4/6 * 0.15 + 2/6 * 0.3 = 0.2
    #   unweighted mean over bins:     (0.15 + 0.3) / 2       = 0.225
    #   unbinned mean |pred - obs|:    (3 * 0.1 + 0.9 + 0.8 + 0.2) / 6 = 0.3667
    #   signed gaps (no abs per bin):  4/6 * 0.15 - 2/6 * 0.3 = 0
    pred = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.2, 0.2])
    obs = torch.tensor([1, 1, 1, 0, 1, 0])
    assert abs(ece(pred, obs) - 0.2) < 1e-6
    assert abs(ece(pred[[0, 4, 1, 5, 2, 3]], obs[[0, 4, 1, 5, 2, 3]]) - 0.2) < 1e-6  # order-free
    assert auroc(torch.tensor([0.2, 0.8, 0.5]), torch.tensor([0, 1, 0])) == 1.0
    assert auroc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == 0.5


def _overconfident(R: int = 4000, K: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """True per-position acceptance sigmoid(u_k); the head reports logits 4 * u_k."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(R, K, generator=g) * 1.5
    accepted = torch.rand(R, K, generator=g) < torch.sigmoid(u)
    num_accepted = accepted.long().cumprod(-1).sum(-1)  # length of the accepted prefix
    return 4 * u, num_accepted


def test_calibration_lowers_ece_on_overconfident_data(tmp_path) -> None:
    z, n = _overconfident()
    temps, offsets = fit_calibration(z, n)
    assert all(2.5 < t < 6.5 for t in temps.tolist())  # recovers T ~ 4
    assert all(abs(b) <= 0.3 for b in offsets.tolist())  # no bias to remove
    rows = report(z, n, temps, offsets)
    for r in rows:
        assert r.ece_after < 0.5 * r.ece_before and r.ece_after < 0.03
    zt, nt = _overconfident(seed=1)  # held out
    assert all(r.ece_after < r.ece_before for r in report(zt, nt, temps, offsets))
    assert reliability_plot(tmp_path / "rel.png", z, n, temps, offsets).stat().st_size > 1000


def test_offset_removes_a_bias_no_temperature_can() -> None:
    """The head ranks well but is 1.5 logits too optimistic everywhere (true rate ~0.2)."""
    g = torch.Generator().manual_seed(2)
    u = torch.randn(4000, 2, generator=g) - 1.5
    accepted = torch.rand(4000, 2, generator=g) < torch.sigmoid(u)
    n = accepted.long().cumprod(-1).sum(-1)
    z = u + 1.5
    temps_only, _ = fit_calibration(z, n, b_grid=torch.zeros(1), objective="ece")  # DSPARK.md's STS
    temps, offsets = fit_calibration(z, n)
    assert -1.8 < float(offsets[0]) < -1.2 and 0.8 < float(temps[0]) < 1.25
    s_t = survival(z, temps_only)[:, 0]
    s_tb = survival(z, temps, offsets)[:, 0]
    obs = n > 0
    assert ece(s_tb, obs) < 0.02 < ece(s_t, obs)
    assert auroc(s_tb, obs) > 0.7
    # a constant at the base rate has zero ECE too: log loss is what keeps the ranking
    assert ece(torch.full_like(s_tb, float(obs.float().mean())), obs) < 1e-6


def test_positions_nothing_was_accepted_at_get_a_flat_low_confidence() -> None:
    """The shipped fit had T = 0.04 where nothing was accepted: sigmoid(z / 0.04) is ~1
    wherever z > 0. A thin position gets the smoothed conditional rate instead."""
    from dspark.train.calibrate import MIN_OUTCOMES, survival

    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, 3, generator=g) * 3 + 2  # confident raw logits everywhere
    n = (torch.rand(400, generator=g) < 0.5).long()  # position 1: half accepted; 2 and 3: never
    temps, offsets = fit_calibration(z, n)
    s = survival(z, temps, offsets)
    reached2, acc2 = int((n >= 1).sum()), 0
    assert temps[1] > 100 and temps[2] > 100  # flat: z no longer matters
    c2 = s[:, 1] / s[:, 0]
    torch.testing.assert_close(c2, torch.full_like(c2, (acc2 + 0.5) / (reached2 + 1)), rtol=1e-3, atol=1e-6)
    assert float(s[:, 1:].max()) < 0.01  # never near 1 where nothing was accepted
    assert MIN_OUTCOMES <= min(int((n > 0).sum()), int((n == 0).sum()))  # position 1 was fitted
    assert temps[0] < 100


def test_cross_fitted_ece_scores_rounds_the_fit_never_saw() -> None:
    from dspark.train.calibrate import cross_fitted_ece

    z, n = _overconfident(R=4000)
    held = cross_fitted_ece(z, n)
    rows = report(z, n, *fit_calibration(z, n), references=True)
    assert [r.ece_heldout for r in rows] == held
    assert all(h < 0.04 and h < r.ece_before for h, r in zip(held, rows))
    # Few rounds: an in-sample fit looks better than it is; the held-out number does not.
    zs, ns = _overconfident(R=60, seed=3)
    small = report(zs, ns, *fit_calibration(zs, ns), references=True)
    assert sum(r.ece_heldout for r in small) > sum(r.ece_after for r in small)


def test_ece_floor_is_what_a_perfect_predictor_measures() -> None:
    from dspark.train.calibrate import ece_floor

    g = torch.Generator().manual_seed(4)
    p = torch.rand(2000, generator=g) * 0.6
    small, large = ece_floor(p[:300]), ece_floor(p)
    assert 0 < large < small < 0.1  # shrinks with more rounds, never zero
    truth = torch.rand(2000, generator=torch.Generator().manual_seed(5)) < p
    assert ece(p, truth) < 3 * large  # a perfectly calibrated predictor sits near its floor
    assert ece(torch.full_like(p, 0.9), truth) > 10 * large  # a wrong one does not
