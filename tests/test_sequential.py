"""Clopper–Pearson intervals and the sequential r-robustness test (vaefast.stats, vaefast.is_r_robust)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from vaefast.robustness import estimate_r_robustness, is_r_robust
from vaefast.stats import (
    clopper_pearson,
    clopper_pearson_one_sided,
    futile,
    largest_decidable_not_robust,
    sequential_decision,
    sequential_schedule,
)
from vaefast.testing import LinearGaussianVAE

D, d = 8, 2


@pytest.fixture(scope="module")
def lg() -> LinearGaussianVAE:
    return LinearGaussianVAE(input_dim=D, latent_dim=d, sigma=0.4, decoder_scale=1.0, seed=2)


def _radius_for(model: LinearGaussianVAE, p: float) -> float:
    return model._scale() * math.sqrt(stats.chi2.ppf(p, model.latent_dim))


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- Clopper–Pearson ----------------------------------------------------------------------------------------------
def test_clopper_pearson_matches_scipy_binomtest() -> None:
    cases = [(0, 10), (10, 10), (3, 10), (1, 1), (0, 1), (500, 1000), (999, 1000), (17, 40)]
    for conf in (0.9, 0.95, 0.99):
        low, high = clopper_pearson(torch.tensor([k for k, _ in cases]), torch.tensor([n for _, n in cases]), conf)
        for i, (k, n) in enumerate(cases):
            ref = stats.binomtest(k, n).proportion_ci(confidence_level=conf, method="exact")
            assert low[i].item() == pytest.approx(ref.low, abs=1e-12)
            assert high[i].item() == pytest.approx(ref.high, abs=1e-12)


def test_one_sided_limits_are_two_sided_at_double_alpha() -> None:
    k = torch.arange(0, 51)
    lo1, hi1 = clopper_pearson_one_sided(k, 50, 0.025)
    lo2, hi2 = clopper_pearson(k, 50, 0.95)
    assert torch.allclose(lo1, lo2) and torch.allclose(hi1, hi2)
    assert bool((lo1 <= k / 50).all() and (k / 50 <= hi1).all())


def test_clopper_pearson_bad_inputs() -> None:
    with pytest.raises(ValueError, match="confidence"):
        clopper_pearson(torch.tensor([1]), 10, 1.5)
    with pytest.raises(ValueError, match="hits"):
        clopper_pearson(torch.tensor([11]), 10)
    with pytest.raises(ValueError, match="alpha"):
        clopper_pearson_one_sided(torch.tensor([1]), 10, 0.0)


def test_schedule_doubles_and_ends_at_max() -> None:
    assert sequential_schedule(10000) == [32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 10000]
    assert sequential_schedule(64) == [32, 64]
    assert sequential_schedule(20) == [20]
    with pytest.raises(ValueError, match="max_samples"):
        sequential_schedule(0)


def test_sequential_decision_rule() -> None:
    yes, no = sequential_decision(torch.tensor([32, 0, 16, 25]), 32, 0.005)
    assert yes.tolist() == [True, False, False, True]
    assert no.tolist() == [False, True, False, False]


@pytest.mark.parametrize(("n", "alpha"), [(32, 0.005), (100, 0.02), (1000, 0.05 / 22 / 6), (4096, 1e-4)])
def test_cached_critical_counts_are_the_clopper_pearson_rule(n: int, alpha: float) -> None:
    """The decisions come from two cached critical counts; for every count they equal the limits' comparison."""
    k = torch.arange(n + 1)
    low, high = clopper_pearson_one_sided(k, n, alpha)
    yes, no = sequential_decision(k, n, alpha)
    assert torch.equal(yes, low > 0.5) and torch.equal(no, high <= 0.5)
    p_star = largest_decidable_not_robust(n, alpha)
    assert p_star == (float(k[high <= 0.5].max()) / n if bool((high <= 0.5).any()) else -1.0)
    stop = futile(k, n, 0.01, p_star)
    assert torch.equal(stop, clopper_pearson_one_sided(k, n, 0.01)[0] > p_star)


def test_futility_never_changes_a_not_robust_decision(lg: LinearGaussianVAE) -> None:
    """With futility a point may stop early, undecided, but every point decided not robust is decided so without
    futility too, after the same samples (so the margin search's evidence replays with the plain test)."""
    x = _x(300)
    for p in (0.42, 0.47, 0.52):
        r = _radius_for(lg, p)
        plain = is_r_robust(lg, x, r, max_samples=1000, seed=5, confidence=0.99)
        fut = is_r_robust(lg, x, r, max_samples=1000, seed=5, confidence=0.99, futility=0.01)
        broken = fut.decided & ~fut.robust
        assert bool((plain.decided & ~plain.robust)[broken].all())
        assert torch.equal(plain.samples_used[broken], fut.samples_used[broken])
        assert torch.equal(plain.hits[broken], fut.hits[broken])
        assert bool((fut.samples_used <= plain.samples_used).all())
        if p == 0.52:  # above the boundary: futility stops most points before the last round
            assert fut.samples_used.double().mean() < plain.samples_used.double().mean()


# --- is_r_robust --------------------------------------------------------------------------------------------------
def test_far_points_cost_at_most_64_samples(lg: LinearGaussianVAE) -> None:
    x = _x(200)
    for p, truth in ((0.99, True), (0.01, False), (0.9, True), (0.1, False)):
        dec = is_r_robust(lg, x, _radius_for(lg, p), seed=1)
        assert bool(dec.decided.all()) and bool((dec.robust == truth).all()), p
        assert int(dec.samples_used.max()) <= 64, (p, dec.samples_used.max())
        if p in (0.99, 0.01):
            assert bool((dec.samples_used == 32).all())


def test_p_hat_equals_fixed_sample_estimate_on_the_samples_drawn(lg: LinearGaussianVAE) -> None:
    x, r = _x(24), _radius_for(lg, 0.6)
    dec = is_r_robust(lg, x, r, seed=4, max_samples=2000, point_offset=100)
    assert len(set(dec.samples_used.tolist())) > 1  # rounds really differ between points
    for b in range(24):
        n = int(dec.samples_used[b])
        est = estimate_r_robustness(lg, x[b : b + 1], r, num_samples=n, seed=4, point_offset=100 + b)
        assert int(est.hits[0, 0]) == int(dec.hits[b])
    assert torch.allclose(dec.p_hat, dec.hits.double() / dec.samples_used.double())


@pytest.mark.parametrize(("p", "conf"), [(0.5, 0.8), (0.53, 0.8), (0.47, 0.9)])
def test_wrong_decision_rate_is_below_alpha(lg: LinearGaussianVAE, p: float, conf: float) -> None:
    """Near the boundary (known p): P(decided and wrong) <= alpha, within MC error. At p = 1/2 (not robust), a naive
    repeated 1-alpha interval would decide 'robust' far more often than alpha."""
    n_points = 1000
    x = _x(1).expand(n_points, D)
    dec = is_r_robust(lg, x, _radius_for(lg, p), confidence=conf, max_samples=512, seed=7)
    truth = p > 0.5
    wrong = (dec.decided & (dec.robust != truth)).double().mean().item()
    alpha = 1 - conf
    assert wrong <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / n_points), wrong
    if p == 0.5:
        assert wrong > 0  # the test does err sometimes at the boundary: the rate is not vacuous


def test_undecided_points_fall_back_to_p_hat(lg: LinearGaussianVAE) -> None:
    x = _x(40)
    dec = is_r_robust(lg, x, _radius_for(lg, 0.5), max_samples=40, seed=0)
    assert bool((dec.samples_used <= 40).all())
    und = ~dec.decided
    assert bool(und.any())
    assert torch.equal(dec.robust[und], 2 * dec.hits[und] > dec.samples_used[und])
    rows = dec.to_rows()
    assert len(rows) == 40 and set(rows[0]) >= {"point", "robust", "decided", "samples_used", "p_hat", "hits"}


def test_is_r_robust_with_delta_and_chunking(lg: LinearGaussianVAE) -> None:
    x = _x(16)
    delta = 0.6 * lg.worst_direction()
    r = _radius_for(lg, 0.7)
    assert lg.p_robust(r, delta) < 0.3  # the perturbation breaks robustness at this radius
    a = is_r_robust(lg, x, r, delta=delta, seed=3)
    b = is_r_robust(lg, x, r, delta=delta, seed=3, max_memory=(2 * lg.latent_dim + 2 * D) * 8 * 5)
    assert torch.equal(a.hits, b.hits) and torch.equal(a.samples_used, b.samples_used)
    assert not bool(a.robust.any())
    clean = is_r_robust(lg, x, r, seed=3)
    assert bool(clean.robust.all())


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"r": 0.0}, ValueError, "r"),
        ({"r": float("inf")}, ValueError, "r"),
        ({"confidence": 1.0}, ValueError, "confidence"),
        ({"max_samples": 0}, ValueError, "max_samples"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"futility": 0.0}, ValueError, "futility"),
        ({"autocast": "fp8"}, ValueError, "autocast"),
        ({"x": torch.zeros(0, D, dtype=torch.float64)}, ValueError, "x"),
        ({"delta": torch.zeros(1, D + 1, dtype=torch.float64)}, ValueError, "delta"),
    ],
)
def test_is_r_robust_bad_inputs(lg: LinearGaussianVAE, kwargs: dict, exc: type, name: str) -> None:
    args = {"x": torch.zeros(3, D, dtype=torch.float64), "r": 1.0} | kwargs
    with pytest.raises(exc, match=name):
        is_r_robust(lg, **args)


def test_numpy_counts_accepted() -> None:
    low, high = clopper_pearson(np.array([2, 3]), 10)
    assert low.shape == (2,) and bool((low < high).all())
