"""Attacks: exact projections (vs scipy), max-damage on the linear-Gaussian VAE (analytic worst direction),
feasibility, determinism, strength vs random perturbations, targeted attacks, metrics, bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from vaefast.attacks import (
    AttackResult,
    LatentAttack,
    MaxDamageAttack,
    OutputAttack,
    auddc,
    distances,
    likelihood_degradation,
)
from vaefast.attacks.projections import _ray_scale, max_l2_norm, project_l2_ball, project_l2_sphere, project_linf
from vaefast.attacks.targeted import gaussian_divergence
from vaefast.testing import LinearGaussianVAE

torch.set_num_threads(1)


# --- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lin() -> LinearGaussianVAE:
    return LinearGaussianVAE(input_dim=12, latent_dim=3, sigma=0.3, seed=0)


@pytest.fixture(scope="module")
def digits_model():
    from vaefast.data import load
    from vaefast.models import VAE, VAEConfig
    from vaefast.training import train

    model = VAE(VAEConfig(hidden=(32,), latent_dim=4), seed=0)
    train(model, load("digits").x[:400], epochs=4, batch_size=64, lr=3e-3, seed=0, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def digits_x():
    from vaefast.data import load

    return load("digits", "test").x[:6]


# --- projections ---------------------------------------------------------------------------------------------
def _box_case(seed: int, b: int = 12, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, d, generator=g, dtype=torch.float64)
    v = 0.8 * torch.randn(b, d, generator=g, dtype=torch.float64)
    eps = 0.05 + 1.2 * torch.rand(b, generator=g, dtype=torch.float64)
    return -x, 1 - x, v, eps


def _slsqp(v, lo, hi, eps, equality: bool, x0) -> tuple[np.ndarray, float]:
    e2 = eps**2
    cons = [{"type": "eq" if equality else "ineq", "fun": lambda d: e2 - d @ d, "jac": lambda d: -2 * d}]
    res = minimize(
        lambda d: ((d - v) ** 2).sum(),
        x0,
        jac=lambda d: 2 * (d - v),
        bounds=list(zip(lo, hi, strict=True)),
        constraints=cons,
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    return res.x, float(res.fun)


@pytest.mark.parametrize("seed", [0, 1])
def test_l2_ball_box_projection_matches_scipy(seed):
    lo, hi, v, eps = _box_case(seed)
    p = project_l2_ball(v, eps, lo, hi)
    assert bool((p >= lo - 1e-12).all() and (p <= hi + 1e-12).all())
    assert bool((p.norm(dim=1) <= eps * (1 + 1e-12)).all())
    for i in range(v.shape[0]):
        ref, _ = _slsqp(v[i].numpy(), lo[i].numpy(), hi[i].numpy(), float(eps[i]), False, np.zeros(v.shape[1]))
        np.testing.assert_allclose(p[i].numpy(), ref, atol=1e-6)


def test_l2_sphere_box_projection_matches_multistart_scipy():
    lo, hi, v, eps = _box_case(3)
    eps = torch.minimum(eps, 0.95 * max_l2_norm(lo, hi))
    p = project_l2_sphere(v, eps, lo, hi)
    torch.testing.assert_close(p.norm(dim=1), eps, rtol=1e-10, atol=0)
    assert bool((p >= lo - 1e-12).all() and (p <= hi + 1e-12).all())
    reachable = torch.isfinite(_ray_scale(v, lo, hi, eps))
    rng = np.random.default_rng(0)
    checked = 0
    for i in range(v.shape[0]):
        if not reachable[i]:
            continue
        ours = float(((p[i] - v[i]) ** 2).sum())
        best = math.inf
        for _ in range(8):
            x0 = rng.uniform(lo[i].numpy(), hi[i].numpy())
            d, f = _slsqp(v[i].numpy(), lo[i].numpy(), hi[i].numpy(), float(eps[i]), True, x0)
            if (
                abs(d @ d - float(eps[i]) ** 2) < 1e-8
                and bool((d >= lo[i].numpy() - 1e-9).all())
                and bool((d <= hi[i].numpy() + 1e-9).all())
            ):
                best = min(best, f)
        assert ours <= best + 1e-7
        checked += 1
    assert checked >= 6


def test_l2_sphere_box_fallback_always_feasible():
    # directions with zeros and radii near the farthest corner: the ray clamp(t v) cannot reach eps
    g = torch.Generator().manual_seed(5)
    x = torch.rand(40, 8, generator=g, dtype=torch.float64)
    lo, hi = -x, 1 - x
    v = torch.randn(40, 8, generator=g, dtype=torch.float64)
    v[:, :3] = 0
    v[:5] = 0
    eps = max_l2_norm(lo, hi) * (0.3 + 0.7 * torch.rand(40, generator=g, dtype=torch.float64))
    p = project_l2_sphere(v, eps, lo, hi)
    assert not bool(torch.isfinite(_ray_scale(v, lo, hi, eps)).all())  # the fallback was exercised
    torch.testing.assert_close(p.norm(dim=1), eps, rtol=1e-9, atol=0)
    assert bool((p >= lo - 1e-12).all() and (p <= hi + 1e-12).all())


def test_projections_without_box_closed_form():
    v = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=torch.float64)
    eps = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(
        project_l2_ball(v, eps), torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]], dtype=torch.float64)
    )
    s = project_l2_sphere(v, eps)
    torch.testing.assert_close(s[:2], torch.tensor([[0.6, 0.8], [0.6, 0.8]], dtype=torch.float64))
    torch.testing.assert_close(s.norm(dim=1), eps)


def test_linf_projections_exact():
    lo, hi, v, eps = _box_case(7, b=10, d=5)
    eps = 0.6 * eps
    ball = project_linf(v, eps, lo, hi)
    for i in range(v.shape[0]):  # exact: box-constrained least squares is separable
        lower = np.maximum(lo[i].numpy(), -float(eps[i]))
        upper = np.minimum(hi[i].numpy(), float(eps[i]))
        res = minimize(
            lambda d, i=i: ((d - v[i].numpy()) ** 2).sum(),
            np.zeros(5),
            method="L-BFGS-B",
            bounds=list(zip(lower, upper, strict=True)),
            options={"ftol": 1e-15, "gtol": 1e-12},
        )
        np.testing.assert_allclose(ball[i].numpy(), res.x, atol=1e-6)
    sph = project_linf(v, eps, lo, hi, sphere=True)
    torch.testing.assert_close(sph.abs().amax(1), eps)
    assert bool((sph >= lo - 1e-12).all() and (sph <= hi + 1e-12).all())
    for i in range(v.shape[0]):  # brute force over which coordinate sits on the sphere
        best = math.inf
        for j in range(5):
            for sgn in (1.0, -1.0):
                val = sgn * float(eps[i])
                if not lo[i, j] - 1e-12 <= val <= hi[i, j] + 1e-12:
                    continue
                d = ball[i].clone()
                d[j] = val
                best = min(best, float(((d - v[i]) ** 2).sum()))
        assert float(((sph[i] - v[i]) ** 2).sum()) <= best + 1e-12


# --- max damage on the linear-Gaussian VAE ----------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["pgd", "adam", "lbfgsb"])
@pytest.mark.parametrize("constraint", ["ball", "sphere"])
def test_max_damage_finds_top_singular_vector(lin, optimizer, constraint):
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    steps = 150 if optimizer == "adam" else 50
    res = MaxDamageAttack(lin, 0.7, constraint=constraint, mode="mean", box=None, optimizer=optimizer, steps=steps)(x)
    v = lin.worst_direction()
    cos = (res.delta @ v) / res.delta.norm(dim=1)
    assert bool((cos.abs() > 0.99).all()), cos
    torch.testing.assert_close(res.norms, torch.full((4,), 0.7, dtype=torch.float64))
    # analytic optimum of ||W A delta|| = w * s_1 * eps
    opt = lin.decoder_scale * float(lin.singular_values()[0]) * 0.7
    assert bool((res.objective <= opt * (1 + 1e-9)).all() and (res.objective >= 0.999 * opt).all())


def test_max_damage_mean_var_with_restarts(lin):
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    res = MaxDamageAttack(lin, 0.7, constraint="sphere", box=None, num_noise_samples=256, restarts=3)(x)
    cos = (res.delta @ lin.worst_direction()) / res.delta.norm(dim=1)
    assert bool((cos.abs() > 0.99).all()), cos


def test_eps_list_and_per_point_eps(lin):
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    curve = MaxDamageAttack(lin, [0.2, 0.5], box=None, mode="mean", steps=20)(x)
    assert curve.delta.shape == (2, 3, 12) and curve.norms.shape == (2, 3)
    assert bool((curve.objective[1] > curve.objective[0]).all())
    per = MaxDamageAttack(lin, torch.tensor([0.1, 0.2, 0.3]), constraint="sphere", box=None, mode="mean", steps=20)(x)
    torch.testing.assert_close(per.norms, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    rows = curve.to_rows()
    assert len(rows) == 6 and {"eps", "objective", "point", "eps_index"} <= rows[0].keys()


def test_warm_start_init(lin):
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    v = lin.worst_direction()
    atk = MaxDamageAttack(lin, 0.5, constraint="sphere", mode="mean", box=None, steps=1)
    cold = atk(x)
    warm = atk.attack(x, init=0.1 * v.expand(3, 12).clone())  # rescaled onto the sphere, then refined
    cos = (warm.delta @ v) / warm.delta.norm(dim=1)
    assert bool((cos.abs() > 0.999).all())
    assert bool((warm.objective >= cold.objective).all())
    with pytest.raises(ValueError, match="init"):
        atk.attack(x, init=torch.zeros(3, 5, dtype=torch.float64))


# --- digits VAE: feasibility, determinism, strength --------------------------------------------------------
@pytest.mark.parametrize(
    "norm,constraint,optimizer,eps",
    [
        ("L2", "ball", "pgd", 1.5),
        ("L2", "sphere", "pgd", 2.0),
        ("L2", "sphere", "adam", 2.0),
        ("L2", "sphere", "lbfgsb", 1.0),
        ("Linf", "ball", "pgd", 0.1),
        ("Linf", "sphere", "adam", 0.1),
    ],
)
def test_every_delta_respects_norm_and_box(digits_model, digits_x, norm, constraint, optimizer, eps):
    steps = 10 if optimizer == "lbfgsb" else 15
    x = digits_x[:3] if optimizer == "lbfgsb" else digits_x
    res = MaxDamageAttack(digits_model, eps, norm=norm, constraint=constraint, optimizer=optimizer, steps=steps)(x)
    assert isinstance(res, AttackResult)
    assert bool((res.x_adv >= -1e-6).all() and (res.x_adv <= 1 + 1e-6).all())
    if constraint == "sphere":
        torch.testing.assert_close(res.norms, torch.full_like(res.norms, eps), rtol=1e-5, atol=1e-6)
    else:
        assert bool((res.norms <= eps * (1 + 1e-5)).all())
    assert bool((res.objective >= res.initial_objective).all())


def test_same_seed_same_result_and_batch_invariance(digits_model, digits_x):
    atk = MaxDamageAttack(digits_model, 1.5, constraint="sphere", steps=10, seed=4)
    a, b = atk(digits_x), atk(digits_x)
    assert torch.equal(a.delta, b.delta)
    c = MaxDamageAttack(digits_model, 1.5, constraint="sphere", steps=10, seed=5)(digits_x)
    assert not torch.equal(a.delta, c.delta)
    sub = atk.attack(digits_x[2:5], point_ids=torch.arange(2, 5))
    torch.testing.assert_close(sub.delta, a.delta[2:5], atol=1e-4, rtol=0)


def test_attack_beats_random_perturbations(digits_model, digits_x):
    eps = 1.5
    atk = MaxDamageAttack(digits_model, eps, constraint="sphere", steps=30, num_noise_samples=16)
    res = atk(digits_x)
    from vaefast.attacks.base import box_offsets
    from vaefast.attacks.engine import restart_noise

    lo, hi = box_offsets(digits_x, (0.0, 1.0))
    eta = restart_noise(torch.arange(6), 1, 16, digits_model.latent_dim, 0, "attack-noise", digits_x.dtype, "cpu")[:, 0]
    g = torch.Generator().manual_seed(0)
    best_random = torch.zeros(6, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(20):
            d = project_l2_sphere(
                torch.randn(6, 64, generator=g, dtype=torch.float64), torch.full((6,), eps, dtype=torch.float64), lo, hi
            ).float()
            val = atk.damage(digits_x, digits_x + d.view_as(digits_x), eta)
            best_random = torch.maximum(best_random, val.double())
    assert bool((res.objective.double() > best_random).all())


# --- targeted attacks ----------------------------------------------------------------------------------------
def test_gaussian_divergences_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, mu_t = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    lv, lv_t = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    from torch.distributions import Independent, Normal, kl_divergence

    q = Independent(Normal(mu, (0.5 * lv).exp()), 1)
    qt = Independent(Normal(mu_t, (0.5 * lv_t).exp()), 1)
    torch.testing.assert_close(gaussian_divergence("kl", mu, lv, mu_t, lv_t), kl_divergence(q, qt))
    skl = kl_divergence(q, qt) + kl_divergence(qt, q)
    torch.testing.assert_close(gaussian_divergence("skl", mu, lv, mu_t, lv_t), skl)
    w2 = ((mu - mu_t).pow(2).sum(1) + ((0.5 * lv).exp() - (0.5 * lv_t).exp()).pow(2).sum(1)).sqrt()
    torch.testing.assert_close(gaussian_divergence("w2", mu, lv, mu_t, lv_t), w2)
    torch.testing.assert_close(gaussian_divergence("mean_l2", mu, lv, mu_t, lv_t), (mu - mu_t).norm(dim=1))


@pytest.mark.parametrize("divergence", ["kl", "skl", "w2", "mean_l2"])
@pytest.mark.parametrize("mode", ["penalised", "budget"])
def test_latent_attack_reduces_divergence(digits_model, digits_x, divergence, mode):
    target = digits_x[-1:]
    kwargs = {"lam": 0.01} if mode == "penalised" else {"eps": 1.5}
    atk = LatentAttack(digits_model, target, divergence=divergence, mode=mode, steps=30, **kwargs)
    res = atk(digits_x[:4])
    assert bool((res.objective < res.initial_objective).all())
    assert bool((res.x_adv >= -1e-6).all() and (res.x_adv <= 1 + 1e-6).all())
    if mode == "budget":
        assert bool((res.norms <= 1.5 * (1 + 1e-5)).all())
    assert {"latent_distance", "target_distance", "input_distance"} <= res.extra.keys()


@pytest.mark.parametrize("loss", ["mse", "elbo"])
def test_output_attack_reduces_loss(digits_model, digits_x, loss):
    atk = OutputAttack(digits_model, digits_x[-1:], loss=loss, mode="budget", eps=[0.5, 2.0], steps=25)
    res = atk(digits_x[:4])
    assert res.objective.shape == (2, 4)
    assert bool((res.objective < res.initial_objective).all())
    assert bool((res.norms <= torch.tensor([[0.5], [2.0]]) * (1 + 1e-5)).all())


def test_lambda_sweep_and_auddc(digits_model, digits_x):
    atk = OutputAttack(digits_model, digits_x[-1:], mode="penalised", steps=20)
    sweep = atk.sweep(digits_x[:3], num=5, log2_range=(-8.0, 4.0))
    assert sweep.lams.shape == (5,) and sweep.result.delta.shape == (5, 3, 1, 8, 8)
    dist_in = sweep.result.extra["input_distance"]
    # larger lambda => smaller perturbation (monotone up to optimisation noise at the ends)
    assert bool((dist_in[0] >= dist_in[-1]).all())
    scale_in = (digits_x[-1:] - digits_x[:3]).flatten(1).norm(dim=1)
    base = distances(digits_model, digits_x[:3], torch.zeros_like(digits_x[:3]), digits_x[-1:])["target"]
    area = auddc(dist_in, sweep.result.extra["target_distance"], scale_in, base)
    assert area.shape == (3,) and bool(((area >= 0) & (area <= 1)).all())
    assert len(sweep.to_rows()) == 15


def test_auddc_hand_computed():
    # one point, curve through (0,1), (0.5, 0.2), flat to (1, 0.2): area = 0.5*(1+0.2)/2 + 0.5*0.2 = 0.4
    area = auddc(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.4], [0.5]]), torch.tensor([2.0]), torch.tensor([2.0]))
    # points (0.5, 0.2) and (1.0, 0.25 -> running min 0.2)
    torch.testing.assert_close(area, torch.tensor([0.4], dtype=torch.float64))


# --- one attack object, many calls: no per-call state -------------------------------------------------------------
def _same(a: AttackResult, b: AttackResult) -> None:
    for name, value in a.to_dict().items():
        other = b.to_dict()[name]
        assert other == value if isinstance(value, str) else torch.equal(other, value), name


def test_one_attack_object_serves_different_calls(digits_model, digits_x):
    x, t1, t2 = digits_x[:3], digits_x[-1:], digits_x[3:6]
    md = MaxDamageAttack(digits_model, 0.5, steps=6, restarts=2)
    first, second = md(x, eps=1.5), md(x)
    _same(first, MaxDamageAttack(digits_model, 1.5, steps=6, restarts=2)(x))
    _same(second, MaxDamageAttack(digits_model, 0.5, steps=6, restarts=2)(x))
    lat = LatentAttack(digits_model, t1, steps=6)
    by_target, by_lam, plain = lat(x, target=t2), lat(x, lam=0.3), lat(x)
    _same(by_target, LatentAttack(digits_model, t2, steps=6)(x))
    _same(by_lam, LatentAttack(digits_model, t1, lam=0.3, steps=6)(x))
    _same(plain, LatentAttack(digits_model, t1, steps=6)(x))
    out = OutputAttack(digits_model, t1, loss="elbo", mode="budget", eps=0.5, steps=6, num_noise_samples=4)
    curve, other = out(x, eps=[0.5, 1.0], target=t2), out(x)
    _same(curve, OutputAttack(digits_model, t2, loss="elbo", mode="budget", eps=[0.5, 1.0], steps=6,
                              num_noise_samples=4)(x))  # fmt: skip
    _same(other, OutputAttack(digits_model, t1, loss="elbo", mode="budget", eps=0.5, steps=6, num_noise_samples=4)(x))


@pytest.mark.parametrize("kind", ["max_damage", "latent", "output"])
def test_a_call_leaves_the_attack_object_untouched(digits_model, digits_x, kind):
    if kind == "max_damage":
        atk = MaxDamageAttack(digits_model, 0.5, steps=3)
    elif kind == "latent":
        atk = LatentAttack(digits_model, digits_x[-1:], steps=3)
    else:
        atk = OutputAttack(digits_model, digits_x[-1:], loss="elbo", steps=3)
    before = dict(vars(atk))
    atk(digits_x[:2])
    if kind != "max_damage":
        atk.sweep(digits_x[:2], lams=[0.1, 1.0], target=digits_x[2:4])
    assert vars(atk).keys() == before.keys()
    assert all(vars(atk)[k] is v for k, v in before.items())


def test_concurrent_calls_of_one_attack_object(digits_model, digits_x):
    from concurrent.futures import ThreadPoolExecutor

    calls = [(digits_x[:3], digits_x[3:4]), (digits_x[3:6], digits_x[:1]), (digits_x[1:5], digits_x[-1:]),
             (digits_x[:2], digits_x[4:6])]  # fmt: skip
    atk = OutputAttack(digits_model, digits_x[-1:], loss="elbo", mode="budget", eps=1.0, steps=15, num_noise_samples=4)
    expected = [atk(x, target=t) for x, t in calls]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda call: atk(call[0], target=call[1]), calls))
    for a, b in zip(got, expected, strict=True):
        _same(a, b)


# --- metrics -------------------------------------------------------------------------------------------------
def test_likelihood_degradation_linear_closed_form(lin):
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    delta = 0.3 * lin.worst_direction().expand(3, 12)
    out = likelihood_degradation(lin, x, delta)
    a, b = lin.encoder_mean.weight.detach(), lin.encoder_mean.bias.detach()
    w, c = lin.decoder_linear.weight.detach(), lin.decoder_linear.bias.detach()

    def loglik(z):
        diff = x - (z @ w.T + c)
        return -0.5 * (diff.pow(2).sum(1) + 12 * math.log(2 * math.pi))

    ll, ll_adv = loglik(x @ a.T + b), loglik((x + delta) @ a.T + b)
    torch.testing.assert_close(out.drop, ll - ll_adv)
    torch.testing.assert_close(out.relative, (ll_adv - ll).abs() / ll.abs())
    assert bool((out.relative >= 0).all())  # |.| / |log p|: >= 0 whatever the sign of log p


def test_likelihood_degradation_bernoulli_is_nonnegative(digits_model, digits_x):
    res = MaxDamageAttack(digits_model, 2.0, steps=15)(digits_x)
    deg = likelihood_degradation(digits_model, digits_x, res.delta)
    # log p < 0 (Bernoulli): the paper's signed form would be negative; vaefast's |.| / |log p| is not
    assert bool((deg.log_lik_clean < 0).all()) and bool((deg.relative > 0).all())
    assert torch.equal(deg.relative, deg.drop.abs() / deg.log_lik_clean.abs())
    zero = likelihood_degradation(digits_model, digits_x, torch.zeros_like(digits_x))
    assert bool((zero.relative == 0).all())
    assert len(deg.to_rows()) == 6


# --- bad inputs ----------------------------------------------------------------------------------------------
def test_bad_inputs(lin, digits_model, digits_x):
    x = torch.randn(2, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="norm"):
        MaxDamageAttack(lin, 0.5, norm="L1")
    with pytest.raises(ValueError, match="eps"):
        MaxDamageAttack(lin, 0.0)
    with pytest.raises(ValueError, match="eps"):
        MaxDamageAttack(lin, -1.0, box=None)(x)
    with pytest.raises(ValueError, match="constraint"):
        MaxDamageAttack(lin, 0.5, constraint="cube")
    with pytest.raises(ValueError, match="optimizer"):
        MaxDamageAttack(lin, 0.5, optimizer="sgd")
    with pytest.raises(ValueError, match="mode"):
        MaxDamageAttack(lin, 0.5, mode="var")
    with pytest.raises(ValueError, match="x must have shape"):
        MaxDamageAttack(lin, 0.5, box=None)(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="outside box"):
        MaxDamageAttack(lin, 0.5)(x)  # x ~ N(0, 1) violates the default (0, 1) box
    with pytest.raises(ValueError, match="eps as a tensor"):
        MaxDamageAttack(lin, torch.ones(3), box=None)(x)
    with pytest.raises(ValueError, match="sphere does not meet the box"):
        MaxDamageAttack(digits_model, 100.0, constraint="sphere")(digits_x)
    with pytest.raises(ValueError, match="NaN"):
        MaxDamageAttack(lin, 0.5, box=None)(torch.full((2, 12), float("nan"), dtype=torch.float64))
    with pytest.raises(TypeError, match="model"):
        MaxDamageAttack(object(), 0.5)
    with pytest.raises(ValueError, match="target"):
        LatentAttack(digits_model, digits_x[:2]).attack(digits_x[:3])
    with pytest.raises(ValueError, match="divergence"):
        LatentAttack(digits_model, digits_x[:1], divergence="js")
    with pytest.raises(ValueError, match="eps"):
        OutputAttack(digits_model, digits_x[:1], mode="budget")
    with pytest.raises(ValueError, match="delta"):
        likelihood_degradation(digits_model, digits_x, digits_x[:2])
    with pytest.raises(ValueError, match="box"):
        MaxDamageAttack(lin, 0.5, box=(1.0, 0.0))
    with pytest.raises(ValueError, match="eps"):
        MaxDamageAttack(lin, [0.5, -1.0], box=None)
    with pytest.raises(ValueError, match="point_ids"):
        MaxDamageAttack(lin, 0.5, box=None)(x, point_ids=torch.arange(3))
    with pytest.raises(TypeError, match="point_ids"):
        MaxDamageAttack(lin, 0.5, box=None)(x, point_ids=torch.zeros(2))
    with pytest.raises(ValueError, match="point_ids"):
        MaxDamageAttack(lin, 0.5, box=None)(x, point_ids=torch.tensor([0, -1]))
    with pytest.raises(TypeError, match="unexpected keyword"):
        MaxDamageAttack(lin, 0.5, box=None)(x, lam=0.1)
    with pytest.raises(ValueError, match="eps applies to mode='budget'"):
        LatentAttack(digits_model, digits_x[:1])(digits_x[:2], 0.1)  # a positional second argument is eps, not lam
    with pytest.raises(ValueError, match="lam"):
        LatentAttack(digits_model, digits_x[:1])(digits_x[:2], lam=-1.0)
    with pytest.raises(ValueError, match="target must have shape"):
        LatentAttack(digits_model, digits_x[:1])(digits_x[:2], target=torch.rand(1, 5))
    with pytest.raises(ValueError, match="target must have batch size 1 or 2"):
        OutputAttack(digits_model, digits_x[:1])(digits_x[:2], target=digits_x[:3])
    with pytest.raises(TypeError, match="log_likelihood"):
        OutputAttack(_NoLikelihood(), torch.zeros(1, 12), loss="elbo")
    with pytest.raises(ValueError, match="lams"):
        OutputAttack(digits_model, digits_x[:1]).sweep(digits_x[:2], lams=[0.1, float("inf")])


class _NoLikelihood(torch.nn.Module):
    """A protocol model without log_likelihood (encode/decode only)."""

    input_shape = (12,)
    latent_dim = 2

    def encode(self, x):
        return x[:, :2], x[:, :2]

    def decode(self, z):
        return z.repeat(1, 6)
