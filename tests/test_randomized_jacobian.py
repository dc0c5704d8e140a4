"""Randomized Jacobian norms with stated confidence: the limits of :mod:`vaefast.matrix_bounds` and
:func:`vaefast.jacobian.jacobian_norms` against exact constructions, over many seeds.

Every coverage test counts the misses of ``n`` independent trials and fails only when they exceed the
``1 - FALSE_ALARM`` quantile of Binomial(n, alpha): a correct implementation fails a test with probability
``<= FALSE_ALARM`` (the limits are conservative, so the true miss rates are lower still).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.autograd.function import once_differentiable

from vaefast.jacobian import jacobian_norms
from vaefast.matrix_bounds import lanczos_upper, trace_limits
from vaefast.robustness import margin_bound
from vaefast.testing import LinearGaussianVAE

FALSE_ALARM = 1e-3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _max_misses(n: int, alpha: float) -> int:
    return int(stats.binom.ppf(1 - FALSE_ALARM, n, alpha))


# --- the trace limits alone (exact simulation of the Gaussian quadratic forms) -------------------------------------
SPECTRA = {
    "rank one": np.array([1.0]),
    "flat 40": np.ones(40),
    "power law": 1.0 / np.arange(1, 120) ** 1.5,
}


@pytest.mark.parametrize("capped", [False, True])
@pytest.mark.parametrize("name", list(SPECTRA))
def test_trace_limits_cover(name, capped):
    mu, m, alpha, n = SPECTRA[name], 6, 0.1, 150
    rng = np.random.default_rng(7)
    cap = float(mu.max()) if capped else None
    low = high = 0
    for _ in range(n):
        s = float((mu * rng.chisquare(m, size=mu.size)).sum())
        lower, upper = trace_limits(s, m, alpha, alpha, cap=cap, n=mu.size)
        assert lower <= s / m <= upper
        low += lower > mu.sum()
        high += upper < mu.sum()
    assert low <= _max_misses(n, alpha) and high <= _max_misses(n, alpha), (low, high)


def test_trace_limits_cap_and_edges():
    # a cap far below the trace (high effective rank) narrows the interval towards the normal one
    loose = trace_limits(400.0, 8, 0.05, 0.05)
    tight = trace_limits(400.0, 8, 0.05, 0.05, cap=1.0, n=100)
    assert tight[1] - tight[0] < 0.3 * (loose[1] - loose[0])
    assert tight[1] <= 100.0  # the sure limit n * cap
    assert trace_limits(0.0, 5, 0.05, 0.05) == (0.0, 0.0)
    with pytest.raises(ValueError, match="s must be"):
        trace_limits(-1.0, 5, 0.05, 0.05)


def test_lanczos_upper():
    assert lanczos_upper(2.0, 10, 10, 0.01) == 2.0  # the whole space: exact
    assert lanczos_upper(2.0, 1000, 1, 0.01) == math.inf  # one step says nothing
    eps = (math.log(1.648 * math.sqrt(1000) / 0.01) / 39) ** 2
    assert lanczos_upper(2.0, 1000, 20, 0.01) == pytest.approx(2.0 / (1 - eps))


# --- jacobian_norms against exact Jacobians --------------------------------------------------------------------------
def _linear(singular: torch.Tensor, dim_in: int, seed: int) -> nn.Linear:
    """``mu(x) = A x`` with ``A = U diag(singular) V^T`` (random orthonormal U, V)."""
    gen = torch.Generator().manual_seed(seed)
    d = singular.shape[0]
    u = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(dim_in, d, generator=gen, dtype=torch.float64))[0]
    layer = nn.Linear(dim_in, d, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(singular) @ v.T)
    return layer


def _misses(rand, exact) -> torch.Tensor:
    """Points where any limit of ``rand`` misses the exact norm (or a sure lower bound exceeds it)."""
    tol = 1e-9
    miss = (rand.frobenius_upper < exact.frobenius * (1 - tol)) | (rand.frobenius_lower > exact.frobenius * (1 + tol))
    miss |= rand.spectral_upper < exact.spectral * (1 - tol)
    miss |= rand.whitened_spectral_upper < exact.whitened_spectral * (1 - tol)
    assert bool((rand.spectral <= exact.spectral * (1 + 1e-7)).all())  # Ritz values never exceed the norm
    assert bool((rand.whitened_spectral <= exact.whitened_spectral * (1 + 1e-7)).all())
    return miss


LINEAR_SPECTRA = {  # d = 48 singular values
    "linear decay": torch.linspace(1.0, 0.05, 48, dtype=torch.float64).sqrt(),
    "one outlier": torch.cat([torch.tensor([6.0]), torch.full((47,), 0.5)]).double(),
    "power law": 1.0 / torch.arange(1, 49, dtype=torch.float64),
}


@pytest.mark.parametrize("steps", [3, 10])
@pytest.mark.parametrize("name", list(LINEAR_SPECTRA))
def test_randomized_limits_cover_linear_encoders(name, steps):
    """J = A is the same at every point, and every point draws its own probes and Lanczos start: the points are
    independent trials (few Lanczos steps and 4 probes: the limits must carry all the uncertainty)."""
    enc = _linear(LINEAR_SPECTRA[name], 60, seed=3)
    n, confidence = 240, 0.8
    x = torch.randn(n, 60, dtype=torch.float64, generator=_gen(10))
    scale = torch.rand(n, 48, dtype=torch.float64, generator=_gen(11)) + 0.2
    rand = jacobian_norms(enc, x, scale, method="randomized", confidence=confidence, num_probes=4, lanczos_steps=steps)
    exact = jacobian_norms(enc, x, scale, method="exact")
    assert rand.method == "randomized" and exact.method == "exact" and exact.confidence == 1.0
    torch.testing.assert_close(exact.frobenius, torch.full((n,), float(LINEAR_SPECTRA[name].norm())).double())
    misses = int(_misses(rand, exact).sum())
    assert misses <= _max_misses(n, 1 - confidence), misses
    # the estimate of ||J||_F^2 is unbiased: its mean over the points is within 5 standard errors
    sq = rand.frobenius**2
    assert abs(float(sq.mean()) - float(exact.frobenius[0]) ** 2) < 5 * float(sq.std()) / math.sqrt(n)


def _conv_encoder() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ELU(), nn.Flatten(),
            nn.Linear(64, 40),
        ).double()  # fmt: skip


def test_randomized_limits_cover_a_conv_encoder():
    """A nonlinear encoder: J differs per point; exact J per point is the oracle."""
    enc = _conv_encoder()
    n, confidence = 120, 0.8
    x = torch.randn(n, 1, 8, 8, dtype=torch.float64, generator=_gen(12))
    scale = torch.rand(n, 40, dtype=torch.float64, generator=_gen(13)) + 0.5
    rand = jacobian_norms(enc, x, scale, method="randomized", confidence=confidence, num_probes=6, lanczos_steps=4)
    exact = jacobian_norms(enc, x, scale, method="exact")
    misses = int(_misses(rand, exact).sum())
    assert misses <= _max_misses(n, 1 - confidence), misses
    # "auto" is exact at this latent size; enough Lanczos steps make the randomized norms exact
    assert jacobian_norms(enc, x[:2], scale[:2]).method == "exact"
    full = jacobian_norms(enc, x[:3], scale[:3], method="randomized", lanczos_steps=40)
    for key in ("frobenius", "frobenius_upper", "spectral", "spectral_upper", "whitened_spectral_upper"):
        exact_key = key.replace("_upper", "")
        torch.testing.assert_close(getattr(full, key), getattr(exact, exact_key)[:3], rtol=1e-6, atol=0)


def test_randomized_is_keyed_by_point_id_and_seed():
    enc = _conv_encoder()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64, generator=_gen(14))
    kw = {"method": "randomized", "num_probes": 3, "lanczos_steps": 3}
    whole = jacobian_norms(enc, x, seed=5, **kw)
    tail = jacobian_norms(enc, x[2:], seed=5, point_offset=2, max_memory=60_000, **kw)  # smaller chunks too
    torch.testing.assert_close(tail.frobenius_upper, whole.frobenius_upper[2:], rtol=1e-9, atol=0)
    torch.testing.assert_close(tail.spectral_upper, whole.spectral_upper[2:], rtol=1e-9, atol=0)
    assert torch.equal(tail.point_index, torch.arange(2, 6))
    other = jacobian_norms(enc, x, seed=6, **kw)
    assert not torch.allclose(other.frobenius, whole.frobenius)
    assert bool(whole.whitened_spectral.isnan().all())  # no row scale, no whitened norm


class _TanhOnce(torch.autograd.Function):
    """tanh whose backward is not differentiable and which has no forward-mode rule (no J u at all)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _NoHigherOrder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _linear(torch.linspace(2.0, 0.1, 30, dtype=torch.float64), 40, seed=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TanhOnce.apply(self.inner(x))


def test_randomized_without_jvp_falls_back_to_frobenius_limits():
    enc = _NoHigherOrder()
    n = 60
    x = 0.1 * torch.randn(n, 40, dtype=torch.float64, generator=_gen(15))
    scale = torch.rand(n, 30, dtype=torch.float64, generator=_gen(16)) + 0.5
    rand = jacobian_norms(enc, x, scale, method="randomized", confidence=0.8, num_probes=8)
    exact = jacobian_norms(enc, x, scale, method="exact")
    assert rand.lanczos_steps == 0
    torch.testing.assert_close(rand.spectral_upper, rand.frobenius_upper)
    assert int(_misses(rand, exact).sum()) <= _max_misses(n, 0.2)


def test_jacobian_norms_bad_arguments():
    enc = _conv_encoder()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=_gen(17))
    with pytest.raises(ValueError, match="method must be one of"):
        jacobian_norms(enc, x, method="hutchinson")
    with pytest.raises(ValueError, match="confidence"):
        jacobian_norms(enc, x, confidence=1.0)
    with pytest.raises(ValueError, match="lanczos_steps"):
        jacobian_norms(enc, x, lanczos_steps=0)
    with pytest.raises(ValueError, match="row_scale must be"):
        jacobian_norms(enc, x, torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_memory"):
        jacobian_norms(enc, x, max_memory=0)
    with pytest.raises(ValueError, match="max_memory=10 bytes is too small"):
        jacobian_norms(enc, x, method="randomized", max_memory=10)


# --- the bound with a randomized Jacobian --------------------------------------------------------------------------
def test_margin_bound_states_estimates_and_upper_limits():
    model = LinearGaussianVAE(input_dim=20, latent_dim=6, sigma=0.3, seed=2)
    x = torch.rand(5, 20, dtype=torch.float64, generator=_gen(18))
    exact = margin_bound(model, x, 2.0, num_samples=400, seed=1)
    rand = margin_bound(model, x, 2.0, num_samples=400, seed=1, jacobian="randomized")
    assert exact.jac_method in ("fused", "exact") and exact.jac_confidence == 1.0
    torch.testing.assert_close(exact.jac_frobenius_upper, exact.jac_frobenius)
    assert rand.jac_method == "randomized" and rand.jac_confidence == pytest.approx((1 + exact.confidence) / 2)
    # randomized with d = 6 <= 20 Lanczos steps: the spectral norms are exact, the Frobenius upper limit >= exact
    torch.testing.assert_close(rand.jac_spectral, exact.jac_spectral, rtol=1e-8, atol=0)
    assert bool((rand.jac_frobenius_upper >= exact.jac_frobenius * (1 - 1e-9)).all())
    assert bool((rand.certified_bound <= exact.certified_bound * (1 + 1e-9)).all())
    row = rand.to_rows()[0]
    assert row["jac_method"] == "randomized" and "jac_frobenius_upper" in row
    with pytest.raises(ValueError, match="jacobian must be one of"):
        margin_bound(model, x, 2.0, jacobian="power")
    with pytest.raises(ValueError, match="max_memory=100 bytes is too small"):  # before the estimate is drawn
        margin_bound(model, x, 2.0, jacobian="randomized", max_memory=100)
