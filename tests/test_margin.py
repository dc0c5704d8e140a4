"""Numerical margin: closed-form true margin of the linear-Gaussian VAE, bisection vs grid, bound <= margin on a
VAE trained on digits, one-at-a-time = batched, determinism, CLI, bad inputs."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from scipy import optimize, stats

from vaefast.margin import NumericalMargin, max_decisions, numerical_margin
from vaefast.testing import LinearGaussianVAE

torch.set_num_threads(1)

R = 1.0  # reconstruction radius for the linear model (p_r(x, 0) ~ 0.82, true margin ~ 0.226)
N = 20000  # max samples of the sequential test


def _radius_at(model: LinearGaussianVAE, r: float, p: float) -> float:
    """Exact attack radius (along the worst direction) at which p_r(x, delta) = p."""
    t = (r / model._scale()) ** 2
    lam = optimize.brentq(lambda lam: stats.ncx2.cdf(t, model.latent_dim, lam) - p, 1e-12, 1e3)
    return model.sigma * math.sqrt(lam) / float(model.singular_values()[0])


def _mc_band(model, r, n) -> tuple[float, float]:
    """Radii where the exact p_r is 1/2 -/+ 4 Monte-Carlo standard deviations at n samples: the decision at
    p = 1/2 can only be wrong inside this band."""
    c = 4 * 0.5 / math.sqrt(n)
    return _radius_at(model, r, 0.5 + c), _radius_at(model, r, 0.5 - c)


@pytest.fixture(scope="module")
def lin_margins(linear_vae):
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bis = numerical_margin(  # the default (secant) search; halving is checked against it below
        linear_vae, x, R, tol=0.005, box=None, num_samples=N, mode="mean", progress=False
    )
    true = linear_vae.true_margin(R)
    grid = numerical_margin(
        linear_vae,
        x,
        R,
        method="grid",
        granularity=0.01,
        max_radius=true + 0.05,
        box=None,
        num_samples=N,
        mode="mean",
        progress=False,
    )
    return x, bis, grid


def test_bisection_matches_true_margin(linear_vae, lin_margins):
    _, bis, _ = lin_margins
    lo, hi = _mc_band(linear_vae, R, N)
    assert lo < linear_vae.true_margin(R) < hi
    assert bool(bis.bracketed.all())
    # margin = upper end of a bracket of width <= tol whose ends were decided correctly outside the MC band
    assert bool((bis.margin >= lo).all() and (bis.margin <= hi + 0.005).all()), (bis.margin, lo, hi)
    assert all(len(e) >= 3 for e in bis.evaluations)


def test_halving_strategy_matches_true_margin(linear_vae, lin_margins):
    """The previous search (doubling, then halving: ``strategy="halving"``) is right too; the default secant search
    reaches the same band with fewer decisions per point."""
    x, secant, _ = lin_margins
    halving = numerical_margin(
        linear_vae, x, R, strategy="halving", tol=0.005, box=None, num_samples=N, mode="mean", progress=False
    )
    lo, hi = _mc_band(linear_vae, R, N)
    assert bool((halving.margin >= lo).all() and (halving.margin <= hi + 0.005).all()), (halving.margin, lo, hi)
    assert bool(((halving.margin - halving.lower) <= 0.005 + 1e-12).all())
    n_secant = sum(len(e) for e in secant.evaluations)
    n_halving = sum(len(e) for e in halving.evaluations)
    assert n_secant < n_halving, (n_secant, n_halving)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_secant_attacks_find_the_worst_direction(seed):
    """Attack strength of the default search where random starts converge slowly: a linear-Gaussian VAE whose top
    two singular values are close (1.71, 1.35), 25 attack steps. Along the worst direction the test's threshold
    (p_hat <= 0.446 at this level) is reached at 0.389 (true margin 0.334); 4 Monte-Carlo standard deviations
    further and one tol give 0.47. A secant search whose first round ran short warm-start attacks ended at 0.50 on
    point 1: its chain of short attacks stayed near the second singular direction (gain 1.36 instead of 1.71)."""
    model = LinearGaussianVAE(seed=1, input_dim=12, latent_dim=3, sigma=0.5, decoder_scale=1.5)
    x = torch.rand(6, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5 + 0.25
    res = numerical_margin(model, x, 1.4, tol=0.02, num_samples=1024, steps=25, mode="mean", box=None, seed=seed,
                           progress=False)  # fmt: skip
    limit = _radius_at(model, 1.4, 0.446 - 4 * 0.5 / math.sqrt(1024)) + 0.02
    assert bool(res.bracketed.all())
    assert bool((res.margin >= model.true_margin(1.4)).all())
    assert bool((res.margin <= limit).all()), (res.margin, limit)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(tol=0.005),  # the default search (secant)
        dict(tol=0.005, strategy="halving"),
        dict(tol=0.05, max_radius=0.3, start_radius=0.001),  # tiny start: growth must speed up to meet its budget
        dict(tol=1e-4, max_radius=0.24, start_radius=0.2),  # margin near the cap, narrow tolerance
        dict(tol=0.02, decision="fixed", num_samples=2000),
    ],
)
def test_every_search_stays_within_its_bonferroni_budget(linear_vae, kwargs):
    """A point's search makes at most D = max_decisions(...) decisions (the clean point included), the divisor of
    its per-decision level, whatever the radii it chooses; the brackets close at tol."""
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    kw = dict(box=None, num_samples=4000, mode="mean", steps=20, progress=False) | kwargs
    res = numerical_margin(linear_vae, x, R, **kw)
    start = kw.get("start_radius", max(2 * kw["tol"], 0.25))
    budget = max_decisions("bisection", res.max_radius, start, kw["tol"], 0.01)
    assert max(len(e) for e in res.evaluations) <= budget, (res.evaluations, budget)
    ok = res.bracketed & (res.margin > 0)
    assert bool(ok.any())
    assert bool((res.margin[ok] - res.lower[ok] <= kw["tol"] + 1e-12).all())
    assert bool((res.p_hat_delta[ok] <= 0.5).all())


def test_secant_margin_of_a_point_is_the_same_alone_and_in_a_batch(linear_vae, digits_setup):
    """The search is per point (radii, attacks and decisions keyed by the global point id), so a point gets the same
    margin, evidence and evaluations alone (``point_offset`` = its id) as in a batch, given the same search limits."""
    xl = torch.randn(5, 12, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    model, xd, _ = digits_setup
    cases = [
        (linear_vae, xl, R, dict(box=None, num_samples=2000, mode="mean", steps=15, tol=0.01)),
        (model, xd[:6], 1.5, dict(max_radius=2.0, num_samples=500, steps=15, tol=0.02)),
    ]
    for m, x, r, kw in cases:
        whole = numerical_margin(m, x, r, seed=3, point_offset=20, progress=False, **kw)
        for i in range(x.shape[0]):
            alone = numerical_margin(m, x[i : i + 1], r, seed=3, point_offset=20 + i, progress=False, **kw)
            flat = [v for pair in whole.evaluations[i] for v in pair]
            assert [v for pair in alone.evaluations[0] for v in pair] == pytest.approx(flat, rel=1e-9, abs=1e-12)
            assert float(alone.margin[0]) == pytest.approx(float(whole.margin[i]), rel=1e-9, abs=1e-12)
            assert int(alone.hits_delta[0]) == int(whole.hits_delta[i])
            torch.testing.assert_close(alone.delta[0], whole.delta[i], rtol=1e-5, atol=1e-6)


def test_grid_agrees_with_bisection_and_truth(linear_vae, lin_margins):
    _, bis, grid = lin_margins
    lo, hi = _mc_band(linear_vae, R, N)
    assert bool((grid.margin >= lo - 0.01).all() and (grid.margin <= hi).all()), (grid.margin, lo, hi)
    assert bool(((grid.margin - bis.margin).abs() <= 0.005 + 0.01 + (hi - lo)).all())
    assert bool(grid.bracketed.all())


def test_original_protocol_path(linear_vae):
    """grid + one point at a time + L-BFGS-B attacks + fixed sample count (the benchmark's protocol)."""
    x = torch.randn(2, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    true = linear_vae.true_margin(R)
    res = numerical_margin(
        linear_vae,
        x,
        R,
        method="grid",
        granularity=0.02,
        max_radius=true + 0.05,
        box=None,
        num_samples=N,
        decision="fixed",
        optimizer="lbfgsb",
        steps=30,
        mode="mean",
        one_at_a_time=True,
        progress=False,
    )
    lo, hi = _mc_band(linear_vae, R, N)
    assert bool((res.margin >= lo - 0.02).all() and (res.margin <= hi).all()), (res.margin, lo, hi)
    assert all(len(e) >= 2 for e in res.evaluations)


def test_mean_var_attack_margin(linear_vae):
    x = torch.randn(2, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = numerical_margin(
        linear_vae, x, R, tol=0.005, box=None, num_samples=N, num_noise_samples=64, restarts=2, progress=False
    )
    lo, hi = _mc_band(linear_vae, R, N)
    assert bool((res.margin >= lo).all() and (res.margin <= hi + 0.005).all()), res.margin


def test_not_robust_points_get_zero_and_unbracketed(linear_vae):
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    low_r = 0.5 * linear_vae.r_star()  # p_r(x, 0) < 1/2
    res = numerical_margin(linear_vae, x, low_r, box=None, num_samples=2000, progress=False)
    assert bool((res.margin == 0).all()) and bool(res.bracketed.all())
    capped = numerical_margin(linear_vae, x, R, box=None, max_radius=0.1, num_samples=2000, mode="mean", progress=False)
    assert bool((capped.margin == 0.1).all()) and not bool(capped.bracketed.any())
    grid = numerical_margin(
        linear_vae,
        x,
        R,
        method="grid",
        granularity=0.05,
        max_radius=0.1,
        box=None,
        num_samples=2000,
        mode="mean",
        progress=False,
    )
    assert bool((grid.margin == 0.1).all()) and not bool(grid.bracketed.any())


def test_deterministic_and_one_at_a_time(linear_vae):
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = dict(box=None, num_samples=2000, tol=0.02, mode="mean", steps=20, progress=False)
    a = numerical_margin(linear_vae, x, R, seed=7, **kw)
    b = numerical_margin(linear_vae, x, R, seed=7, **kw)
    assert torch.equal(a.margin, b.margin) and a.evaluations == b.evaluations
    single = numerical_margin(linear_vae, x, R, seed=7, one_at_a_time=True, **kw)
    torch.testing.assert_close(single.margin, a.margin)
    rows = a.to_rows()
    assert isinstance(a, NumericalMargin) and len(rows) == 3 and rows[0]["method"] == "bisection"


@pytest.fixture(scope="module")
def digits_setup(digits_vae, digits, digits_vae_run):
    """The shared trained digits VAE, 24 test points and its run folder."""
    return digits_vae, digits[1].x[:24], digits_vae_run


def test_bound_below_numerical_margin_on_digits(digits_setup):
    from vaefast.robustness import margin_bound

    model, x, _ = digits_setup
    r = 1.5
    res = numerical_margin(model, x, r, num_samples=1000, steps=30, progress=False)
    bound = margin_bound(model, x, r, num_samples=1000)
    assert bool((res.margin > 0).any())
    assert (bound.bound <= res.margin).double().mean().item() >= 0.95
    assert (bound.whitened_bound <= res.margin).double().mean().item() >= 0.95
    # every decision radius respected the box's farthest corner
    assert all(rad <= float(res.max_radius[i]) + 1e-9 for i, ev in enumerate(res.evaluations) for rad, _ in ev)


def test_evidence_breaks_r_robustness_at_the_margin(digits_setup):
    """Every bracketed margin > 0 comes with the δ that broke r-robustness: ‖δ‖ = margin, inside the box, and the
    p̂ the search saw there (<= 1/2) replays exactly from the search's own stream."""
    from vaefast.robustness import is_r_robust

    model, x, _ = digits_setup
    r, tol = 1.5, 0.02
    res = numerical_margin(model, x, r, num_samples=500, steps=20, tol=tol, seed=5, point_offset=100, progress=False)
    ok = (res.margin > 0) & res.bracketed
    assert bool(ok.any()) and res.delta.shape == x.shape
    norms = res.delta.flatten(1).double().norm(dim=1)
    torch.testing.assert_close(norms[ok], res.margin[ok], rtol=1e-5, atol=0)
    assert bool((norms[~ok] == 0).all())
    adv = x + res.delta
    assert float(adv.min()) >= -1e-6 and float(adv.max()) <= 1 + 1e-6
    assert bool((res.upper[ok] == res.margin[ok]).all())
    assert bool((res.lower[ok] < res.margin[ok]).all() and (res.margin[ok] - res.lower[ok] <= tol + 1e-12).all())
    assert bool((res.p_hat_delta[ok] <= 0.5).all())
    assert bool(
        (res.ci_low_delta[ok] <= res.p_hat_delta[ok]).all() and (res.p_hat_delta[ok] <= res.ci_high_delta[ok]).all()
    )
    torch.testing.assert_close(res.p_hat_delta[ok], res.hits_delta[ok].double() / res.samples_delta[ok].double())
    i = int(ok.nonzero()[0])
    decisions = max_decisions("bisection", res.max_radius, min(0.25, float(res.max_radius.min()) / 4), tol, 0.01)
    level = 1 - 0.05 / decisions  # each decision of the search at the Bonferroni level
    replay = is_r_robust(
        model, x[i : i + 1], r, delta=res.delta[i : i + 1], max_samples=500, seed=5, point_offset=100 + i,
        confidence=level,
    )  # fmt: skip
    assert not bool(replay.robust[0]) and bool(replay.decided[0])
    assert int(replay.hits[0]) == int(res.hits_delta[i]) and int(replay.samples_used[0]) == int(res.samples_delta[i])


def test_one_clean_point_decision_with_the_bound(linear_vae):
    """At r = r* (p_r(x, 0) = 1/2 exactly: every point is borderline) the bound and the search decide the clean
    point from one estimate: certified exactly when the margin is > 0."""
    from vaefast.robustness import estimate_r_robustness, margin_bound

    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    r = linear_vae.r_star()
    est = estimate_r_robustness(linear_vae, x, r, num_samples=1000, seed=3)
    mb = margin_bound(linear_vae, x, r, estimate=est)
    assert 0 < int(mb.certified.sum()) < 16  # borderline: both outcomes occur
    nm = numerical_margin(
        linear_vae, x, r, box=None, num_samples=1000, mode="mean", steps=10, seed=3, estimate=est, progress=False
    )
    assert torch.equal(nm.margin > 0, mb.certified)
    assert torch.equal(nm.p_hat_delta[~mb.certified], est.p_hat[~mb.certified, 0])  # δ = 0 is its own evidence
    with pytest.raises(ValueError, match="no column for r"):
        numerical_margin(linear_vae, x, 2 * r, box=None, estimate=est, progress=False)
    with pytest.raises(ValueError, match="covers 16 points"):
        numerical_margin(linear_vae, x[:3], r, box=None, estimate=est, progress=False)


def test_grid_evidence_and_one_at_a_time_evidence(linear_vae):
    x = torch.randn(2, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kw = dict(box=None, num_samples=2000, mode="mean", steps=15, seed=2, progress=False)
    grid = numerical_margin(linear_vae, x, R, method="grid", granularity=0.05, max_radius=0.5, **kw)
    assert bool(grid.bracketed.all()) and bool((grid.margin > 0).all())
    torch.testing.assert_close(grid.upper, grid.margin + 0.05)
    torch.testing.assert_close(grid.delta.flatten(1).norm(dim=1), grid.upper)
    assert bool((grid.p_hat_delta <= 0.5).all())
    batched = numerical_margin(linear_vae, x, R, tol=0.02, **kw)
    single = numerical_margin(linear_vae, x, R, tol=0.02, one_at_a_time=True, **kw)
    torch.testing.assert_close(single.delta, batched.delta)
    torch.testing.assert_close(single.hits_delta, batched.hits_delta)


def test_cli_margin(digits_setup, tmp_path, capsys):
    from vaefast.cli import main

    _, _, run = digits_setup
    out = tmp_path / "margins.csv"
    code = main(
        [
            "margin",
            str(run),
            "--data",
            "digits",
            "--points",
            "4",
            "--r",
            "1.5",
            "--steps",
            "10",
            "--samples",
            "500",
            "--out",
            str(out),
            "--bound",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "median" in text and "comparable points (certified and bracketed)" in text
    assert "not r-robust at delta = 0" in text and "unbracketed" in text
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and float(rows[0]["margin"]) >= 0 and "bound" in rows[0]
    assert main(["margin", str(run), "--points", "0", "--r", "1.0"]) == 2


def test_bad_inputs(linear_vae, digits_setup):
    model, x, _ = digits_setup
    xl = torch.randn(2, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="method"):
        numerical_margin(linear_vae, xl, R, method="newton", box=None)
    with pytest.raises(ValueError, match="r must"):
        numerical_margin(linear_vae, xl, 0.0, box=None)
    with pytest.raises(ValueError, match="tol"):
        numerical_margin(linear_vae, xl, R, tol=-1.0, box=None)
    with pytest.raises(ValueError, match="outside box"):
        numerical_margin(linear_vae, xl, R)
    with pytest.raises(ValueError, match="x must have shape"):
        numerical_margin(linear_vae, torch.randn(2, 5, dtype=torch.float64), R, box=None)
    with pytest.raises(ValueError, match="max_radius"):
        numerical_margin(model, x[:2], 1.5, max_radius=100.0)
    with pytest.raises(ValueError, match="decision"):
        numerical_margin(linear_vae, xl, R, box=None, decision="bayes")
    with pytest.raises(ValueError, match="strategy"):
        numerical_margin(linear_vae, xl, R, box=None, strategy="newton")
    with pytest.raises(TypeError, match="num_samples"):
        numerical_margin(linear_vae, xl, R, box=None, num_samples=1.5)
