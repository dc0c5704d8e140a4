"""Numerical margins against the closed form of the linear-Gaussian VAE (statistical tests with stated false-alarm
rates: coverage of the bracket, bias of the estimate, lower ends), the multi-radius path against single-radius
searches, the three-way clean decision shared with the bound, evidence replay, the grid protocol, budgets,
determinism, the command line and bad inputs."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from scipy import optimize, stats

from vaefast.core.decide import BROKEN, Rule, decide
from vaefast.core.encoding import encode
from vaefast.core.options import MarginOptions
from vaefast.core.sampling import Sampler
from vaefast.core.search import budget, start_radius
from vaefast.margin import NumericalMargin, numerical_margin
from vaefast.robustness import estimate_r_robustness, margin_bound
from vaefast.testing import LinearGaussianVAE

torch.set_num_threads(1)

R = 1.0  # reconstruction radius for the default linear model (p_r(x, 0) ~ 0.82, true margin ~ 0.226)
LG = dict(box=None, max_radius=3.0, mode="mean")  # the linear model's inputs are unbounded


def _radius_for_p0(model: LinearGaussianVAE, p0: float) -> float:
    """The r at which the exact clean p_r(x, 0) is p0."""
    return model._scale() * math.sqrt(stats.chi2.ppf(p0, model.latent_dim))


def _radius_at(model: LinearGaussianVAE, r: float, p: float) -> float:
    """Exact attack radius (along the worst direction) at which p_r(x, delta) = p."""
    t = (r / model._scale()) ** 2
    lam = optimize.brentq(lambda lam: stats.ncx2.cdf(t, model.latent_dim, lam) - p, 1e-12, 1e3)
    return model.sigma * math.sqrt(lam) / float(model.singular_values()[0])


def _binomial_limit(n: int, p: float, false_alarm: float = 1e-3) -> int:
    """The largest count of Binomial(n, p) not rejected at ``false_alarm`` (one-sided)."""
    return int(stats.binom.ppf(1 - false_alarm, n, p))


MODELS = {
    "d3": LinearGaussianVAE(),  # D = 12, d = 3, sigma 0.3
    "d5": LinearGaussianVAE(input_dim=20, latent_dim=5, sigma=0.5, decoder_scale=1.2, seed=3),
}


@pytest.fixture(scope="module")
def closed_form_runs():
    """Per (model, S, p0): the three numbers of 32 points x 2 seeds against the true margin."""
    out = {}
    for name, model in MODELS.items():
        x = torch.full((32, model.input_shape[0]), 0.5, dtype=torch.float64)
        for s in (200, 1000, 5000):
            for p0 in (0.52, 0.6, 0.8, 0.99):
                r = _radius_for_p0(model, p0)
                runs = [numerical_margin(model, x, r, num_samples=s, seed=seed, **LG) for seed in range(2)]
                out[name, s, p0] = (model.true_margin(r), runs)
    return out


def _decided(runs: list[NumericalMargin]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ok = torch.cat([res.clean == 1 for res in runs])
    cat = {f: torch.cat([getattr(res, f) for res in runs])[ok] for f in ("margin", "lower", "upper")}
    return cat["margin"], cat["lower"], cat["upper"]


def test_the_bracket_contains_the_truth_at_no_less_than_the_nominal_rate(closed_form_runs):
    """[margin_lower, margin_upper] misses the true margin with probability at most 1 - confidence = 5% per item:
    over every (model, S, p0) item, the misses must not exceed the 1e-3 false-alarm quantile of Binomial(n, 5%)."""
    misses = n = 0
    for true, runs in closed_form_runs.values():
        _, lower, upper = _decided(runs)
        upper = torch.nan_to_num(upper, nan=math.inf)
        misses += int(((lower > true) | (upper < true)).sum())
        n += lower.numel()
    assert n > 500
    assert misses <= _binomial_limit(n, 0.05), (misses, n)


def test_the_estimate_is_unbiased_and_its_error_falls_with_the_samples(closed_form_runs):
    """Relative bias at most 5% at S = 1000 for p0 >= 0.6 (a one-sided z-test at false-alarm rate 1e-3 on the mean of
    64 items), and the mean absolute error falls as S grows (200 -> 1000 -> 5000)."""
    z = stats.norm.ppf(1 - 1e-3)
    for name in MODELS:
        for p0 in (0.6, 0.8, 0.99):
            true, runs = closed_form_runs[name, 1000, p0]
            est = _decided(runs)[0] / true
            se = float(est.std()) / math.sqrt(est.numel())
            assert abs(float(est.mean()) - 1) <= 0.05 + z * se, (name, p0, float(est.mean()), se)
            errors = []
            for s in (200, 1000, 5000):
                t, rs = closed_form_runs[name, s, p0]
                errors.append(float((_decided(rs)[0] / t - 1).abs().mean()))
            assert errors[0] > errors[1] > errors[2], (name, p0, errors)


def test_no_lower_end_lies_above_the_truth_in_expectation(closed_form_runs):
    """The mean of margin_lower is at most the true margin in every cell (and it is a positive, decided radius where
    the clean point is far from the boundary)."""
    for (name, s, p0), (true, runs) in closed_form_runs.items():
        _, lower, _ = _decided(runs)
        if lower.numel():
            assert float(lower.mean()) <= true, (name, s, p0, float(lower.mean()), true)
    _, lower, _ = _decided(closed_form_runs["d3", 1000, 0.99][1])
    assert bool((lower > 0).all())


def test_near_the_boundary_points_are_undecided_and_never_compared(closed_form_runs):
    """At p0 = 0.52 and S = 200 most clean points cannot be decided: they get no margin (NaN), lower 0, no evidence."""
    for res in closed_form_runs["d3", 200, 0.52][1]:
        undecided = res.clean == 0
        assert int(undecided.sum()) > 16
        assert bool(res.margin[undecided].isnan().all() and res.upper[undecided].isnan().all())
        assert bool((res.lower[undecided] == 0).all() and ~res.bracketed[undecided].any())


def test_many_radii_on_one_path_equal_single_radius_searches():
    """One attack path per point serves every radius: each radius's estimate equals a single-radius search within the
    tolerance, and both brackets contain the truth."""
    model = MODELS["d3"]
    x = torch.full((8, 12), 0.5, dtype=torch.float64)
    radii = [_radius_for_p0(model, p) for p in (0.7, 0.85, 0.97)]
    kw = dict(num_samples=2000, seed=4, tol=0.01, **LG)
    many = numerical_margin(model, x, radii, **kw)
    assert many.margin.shape == (8, 3) and many.delta.shape == (8, 3, 12)
    for k, r in enumerate(radii):
        one = numerical_margin(model, x, r, **kw)
        true = model.true_margin(r)
        assert bool(((many.margin[:, k] - one.margin).abs() <= 0.01 + 1e-9).all()), (k, many.margin[:, k], one.margin)
        for res in (many.at(r), one):
            assert bool((res.lower <= true).all() and (res.upper >= true).all())


def test_evidence_replays_and_margins_order(digits_vae, digits):
    """Every bracketed margin > 0 comes with the delta that broke r-robustness: ||delta|| = upper, inside the box, and
    the counts the search saw there replay exactly from the search's own stream at its per-decision level;
    lower <= margin <= upper."""
    x = digits[1].x[:16]
    r, tol = 1.5, 0.02
    opts = MarginOptions(num_samples=500, steps=20, tol=tol)
    res = numerical_margin(digits_vae, x, r, options=opts, seed=5, point_offset=100)
    ok = (res.clean == 1) & res.bracketed
    assert bool(ok.any()) and res.delta.shape == x.shape
    norms = res.delta.flatten(1).double().norm(dim=1)
    torch.testing.assert_close(norms[ok], res.upper[ok], rtol=1e-5, atol=0)
    adv = x + res.delta
    assert float(adv.min()) >= -1e-6 and float(adv.max()) <= 1 + 1e-6
    assert bool((res.lower[ok] <= res.margin[ok]).all() and (res.margin[ok] <= res.upper[ok]).all())
    assert bool((res.p_hat_delta[ok] <= 0.5).all())
    torch.testing.assert_close(res.p_hat_delta[ok], res.hits_delta[ok].double() / res.samples_delta[ok].double())
    caps = res.max_radius
    _, _, rows = budget(opts, caps, start_radius(opts, caps), 1)
    rule = Rule.sequential(500, 0.05 / rows)
    i = int(ok.nonzero()[0])
    sampler = Sampler(digits_vae, x.device)
    enc = encode(digits_vae, x[i : i + 1], res.delta[i : i + 1])
    dec = decide(sampler, enc, torch.tensor([100 + i]), torch.tensor([r], dtype=torch.float64), rule, 5)
    assert int(dec.decision[0, 0]) == BROKEN
    assert int(dec.hits[0, 0]) == int(res.hits_delta[i]) and int(dec.samples[0, 0]) == int(res.samples_delta[i])


def test_one_clean_point_decision_with_the_bound():
    """At r = r* every point is borderline: the bound, the margin search and the estimate share one three-way decision
    (certified exactly when decided robust; not robust -> margin 0 with the clean counts as evidence)."""
    model = MODELS["d3"]
    x = torch.randn(24, 12, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    r = model.r_star() * 1.02
    est = estimate_r_robustness(model, x, r, num_samples=1000, seed=3)
    mb = margin_bound(model, x, r, estimate=est)
    nm = numerical_margin(model, x, r, num_samples=1000, steps=10, seed=3, estimate=est, **LG)
    assert torch.equal(nm.clean, est.decision[:, 0]) and torch.equal(mb.certified, nm.clean == 1)
    assert {-1, 0, 1} >= set(nm.clean.tolist()) and int((nm.clean == 0).sum()) > 0
    assert bool((nm.margin[nm.clean == 1] > 0).all() and nm.margin[nm.clean == 0].isnan().all())
    broken = nm.clean == -1
    assert bool((nm.margin[broken] == 0).all() and (nm.upper[broken] == 0).all())
    torch.testing.assert_close(nm.p_hat_delta[broken], est.p_hat[broken, 0])
    with pytest.raises(ValueError, match="no column for r"):
        numerical_margin(model, x, 2 * r, estimate=est, **LG)
    with pytest.raises(ValueError, match="covers 24 points"):
        numerical_margin(model, x[:3], r, estimate=est, **LG)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attacks_find_the_worst_direction(seed):
    """Attack strength where random starts converge slowly: top two singular values close (1.71, 1.35), 25 steps.
    Along the second direction the crossing would be at 1.71 / 1.35 = 1.27 x the truth: every estimate must stay
    below 1.2 x the truth and their mean within 5% of it (the points' Monte-Carlo errors are independent), and the
    evidence below the radius where the exact p_r along the worst direction is 0.3."""
    model = LinearGaussianVAE(seed=1, input_dim=12, latent_dim=3, sigma=0.5, decoder_scale=1.5)
    x = torch.rand(6, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5 + 0.25
    res = numerical_margin(model, x, 1.4, tol=0.02, num_samples=1024, steps=25, seed=seed, **LG)
    true = model.true_margin(1.4)
    assert bool(res.bracketed.all())
    assert bool((res.margin < 1.2 * true).all()) and abs(float(res.margin.mean()) / true - 1) < 0.05, (res.margin, true)
    assert bool((res.upper >= true).all() and (res.upper <= _radius_at(model, 1.4, 0.3)).all()), res.upper


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(tol=0.005),
        dict(tol=0.005, strategy="halving"),
        dict(tol=0.05, max_radius=0.3, start_radius=0.001),  # tiny start: growth must speed up to meet its budget
        dict(tol=1e-4, max_radius=0.24, start_radius=0.2),  # margin near the cap, narrow tolerance
        dict(tol=0.02, decision="fixed", num_samples=2000),
    ],
)
def test_every_search_stays_within_its_bonferroni_budget(kwargs):
    """A point attacks at most D = budget(...) inputs (the divisor of its per-decision level), for one radius or
    three, whatever the radii it chooses; the crossing's bracket closes at tol."""
    model = MODELS["d3"]
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    kw = dict(LG, num_samples=4000, steps=20) | kwargs
    opts = MarginOptions(**{k: v for k, v in kw.items() if k not in ("box",)})
    for radii in (R, [0.8 * R, R, 1.3 * R]):
        res = numerical_margin(model, x, radii, box=None, options=opts)
        k = 1 if isinstance(radii, float) else 3
        _, _, rows = budget(opts, res.max_radius, start_radius(opts, res.max_radius), k)
        assert int(res.rows.max()) <= rows, (res.rows, rows)
        ok = res.bracketed & (res.clean == 1)
        assert bool(ok.any()) and bool((res.p_hat_delta[ok] <= 0.5).all())


def test_a_point_gets_the_same_margin_alone_and_in_a_batch(digits_vae, digits):
    """Radii, attacks and decisions are keyed by the global point id: a point gets the same numbers alone
    (``point_offset`` = its id) as in a batch, given the same search limit."""
    model, xd = digits_vae, digits[1].x[:5]
    xl = torch.randn(5, 12, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    cases = [(MODELS["d3"], xl, R, dict(num_samples=2000, steps=15, tol=0.01, **LG)),
             (model, xd, 1.5, dict(max_radius=2.0, num_samples=500, steps=15, tol=0.02))]  # fmt: skip
    for m, x, r, kw in cases:
        whole = numerical_margin(m, x, r, seed=3, point_offset=20, **kw)
        for i in range(x.shape[0]):
            alone = numerical_margin(m, x[i : i + 1], r, seed=3, point_offset=20 + i, **kw)
            flat = [v for pair in whole.evaluations[i] for v in pair]
            assert [v for pair in alone.evaluations[0] for v in pair] == pytest.approx(flat, rel=1e-9, abs=1e-12)
            for name in ("margin", "lower", "upper", "hits_delta"):
                got, want = float(getattr(alone, name)[0]), float(getattr(whole, name)[i])
                assert got == pytest.approx(want, rel=1e-9, nan_ok=True), (name, got, want)


def test_grid_protocol_agrees_with_the_truth():
    """grid + one point at a time + L-BFGS-B attacks + a fixed sample count (the original protocol): the first grid
    radius still robust is within the Monte-Carlo band of the truth; its evidence is the grid radius above."""
    model = MODELS["d3"]
    x = torch.randn(2, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    true, n = model.true_margin(R), 20000
    res = numerical_margin(
        model, x, R, method="grid", granularity=0.02, max_radius=true + 0.05, box=None, num_samples=n,
        decision="fixed", optimizer="lbfgsb", steps=30, mode="mean", one_at_a_time=True,
    )  # fmt: skip
    c = 4 * 0.5 / math.sqrt(n)
    lo, hi = _radius_at(model, R, 0.5 + c), _radius_at(model, R, 0.5 - c)
    assert bool((res.margin >= lo - 0.02).all() and (res.margin <= hi).all()), (res.margin, lo, hi)
    torch.testing.assert_close(res.upper, res.margin + 0.02)
    torch.testing.assert_close(res.delta.flatten(1).norm(dim=1), res.upper)


def test_not_robust_points_and_a_search_limit_below_the_margin():
    model = MODELS["d3"]
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    low = numerical_margin(model, x, 0.5 * model.r_star(), num_samples=2000, **LG)  # p_r(x, 0) < 1/2
    assert bool((low.margin == 0).all() and (low.upper == 0).all() and low.bracketed.all())
    capped = numerical_margin(model, x, R, num_samples=2000, box=None, max_radius=0.1, mode="mean")
    assert bool((capped.margin == 0.1).all()) and not bool(capped.bracketed.any()) and capped.upper.isnan().all()


def test_deterministic_and_one_at_a_time():
    model = MODELS["d3"]
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = dict(num_samples=2000, tol=0.02, steps=20, **LG)
    a = numerical_margin(model, x, R, seed=7, **kw)
    b = numerical_margin(model, x, R, seed=7, **kw)
    assert torch.equal(a.margin, b.margin) and a.evaluations == b.evaluations
    single = numerical_margin(model, x, R, seed=7, one_at_a_time=True, **kw)
    torch.testing.assert_close(single.margin, a.margin)
    torch.testing.assert_close(single.delta, a.delta)
    rows = a.to_rows()
    assert isinstance(a, NumericalMargin) and len(rows) == 3 and rows[0]["clean"] == "robust"


def test_bound_below_the_margin_on_digits(digits_vae, digits):
    x, r = digits[1].x[:24], 1.5
    est = estimate_r_robustness(digits_vae, x, r, num_samples=1000)
    res = numerical_margin(digits_vae, x, r, num_samples=1000, steps=30, estimate=est)
    bound = margin_bound(digits_vae, x, r, estimate=est)
    ok = (res.clean == 1) & res.bracketed
    assert bool(ok.any())
    assert (bound.bound[ok] <= res.upper[ok]).double().mean().item() >= 0.95
    assert (bound.bound[ok] <= res.margin[ok]).double().mean().item() >= 0.95
    assert all(rad <= float(res.max_radius[i]) + 1e-9 for i, ev in enumerate(res.evaluations) for rad, _ in ev)


def test_cli_margin(digits_vae_run, tmp_path, capsys):
    from vaefast.cli import main

    out = tmp_path / "margins.csv"
    args = ["margin", str(digits_vae_run), "--data", "digits", "--points", "4", "--r", "1.5", "--steps", "10",
            "--samples", "500", "--out", str(out), "--bound"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "median" in text and "margin_lower" in text and "margin_upper" in text
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {"margin", "margin_lower", "margin_upper", "clean", "bound"} <= set(rows[0])
    assert main(["margin", str(digits_vae_run), "--points", "0", "--r", "1.0"]) == 2


def test_bad_inputs(digits_vae, digits):
    model = MODELS["d3"]
    xl = torch.randn(2, 12, dtype=torch.float64)
    cases = [
        (dict(method="newton"), ValueError, "method"),
        (dict(tol=-1.0), ValueError, "tol"),
        (dict(decision="bayes"), ValueError, "decision"),
        (dict(strategy="newton"), ValueError, "strategy"),
        (dict(num_samples=1.5), TypeError, "num_samples"),
        (dict(stepz=3), TypeError, "stepz"),
        (dict(options={"tol": 1}), TypeError, "options"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            numerical_margin(model, xl, R, **(LG | kwargs))
    with pytest.raises(ValueError, match="r must"):
        numerical_margin(model, xl, 0.0, **LG)
    with pytest.raises(ValueError, match="outside box"):
        numerical_margin(model, xl, R, max_radius=1.0)
    with pytest.raises(ValueError, match="max_radius is needed"):
        numerical_margin(model, xl, R, box=None)
    with pytest.raises(ValueError, match="x must have shape"):
        numerical_margin(model, torch.randn(2, 5, dtype=torch.float64), R, **LG)
    with pytest.raises(ValueError, match="max_radius"):
        numerical_margin(digits_vae, digits[1].x[:2], 1.5, max_radius=100.0)


def test_host_synchronisations_per_round_do_not_grow_with_the_points(digits_vae, digits):
    """A round of the search is one batched attack per tier and one batched decision for every point and radius:
    the reads of tensor values (each a host synchronisation on a GPU: bool, item, tolist, cpu, int/float, numpy,
    nonzero) are the same, round by round, for 4 points and for 32. The points are copies of one point under one id,
    so every copy's search takes the same rounds and only the batch size differs (the count includes CPU-side reads
    of the search's bookkeeping, which is also independent of the number of points)."""
    import vaefast.core.search as search_module
    from vaefast.core.box import UNIT_BOX
    from vaefast.margin import margins_validated
    from vaefast.robustness import estimate_validated

    names = ("__bool__", "item", "tolist", "cpu", "__int__", "__float__", "numpy", "__index__", "nonzero")
    counter, marks = [0], []
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def counting(name):
        def call(self, *args, **kwargs):
            counter[0] += 1
            return originals[name](self, *args, **kwargs)

        return call

    update = search_module._update

    def marked(*args, **kwargs):
        marks.append(counter[0])
        return update(*args, **kwargs)

    per_round = {}
    radii, options = torch.tensor([1.2, 1.5], dtype=torch.float64), MarginOptions(num_samples=300, steps=5, tol=0.05)
    for b in (4, 4, 32):  # the first run fills the decision rule's caches of critical counts (CPU work)
        x = digits[1].x[:1].repeat(b, 1, 1, 1)
        ids = torch.zeros(b, dtype=torch.int64)
        sampler = Sampler(digits_vae, x.device)
        est = estimate_validated(digits_vae, x, None, radii, ids, 300, 0, 0.95, sampler)
        clean = (est.decision, est.hits, torch.full_like(est.hits, 300))
        counter[0], marks[:] = 0, []
        try:
            search_module._update = marked
            for n in names:
                setattr(torch.Tensor, n, counting(n))
            margins_validated(digits_vae, x, encode(digits_vae, x), radii, ids, clean, options, UNIT_BOX, 0, sampler)
        finally:
            search_module._update = update
            for n, f in originals.items():
                setattr(torch.Tensor, n, f)
        per_round[b] = [j - i for i, j in zip([0, *marks[:-1]], marks, strict=True)]
    assert len(per_round[4]) >= 3 and per_round[32] == per_round[4], per_round
