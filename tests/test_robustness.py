"""estimate_r_robustness / margin_bound against the closed forms of the linear-Gaussian VAE (``linear_vae``:
tests/conftest.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy import stats
from torch import nn

from vaefast._memory import activation_bytes
from vaefast.models import save as save_model
from vaefast.robustness import estimate_r_robustness, is_r_robust, margin_bound
from vaefast.testing import LinearGaussianVAE

D, d = 12, 3


def _x(n: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _radius_for(model: LinearGaussianVAE, p: float) -> float:
    """The r with exact p_r = p (inverse chi-square)."""
    return model._scale() * math.sqrt(stats.chi2.ppf(p, model.latent_dim))


def _dist_density(model: LinearGaussianVAE, r: float) -> float:
    """Density of ||Delta|| = c sqrt(chi2_d) at r (for the standard error of r*)."""
    c = model._scale()
    return stats.chi2.pdf((r / c) ** 2, model.latent_dim) * 2 * r / c**2


class _LinEncoder(nn.Module):
    """x -> (A x + b, fixed per-dimension logvar): a plain nn.Linear encoder for as_vae."""

    def __init__(self, linear: nn.Linear, logvar: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("logvar", logvar)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.linear(x)
        return mu, self.logvar.expand_as(mu)


def _as_vae_copy(model: LinearGaussianVAE, sigmas: torch.Tensor | None = None, known_shape: bool = True):
    """The same linear-Gaussian VAE rebuilt with vaefast.as_vae from plain nn.Linear modules."""
    from vaefast.models import as_vae

    enc_lin = nn.Linear(D, d).to(torch.float64)
    dec_lin = nn.Linear(d, D).to(torch.float64)
    enc_lin.load_state_dict(model.encoder_mean.state_dict())
    dec_lin.load_state_dict(model.decoder_linear.state_dict())
    sig = torch.full((d,), model.sigma, dtype=torch.float64) if sigmas is None else sigmas
    return as_vae(
        _LinEncoder(enc_lin, 2 * torch.log(sig)), dec_lin, likelihood="gaussian", decoder_output="mean",
        input_shape=(D,) if known_shape else None,
    )  # fmt: skip


# --- p_hat and r* against the closed form -------------------------------------------------------------------------
@pytest.mark.parametrize("with_delta", [False, True])
def test_p_hat_matches_chi2(linear_vae: LinearGaussianVAE, with_delta: bool) -> None:
    x, s = _x(64), 400
    delta = 0.25 * linear_vae.worst_direction() if with_delta else None
    radii = [_radius_for(linear_vae, p) for p in (0.2, 0.5, 0.8)]
    res = estimate_r_robustness(linear_vae, x, radii, num_samples=s, delta=delta, seed=3)
    assert res.p_hat.shape == (64, 3) and res.hits.dtype == torch.int64 and res.robust.dtype == torch.bool
    for k, r in enumerate(radii):
        p = linear_vae.p_robust(r, delta)  # ncx2 when delta is given
        pooled = res.hits[:, k].sum().item() / (64 * s)
        assert abs(pooled - p) < 4.5 * math.sqrt(p * (1 - p) / (64 * s)), (r, pooled, p)
    if with_delta:  # the perturbation must actually matter at these radii
        assert linear_vae.p_robust(radii[1], delta) < 0.4
    assert torch.equal(res.robust, 2 * res.hits > s)
    assert torch.allclose(res.p_hat, res.hits.double() / s)


def test_r_star_matches_chi2_median_and_is_the_smallest_robust_radius(linear_vae: LinearGaussianVAE) -> None:
    x, s = _x(64), 401
    res = estimate_r_robustness(linear_vae, x, 1.0, num_samples=s, seed=5)
    r0 = linear_vae.r_star()
    se = 1 / (2 * _dist_density(linear_vae, r0) * math.sqrt(s)) / math.sqrt(64)
    assert abs(res.r_star.mean().item() - r0) < 5 * se
    # r* is exactly the smallest radius with p_hat > 1/2 (same samples: same seed)
    at = estimate_r_robustness(linear_vae, x, res.r_star, num_samples=s, seed=5)
    idx = torch.arange(64)
    assert bool(at.robust[idx, idx].all())
    below = estimate_r_robustness(linear_vae, x, res.r_star * (1 - 1e-9), num_samples=s, seed=5)
    assert not bool(below.robust[idx, idx].any())
    assert bool((at.hits[idx, idx] == s // 2 + 1).all())


def test_as_vae_linear_model_matches_closed_form(linear_vae: LinearGaussianVAE) -> None:
    model = _as_vae_copy(linear_vae)
    x, s = _x(32), 300
    delta = 0.2 * linear_vae.worst_direction()
    r = _radius_for(linear_vae, 0.6)
    a = estimate_r_robustness(model, x, r, num_samples=s, delta=delta, seed=2)
    b = estimate_r_robustness(linear_vae, x, r, num_samples=s, delta=delta, seed=2)
    assert torch.equal(a.hits, b.hits)
    assert torch.allclose(a.r_star, b.r_star, rtol=1e-12, atol=0)
    p = linear_vae.p_robust(r, delta)
    assert abs(a.hits.sum().item() / (32 * s) - p) < 4.5 * math.sqrt(p * (1 - p) / (32 * s))
    # an adapter that learns its input shape from the first input gives the same numbers
    lazy = estimate_r_robustness(_as_vae_copy(linear_vae, known_shape=False), x, r, num_samples=s, delta=delta, seed=2)
    assert torch.equal(lazy.hits, a.hits)


def test_clopper_pearson_covers_true_p_at_nominal_rate(linear_vae: LinearGaussianVAE) -> None:
    n_points, s, conf = 1500, 60, 0.9
    r = _radius_for(linear_vae, 0.7)
    x = _x(1).expand(n_points, D)
    res = estimate_r_robustness(linear_vae, x, r, num_samples=s, seed=11, confidence=conf)
    p = linear_vae.p_robust(r)
    covered = ((res.ci_low[:, 0] <= p) & (p <= res.ci_high[:, 0])).double().mean().item()
    se = math.sqrt(conf * (1 - conf) / n_points)
    # Clopper–Pearson is conservative: coverage >= nominal (within MC error), but not absurdly so
    assert conf - 3 * se <= covered <= 0.985, covered


# --- chunking, seeds, offsets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunk_size_invariance(dtype: torch.dtype) -> None:
    """Hits are identical for any memory budget (decoder batches of any size); r* up to the decoder's rounding."""
    model = LinearGaussianVAE(input_dim=D, latent_dim=d, seed=4, dtype=dtype)
    x, s = _x(10, dtype=dtype), 97
    radii = [0.4, 0.8, 1.2]
    ref = estimate_r_robustness(model, x, radii, num_samples=s, seed=9)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    row = (d + 2 * D) * x.element_size()  # one decoded sample: its code, the Linear's output and the result
    assert row == activation_bytes(model.decode, torch.zeros(1, d, dtype=dtype))
    for budget in (row, row * 13, row * s * 3, row * s * 10 + 5):
        res = estimate_r_robustness(model, x, radii, num_samples=s, seed=9, max_memory=budget)
        assert torch.equal(res.hits, ref.hits), budget
        # eps is bit-identical; the decoder's own rounding may depend on its batch size (BLAS blocking)
        assert torch.allclose(res.r_star, ref.r_star, rtol=rtol, atol=0)
    with pytest.raises(ValueError, match="max_memory"):
        estimate_r_robustness(model, x, radii, num_samples=s, max_memory=row - 1)


def test_r_star_in_bounded_memory_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """When a point's distances do not fit, r* comes from passes over the same samples: the same order statistic
    as the in-memory kthvalue, and the same hits."""
    import vaefast.core.sampling as sampling

    model = LinearGaussianVAE(input_dim=D, latent_dim=d, seed=5)
    x, s = _x(3), 5001
    ref = estimate_r_robustness(model, x, [0.5, 1.0], num_samples=s, seed=2)
    monkeypatch.setattr(sampling, "DISTANCE_BYTES", 4 * 40)  # 40 distances at a time: passes with 255 probes
    small = estimate_r_robustness(model, x, [0.5, 1.0], num_samples=s, seed=2)
    assert torch.equal(small.hits, ref.hits)
    assert torch.equal(small.r_star, ref.r_star)
    monkeypatch.setattr(sampling, "PROBES", 3)  # few probes: several passes narrow the bracket
    assert torch.equal(estimate_r_robustness(model, x, [0.5], num_samples=s, seed=2).r_star, ref.r_star)


def test_point_offset_splits_are_the_same_stream(linear_vae: LinearGaussianVAE) -> None:
    x = _x(12)
    full = estimate_r_robustness(linear_vae, x, [0.5, 1.0], num_samples=200, seed=1)
    first = estimate_r_robustness(linear_vae, x[:5], [0.5, 1.0], num_samples=200, seed=1)
    rest = estimate_r_robustness(linear_vae, x[5:], [0.5, 1.0], num_samples=200, seed=1, point_offset=5)
    assert torch.equal(torch.cat([first.hits, rest.hits]), full.hits)
    assert rest.point_index.tolist() == list(range(5, 12))


def test_seed_reproducibility_and_radius_order(linear_vae: LinearGaussianVAE) -> None:
    x = _x(8)
    a = estimate_r_robustness(linear_vae, x, [1.0, 0.3, 0.7], num_samples=300, seed=7)
    b = estimate_r_robustness(linear_vae, x, [1.0, 0.3, 0.7], num_samples=300, seed=7)
    c = estimate_r_robustness(linear_vae, x, [1.0, 0.3, 0.7], num_samples=300, seed=8)
    assert torch.equal(a.hits, b.hits) and torch.equal(a.r_star, b.r_star)
    assert not torch.equal(a.hits, c.hits)
    # unsorted radii are returned in the order asked; hits are monotone in r
    assert a.radii.tolist() == [1.0, 0.3, 0.7]
    assert bool((a.hits[:, 1] <= a.hits[:, 2]).all() and (a.hits[:, 2] <= a.hits[:, 0]).all())
    single = estimate_r_robustness(linear_vae, x, 0.7, num_samples=300, seed=7)
    assert torch.equal(single.hits[:, 0], a.hits[:, 2])


def test_result_serialisation(linear_vae: LinearGaussianVAE) -> None:
    res = estimate_r_robustness(linear_vae, _x(3), [0.5, 1.0], num_samples=50, seed=0, point_offset=10)
    rows = res.to_rows()
    assert len(rows) == 6 and rows[0]["point"] == 10 and rows[1]["r"] == 1.0
    assert all(isinstance(v, (int, float, bool, str)) for row in rows for v in row.values())
    json.dumps(res.to_dict())
    mb = margin_bound(linear_vae, _x(3), 1.0, num_samples=50)
    assert len(mb.to_rows()) == 3
    json.dumps(mb.to_dict())


# --- the margin bound ---------------------------------------------------------------------------------------------
def test_margin_bound_matches_closed_forms(linear_vae: LinearGaussianVAE) -> None:
    x, s, conf = _x(48), 800, 0.95
    r = _radius_for(linear_vae, 0.85)
    mb = margin_bound(linear_vae, x, r, num_samples=s, seed=3, confidence=conf)
    exact = linear_vae.bounds(r)
    # components are exact for a linear encoder
    assert torch.allclose(mb.jac_frobenius, torch.full((48,), exact["jac_frobenius"], dtype=torch.float64))
    assert torch.allclose(mb.jac_spectral, torch.full((48,), exact["jac_spectral"], dtype=torch.float64))
    assert torch.allclose(mb.sigma_min, torch.full((48,), exact["sigma_min"], dtype=torch.float64))
    # the formulas at the same p_hat
    q = torch.from_numpy(stats.norm.ppf(mb.p_hat.numpy()))
    sig, fro, spec = exact["sigma_min"], exact["jac_frobenius"], exact["jac_spectral"]
    assert bool(mb.certified.all()) and not bool(mb.saturated.any())
    assert torch.allclose(mb.latent_margin, sig * q)
    assert torch.allclose(mb.bound, sig * q / fro)
    assert torch.allclose(mb.spectral_bound, sig * q / spec)
    assert torch.allclose(mb.whitened_bound, q / (spec / sig))
    k, n = mb.hits.numpy(), mb.num_samples
    one_sided = stats.beta.ppf(1 - conf, k, n - k + 1)  # the one-sided Clopper–Pearson lower limit
    assert torch.allclose(mb.p_low, torch.from_numpy(one_sided))
    q_low = torch.from_numpy(stats.norm.ppf(one_sided)).clamp(min=0)
    assert torch.allclose(mb.certified_bound, sig * q_low / fro)
    assert bool((mb.certified_bound <= mb.bound).all())
    # and the closed form at the exact p, within the MC error of p_hat (delta method, averaged over points)
    p = exact["p"]
    se_q = math.sqrt(p * (1 - p) / s) / stats.norm.pdf(stats.norm.ppf(p)) / math.sqrt(48)
    for name in ("bound", "spectral_bound", "whitened_bound", "latent_margin"):
        scale = exact[name] / stats.norm.ppf(p)
        assert abs(getattr(mb, name).mean().item() - exact[name]) < 5 * scale * se_q, name


def test_whitened_and_spectral_ordering_with_anisotropic_sigma(linear_vae: LinearGaussianVAE) -> None:
    sig = torch.tensor([0.2, 0.35, 0.5], dtype=torch.float64)
    model = _as_vae_copy(linear_vae, sig)
    mb = margin_bound(model, _x(6), 1.5, num_samples=300, seed=0)
    a = linear_vae.A
    assert bool(mb.certified.all())
    assert torch.allclose(mb.jac_whitened_spectral, torch.linalg.matrix_norm(a / sig[:, None], ord=2).expand(6))
    assert torch.allclose(mb.sigma_min, torch.full((6,), 0.2, dtype=torch.float64))
    q = torch.from_numpy(stats.norm.ppf(mb.p_hat.numpy()))
    assert torch.allclose(mb.whitened_bound, q / torch.linalg.matrix_norm(a / sig[:, None], ord=2))
    assert bool((mb.bound <= mb.spectral_bound).all() and (mb.spectral_bound <= mb.whitened_bound + 1e-12).all())


def test_margin_bound_reuses_a_given_estimate(linear_vae: LinearGaussianVAE) -> None:
    x = _x(6)
    est = estimate_r_robustness(linear_vae, x, [0.5, 1.0], num_samples=150, seed=4, point_offset=3)
    direct = margin_bound(linear_vae, x, 1.0, num_samples=150, seed=4, point_offset=3)
    reused = margin_bound(linear_vae, x, 1.0, estimate=est)
    for name in ("bound", "certified_bound", "whitened_bound", "hits", "point_index"):
        assert torch.equal(getattr(reused, name), getattr(direct, name)), name
    with pytest.raises(ValueError, match="estimate"):
        margin_bound(linear_vae, x, 2.0, estimate=est)
    with pytest.raises(ValueError, match="estimate"):
        margin_bound(linear_vae, x[:2], 1.0, estimate=est)
    with pytest.raises(TypeError, match="estimate"):
        margin_bound(linear_vae, x, 1.0, estimate=est.to_dict())


def test_non_robust_points_are_flagged_with_zero_bounds(linear_vae: LinearGaussianVAE) -> None:
    r = _radius_for(linear_vae, 0.3)
    mb = margin_bound(linear_vae, _x(5), r, num_samples=200, seed=0)
    assert not bool(mb.certified.any())
    for name in ("bound", "certified_bound", "spectral_bound", "whitened_bound", "latent_margin"):
        assert bool((getattr(mb, name) == 0).all()), name


def test_only_points_decided_robust_get_bounds(linear_vae: LinearGaussianVAE) -> None:
    """One clean decision: certified exactly where the one-sided lower limit exceeds 1/2; a point with p_hat > 1/2
    but no significance is undecided and gets no bound at all (it is never compared)."""
    mb = margin_bound(linear_vae, _x(40), _radius_for(linear_vae, 0.56), num_samples=100, seed=0)
    undecided = mb.decision == 0
    assert bool((undecided & (mb.p_hat > 0.5)).any())  # p_hat > 1/2 but not significantly
    assert torch.equal(mb.certified, mb.p_low > 0.5) and torch.equal(mb.certified, mb.decision == 1)
    assert bool((mb.bound[~mb.certified] == 0).all() and (mb.certified_bound[~mb.certified] == 0).all())
    assert bool((mb.certified_bound[mb.certified] > 0).all())


def test_top_level_names() -> None:
    import vaefast

    assert vaefast.estimate_r_robustness is estimate_r_robustness and vaefast.margin_bound is margin_bound
    assert callable(vaefast.is_r_robust)


def test_saturated_p_hat_gives_finite_half_count_bound(linear_vae: LinearGaussianVAE) -> None:
    s, conf = 100, 0.95
    mb = margin_bound(linear_vae, _x(4), 50.0, num_samples=s, seed=0, confidence=conf)
    assert bool(mb.saturated.all()) and bool(mb.certified.all())
    exact = linear_vae.bounds(50.0)
    sig, fro = exact["sigma_min"], exact["jac_frobenius"]
    assert torch.allclose(mb.bound, torch.full((4,), sig * stats.norm.ppf(1 - 0.5 / s) / fro, dtype=torch.float64))
    low = (1 - conf) ** (1 / s)  # the one-sided Clopper–Pearson lower limit at k = n
    assert torch.allclose(mb.p_low, torch.full((4,), low, dtype=torch.float64))
    assert torch.allclose(mb.certified_bound, torch.full((4,), sig * stats.norm.ppf(low) / fro, dtype=torch.float64))
    assert bool(torch.isfinite(mb.whitened_bound).all())


# --- bad inputs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"x": torch.zeros(2, D + 1, dtype=torch.float64)}, ValueError, "x"),
        ({"x": torch.zeros(D, dtype=torch.float64)}, ValueError, "x"),
        ({"x": torch.zeros(0, D, dtype=torch.float64)}, ValueError, "x"),
        ({"x": torch.full((2, D), float("nan"), dtype=torch.float64)}, ValueError, "x"),
        ({"x": [[0.0] * D]}, TypeError, "x"),
        ({"x": torch.zeros(2, D, dtype=torch.int64)}, TypeError, "x"),
        ({"radii": 0.0}, ValueError, "radii"),
        ({"radii": [1.0, -1.0]}, ValueError, "radii"),
        ({"radii": float("nan")}, ValueError, "radii"),
        ({"radii": []}, ValueError, "radii"),
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_samples": 10.0}, TypeError, "num_samples"),
        ({"confidence": 1.0}, ValueError, "confidence"),
        ({"confidence": 0.0}, ValueError, "confidence"),
        ({"seed": -1}, ValueError, "seed"),
        ({"point_offset": -3}, ValueError, "point_offset"),
        ({"max_memory": 0}, ValueError, "max_memory"),
        ({"num_samples": 10**12}, ValueError, "num_samples"),
        ({"delta": torch.zeros(3, D, dtype=torch.float64)}, ValueError, "delta"),
        ({"delta": torch.full((D,), float("inf"), dtype=torch.float64)}, ValueError, "delta"),
    ],
)
def test_bad_inputs_name_the_argument(linear_vae: LinearGaussianVAE, kwargs: dict, exc: type, name: str) -> None:
    args = {"x": torch.zeros(2, D, dtype=torch.float64), "radii": 1.0, "num_samples": 10} | kwargs
    with pytest.raises(exc, match=name):
        estimate_r_robustness(linear_vae, **args)


def test_bad_model_and_margin_bound_inputs(linear_vae: LinearGaussianVAE) -> None:
    with pytest.raises(TypeError, match="model"):
        estimate_r_robustness(nn.Linear(D, D), torch.zeros(2, D), 1.0)
    with pytest.raises(ValueError, match="r"):
        margin_bound(linear_vae, torch.zeros(2, D, dtype=torch.float64), -1.0)
    with pytest.raises(ValueError, match="num_samples"):
        margin_bound(linear_vae, torch.zeros(2, D, dtype=torch.float64), 1.0, num_samples=0)


def test_single_delta_broadcasts_and_float32_input_is_cast(linear_vae: LinearGaussianVAE) -> None:
    x = _x(4)
    delta = 0.1 * linear_vae.worst_direction()
    a = estimate_r_robustness(linear_vae, x, 1.0, num_samples=100, delta=delta)
    b = estimate_r_robustness(linear_vae, x, 1.0, num_samples=100, delta=delta.expand(4, D))
    assert torch.equal(a.hits, b.hits)
    c = estimate_r_robustness(linear_vae, x.float(), 1.0, num_samples=100)
    d_ = estimate_r_robustness(linear_vae, x.float().double(), 1.0, num_samples=100)
    assert torch.equal(c.hits, d_.hits)


# --- vaefast's own VAE and the CLI --------------------------------------------------------------------------------
def _small_vae():
    from vaefast.models import VAE, VAEConfig

    return VAE(VAEConfig(input_shape=(1, 8, 8), hidden=(16,), latent_dim=2, activation="tanh"), seed=0).eval()


def test_margin_bound_on_mlp_vae_uses_exact_jacobian_norms() -> None:
    model = _small_vae()
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    mb = margin_bound(model, x, 3.0, num_samples=200, seed=1)
    enc = model.mean_encoder()
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: enc(v[None])[0], xi).reshape(2, -1) for xi in x])
    sigma = torch.exp(0.5 * model.encode(x)[1]).detach()
    assert torch.allclose(mb.jac_frobenius.float(), torch.linalg.matrix_norm(jac), rtol=1e-4)
    assert torch.allclose(mb.jac_spectral.float(), torch.linalg.matrix_norm(jac, ord=2), rtol=1e-4)
    white = torch.linalg.matrix_norm(jac / sigma[:, :, None], ord=2)
    assert torch.allclose(mb.jac_whitened_spectral.float(), white, rtol=1e-4)
    assert torch.allclose(mb.sigma_min.float(), sigma.min(1).values, rtol=1e-5)
    ok = mb.certified
    assert bool((mb.bound[ok] <= mb.spectral_bound[ok] + 1e-9).all())
    assert bool((mb.spectral_bound[ok] <= mb.whitened_bound[ok] + 1e-9).all())


def test_cli_estimate_table_and_csv(tmp_path, capsys) -> None:
    import csv

    from vaefast.cli import main

    save_model(_small_vae(), tmp_path / "run")
    out = tmp_path / "est.csv"
    argv = ["estimate", str(tmp_path / "run"), "--points", "4", "--r", "2.0", "--r", "1.0", "3.0", "--samples", "64"]
    assert main([*argv, "--bound", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 points, S = 64" in text and "r*:" in text
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 12 and {"p_hat", "ci_low", "r_star", "bound", "certified"} <= set(rows[0])
    assert [float(r["r"]) for r in rows[:3]] == [2.0, 1.0, 3.0]
    assert main(["estimate", str(tmp_path / "run"), "--r", "-1"]) == 2


def test_cli_estimate_flags_bounds_larger_than_the_box(tmp_path, capsys) -> None:
    """At a radius far above every r* (p_hat = 1) the first-order bound can exceed the whole [0, 1]^D box: the
    table counts and caps it instead of printing a number larger than the input space."""
    import csv

    from vaefast.cli import main

    model = _small_vae()
    with torch.no_grad():
        model.encoder.mu.weight.mul_(1e-3)  # a nearly constant mean encoder: ||J_mu||_F tiny, bound huge
    save_model(model, tmp_path / "run")
    out = tmp_path / "est.csv"
    assert main(["estimate", str(tmp_path / "run"), "--points", "4", "--r", "50", "--samples", "64", "--bound",
                 "--out", str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    exceeds = [r for r in rows if r["bound_exceeds_box"] == "True"]
    assert all(float(r["bound"]) > float(r["box_limit"]) for r in exceeds)
    assert all(float(r["bound"]) <= float(r["box_limit"]) for r in rows if r["bound_exceeds_box"] == "False")
    line = next(line for line in text.splitlines() if line.strip().startswith("50"))
    assert int(line.split()[-1]) == len(exceeds)
    assert len(exceeds) == 4 and "larger than the largest perturbation" in text
    assert float(line.split()[-2]) <= max(float(r["box_limit"]) for r in rows)  # the median is capped


@pytest.mark.gpu
def test_inputs_on_another_device_than_the_model(linear_vae: LinearGaussianVAE) -> None:
    x = _x(2)
    with pytest.raises(ValueError, match="x is on cuda"):
        estimate_r_robustness(linear_vae, x.cuda(), 1.0, num_samples=10)
    with pytest.raises(ValueError, match="delta is on cuda"):
        estimate_r_robustness(linear_vae, x, 1.0, num_samples=10, delta=torch.zeros(D, dtype=torch.float64).cuda())


def test_margin_bound_needs_a_mean_encoder(linear_vae: LinearGaussianVAE) -> None:
    class NoMeanEncoder(nn.Module):
        input_shape, latent_dim, likelihood = (D,), d, "gaussian"

        def encode(self, x):
            return linear_vae.encode(x)

        def decode(self, z):
            return linear_vae.decode(z)

    with pytest.raises(TypeError, match=r"missing mean_encoder\(\)"):
        margin_bound(NoMeanEncoder(), _x(2), 1.0, num_samples=10)


def test_bf16_autocast_agrees_with_float32_on_most_pairs(digits_vae: nn.Module, digits) -> None:
    """The opt-in reduced-precision decoder (``autocast="bf16"``, here on the CPU): the same samples, decoded in
    bfloat16, give the float32 hit counts on most (point, radius) pairs (a sample within rounding of a radius may
    flip, so not all), nearly the same p_hat everywhere, and the same robustness decision on most pairs; the
    distances stay float32."""
    x = digits[1].x[:48]
    radii = torch.quantile(estimate_r_robustness(digits_vae, x, 1.0, num_samples=200).r_star.double(), 0.5)
    radii = [0.8 * float(radii), float(radii), 1.2 * float(radii)]
    full = estimate_r_robustness(digits_vae, x, radii, num_samples=400, seed=2)
    low = estimate_r_robustness(digits_vae, x, radii, num_samples=400, seed=2, autocast="bf16")
    assert low.r_star.dtype == full.r_star.dtype
    agree = (low.hits - full.hits).abs() <= 2  # within 2 of 400 samples
    assert agree.double().mean().item() >= 0.9, (low.hits - full.hits).abs().max()
    assert (low.p_hat - full.p_hat).abs().max().item() <= 0.05
    assert (low.robust == full.robust).double().mean().item() >= 0.9
    dec = is_r_robust(digits_vae, x[:8], radii[1], max_samples=256, autocast="bf16")
    assert dec.samples_used.shape == (8,)
    est = estimate_r_robustness(digits_vae, x[:8], radii[1], num_samples=100, seed=2, autocast="bf16")
    mb = margin_bound(digits_vae, x[:8], radii[1], num_samples=100, seed=2, autocast="bf16")
    assert torch.equal(mb.hits, est.hits[:, 0])


def test_tf32_autocast_needs_cuda(linear_vae: LinearGaussianVAE) -> None:
    with pytest.raises(ValueError, match="autocast='tf32' needs a CUDA device"):
        estimate_r_robustness(linear_vae, _x(2), 1.0, num_samples=10, autocast="tf32")
    with pytest.raises(ValueError, match="autocast must be None or one of"):
        estimate_r_robustness(linear_vae, _x(2), 1.0, num_samples=10, autocast="half")
    # float64 models are untouched by bf16 autocast (autocast casts float32 only)
    a = estimate_r_robustness(linear_vae, _x(4), 1.0, num_samples=200, seed=1)
    b = estimate_r_robustness(linear_vae, _x(4), 1.0, num_samples=200, seed=1, autocast="bf16")
    assert torch.equal(a.hits, b.hits)


def test_a_reused_estimate_must_describe_the_same_model_points_and_delta(linear_vae: LinearGaussianVAE) -> None:
    """An estimate records what it estimated; margin_bound and numerical_margin refuse one made for other inputs."""
    from vaefast.margin import numerical_margin

    x = torch.full((4, 12), 0.5, dtype=torch.float64)
    est = estimate_r_robustness(linear_vae, x, [1.0], num_samples=64, seed=0)
    margin_bound(linear_vae, x, 1.0, estimate=est)  # the same inputs: accepted
    other = LinearGaussianVAE(seed=1)
    moved = x + 0.01
    shifted = estimate_r_robustness(linear_vae, x, [1.0], num_samples=64, seed=0, delta=torch.full_like(x, 0.01))
    for model, points, estimate in ((other, x, est), (linear_vae, moved, est), (linear_vae, x, shifted)):
        with pytest.raises(ValueError, match="estimate was computed for another model"):
            margin_bound(model, points, 1.0, estimate=estimate)
    with pytest.raises(ValueError, match="estimate was computed for another model"):
        numerical_margin(other, x, 1.0, estimate=est, steps=2, progress=False)


def test_results_print_a_short_table_with_their_counts(linear_vae: LinearGaussianVAE) -> None:
    """repr: the counts and the first rows, never raw tensors; summary(): every row, as the command line prints."""
    from vaefast.margin import numerical_margin

    x = _x(8)
    est = estimate_r_robustness(linear_vae, x, [0.7, 1.0], num_samples=500)
    results = [
        est,
        margin_bound(linear_vae, x, 1.0, estimate=est),
        numerical_margin(linear_vae, x, [0.7, 1.0], box=None, max_radius=2.0, estimate=est, mode="mean", steps=5),
        is_r_robust(linear_vae, x, 1.0),
    ]
    for res in results:
        text = repr(res)
        assert text.startswith(type(res).__name__) and "tensor(" not in text and "more rows" in text
        assert len(text.splitlines()) <= 8 and res.counts()
        assert len(res.summary().splitlines()) == 2 + len(res.to_rows())
    assert "robust" in repr(est) and "undecided" in repr(results[2])
