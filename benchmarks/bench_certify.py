"""Sound certificates: tightness against the numerical margin, against the published certificates of Barrett et al.
(2022), and seconds per point.

**Tightness** (``--study``, the default). On the embedded digits (MLP 64-128-128-8, Gaussian likelihood std 0.2):
an ordinary VAE, one with every network 4-Lipschitz, one with a 2-Lipschitz encoder and an ordinary decoder. Per
model, r = 1.3 x the median r* of the points; over the points the estimate certifies: the median of vaefast's sound
certificate (global and local constants) over the numerical margin, the median first-order bound, and per point the
ratio of vaefast's local certificate to the better of the baselines.

**The baselines** (Barrett, Camuto, Willetts & Rainforth, "Certifiably Robust Variational Autoencoders", AISTATS
2022, arXiv 2102.07559; their code: ``solve_bound_inequality`` and ``solve_bound_2``). Constants: ``a`` of the
decoder mean map g, ``b`` of the encoder mean, ``c`` of the encoder sigma (all global, l2; ``a``, ``b`` computed by
vaefast.certification's global rules). Their r-robustness compares two stochastic reconstructions, ``z ~ q(z|x)``
and ``z' ~ q(z|x + delta)``:

- Markov: ``P(||g(z') - g(z)|| > r) <= E||g(z') - g(z)||^2 / r^2 <= a^2 (b^2 d^2 + (c d + 2 ||sigma(x)||)^2) / r^2``,
  so ``d`` is certified when ``a^2 (b^2 d^2 + (c d + 2 ||sigma(x)||)^2) <= r^2 / 2``;
- chi^2 tail: with ``gamma >= sigma_i`` at x and x + delta, ``||z' - z|| <= b d + sqrt(2) gamma ||eps||``
  (``eps ~ N(0, I_m)``), so ``p >= P(chi2_m <= u)``, ``u = (r / a - b d)^2 / (2 gamma^2)``; they bound the tail by
  ``C_m u^(m/2) e^(-u/2) / (u - m + 2)`` (``u > m - 2``; ``C_m = exp((m - (m - 1) log m) / 2) / sqrt(pi)``, a
  Stirling bound of ``2 / (2^(m/2) Gamma(m/2))``) and certify the largest ``d`` of a 200-point grid on
  ``[0, r / (a b)]`` with tail ``<= 1/2``.

Our models have no global constant of ``sigma = exp(logvar / 2)`` (the log-variance is soft-clamped to +-10), so the
baselines get the most favourable valid reading, per point: ``||sigma(x') - sigma(x)|| <= sigma_max(x) L_s d
e^(L_s d)`` and ``gamma = sigma_max(x) e^(L_s d)`` with ``L_s`` the global constant of ``log sigma``. Besides the
published forms we report them adapted to vaefast's r-robustness (reference ``g(mu(x))``: ``||sigma(x)||`` instead of
``2 ||sigma(x)||``, no ``sqrt 2``, the exact chi^2 median instead of the tail bound): stronger baselines. The ratio
per point is against the best of all four.

**Timing** (``--timing``): seconds per point of ``certify`` (process CPU time after a warm-up trace; estimate given)
on random-weight MLPs, 8x8 (64-128-128-8, 16 points) and MNIST-sized (784-512-512-10, 8 points), global and local;
``--before FILE`` also times the earlier implementation (a ``vaefast/certify.py`` module file of a previous commit);
and seconds per (point, radius) item of ``EncoderCertifier.radii`` with 5 radii per point (the sweep's call).

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_certify.py [--points 48] [--timing] [--before F]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time

import torch
from scipy import stats

from vaefast.certification import EncoderCertifier, certify, lipschitz_constant
from vaefast.data import load
from vaefast.margin import numerical_margin
from vaefast.models import VAE, VAEConfig
from vaefast.robustness import estimate_r_robustness, margin_bound
from vaefast.training import evaluate, train

MODELS = {
    "ordinary": {"hidden": (128, 128)},
    "lipschitz": {"hidden": (128, 128), "lipschitz": 4.0},
    "lipschitz_encoder": {"hidden": (128, 128), "lipschitz": {"mu": 2.0, "logvar": 2.0}},
}


def _largest(accepts, hi: float, steps: int = 60) -> float:
    """The largest d in [0, hi] with ``accepts(d)`` (monotone: accepted below, rejected above), 0 if none."""
    if not accepts(0.0):
        return 0.0
    lo = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if accepts(mid) else (lo, mid)
    return lo


def barrett(a: float, b: float, ls: float, sigma: torch.Tensor, r: float) -> dict[str, float]:
    """The four baseline certificates of one point (module docstring).

    Args:
        a, b: global constants of the decoder mean and the encoder mean.
        ls: global constant of ``log sigma``.
        sigma: ``sigma(x)`` ``[m]``.
        r: the reconstruction radius.

    Returns:
        ``markov``, ``chi2`` (published forms) and ``markov_adapted``, ``chi2_adapted``.
    """
    m, norm, top = sigma.numel(), float(sigma.norm()), float(sigma.max())
    hi = r / (a * b)

    def c(d: float) -> float:
        return top * ls * math.exp(ls * d)

    def markov(d: float, k: float) -> bool:
        return a * a * (b * b * d * d + (c(d) * d + k * norm) ** 2) <= r * r / 2

    def tail(u: float) -> float:
        log_c = 0.5 * (m - (m - 1) * math.log(m)) - 0.5 * math.log(math.pi)
        return math.exp(log_c + 0.5 * m * math.log(u) - 0.5 * u) / (u - m + 2) if u > m - 2 else math.inf

    def u(d: float, scale: float) -> float:
        return max(r / a - b * d, 0.0) ** 2 / (scale * (top * math.exp(ls * d)) ** 2)

    grid = [hi * i / 199 for i in range(200)]
    median = float(stats.chi2.ppf(0.5, m))
    return {
        "markov": _largest(lambda d: markov(d, 2.0), hi),
        "chi2": max([d for d in grid if tail(u(d, 2.0)) <= 0.5 and r / a - b * d > 0], default=0.0),
        "markov_adapted": _largest(lambda d: markov(d, 1.0), hi),
        "chi2_adapted": _largest(lambda d: u(d, 1.0) > median and r / a - b * d > 0, hi),
    }


def against_baselines(model, x, est, r: float, constants: tuple[float, float, float]) -> dict:
    """vaefast's local certificate at radius r over the best published baseline and over the best of all four, per
    point (over the points where either certifies a positive radius)."""
    cert = certify(model, x, r, method="local", estimate=est).radius
    sigma = torch.exp(0.5 * model.encode(x)[1].detach().double())
    base = [barrett(*constants, sigma[i], r) for i in range(x.shape[0])]
    out = {"r": r, "ours_median": float(cert.median())}
    out.update({f"{k}_median": statistics.median(row[k] for row in base) for k in base[0]})
    for label, keys in (("published", ("markov", "chi2")), ("all", tuple(base[0]))):
        best = torch.tensor([max(row[k] for k in keys) for row in base], dtype=torch.float64)
        some = (best > 0) | (cert > 0)
        ratio = cert[some] / best[some]
        if bool(some.any()):
            out[f"min_ratio_{label}"] = float(ratio.min())
            out[f"ours_ge_{label}"] = f"{int((ratio >= 1).sum())}/{int(some.sum())}"
    return out


def study(name: str, overrides: dict, points: int, epochs: int, scales: list[float]) -> dict:
    """Train one model; its certificates, baselines, bound and margin on ``points`` test points."""
    cfg = VAEConfig(latent_dim=8, likelihood="gaussian", gaussian_std=0.2, **overrides)
    model = VAE(cfg, seed=0)
    train(model, load("digits").x, epochs=epochs, batch_size=64, lr=2e-3, seed=0, progress=False)
    model.eval()
    x = load("digits", "test").x[:points]
    elbo = evaluate(model, load("digits", "test"), seed=0)["elbo"]
    r = 1.3 * float(estimate_r_robustness(model, x, [1.0], num_samples=500).r_star.median())
    est = estimate_r_robustness(model, x, [r * s for s in scales], num_samples=1000, seed=1)
    mb = margin_bound(model, x, r, estimate=est)
    nm = numerical_margin(model, x, r, estimate=est, seed=1, progress=False)  # (r is the estimate's first column)
    certs = {m: certify(model, x, r, method=m, estimate=est) for m in ("global", "local")}
    ok = (certs["local"].radius > 0) & (nm.margin > 0)
    a = lipschitz_constant(model.decode, model, model.encode(x)[0].detach())
    b = lipschitz_constant(lambda t: model.encode(t)[0], model, x)
    ls = EncoderCertifier.for_model(model, x).bounds.global_log_sigma()[0]
    out = {"model": name, "test_elbo": elbo, "r": r, "certified": int(ok.sum()), "a": a, "b": b, "L_s": ls}
    for m, cert in certs.items():
        out[f"median_cert_over_margin_{m}"] = statistics.median((cert.radius[ok] / nm.margin[ok]).tolist())
        out[f"cert_le_margin_{m}"] = float((cert.radius[ok] <= nm.margin[ok]).double().mean())
        out[f"median_cert_{m}"] = statistics.median(cert.radius[ok].tolist())
    out["baselines"] = [against_baselines(model, x, est, r * s, (a, b, ls)) for s in scales]
    out["median_bound"] = statistics.median(mb.bound[ok].tolist())
    out["median_margin"] = statistics.median(nm.margin[ok].tolist())
    return out


def _module(path: str):
    spec = importlib.util.spec_from_file_location("certify_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["certify_before"] = module
    spec.loader.exec_module(module)
    return module


def timing(before: str | None) -> list[dict]:
    """Seconds per point of certify on random-weight MLPs (module docstring)."""
    old = _module(before) if before else None
    rows = []
    for name, cfg, n in [
        ("8x8 MLP 64-128-128-8", {"hidden": (128, 128), "latent_dim": 8, "likelihood": "gaussian"}, 16),
        ("784-512-512-10", {"input_shape": (1, 28, 28), "hidden": (512, 512), "latent_dim": 10}, 8),
    ]:
        model = VAE(VAEConfig(**cfg), seed=0).eval()
        x = torch.rand(n, *model.input_shape, generator=torch.Generator().manual_seed(0))
        r = 1.2 * float(estimate_r_robustness(model, x, [1.0], num_samples=200).r_star.median())
        est = estimate_r_robustness(model, x, [r], num_samples=500)
        certify(model, x[:2], r)  # the trace, once per model
        for method in ("global", "local"):
            row = {"model": name, "method": method}
            t0 = time.process_time()
            row["radius_median"] = float(certify(model, x, r, method=method, estimate=est).radius.median())
            row["seconds_per_point"] = (time.process_time() - t0) / n
            if old is not None:
                t0 = time.process_time()
                before_radius = old.certify(model, x, r, method=method, estimate=est, iterations=12).radius
                row["before_seconds_per_point"] = (time.process_time() - t0) / n
                row["before_radius_median"] = float(before_radius.median())
            rows.append(row)
        rows.append(_five_radii(model, x, r, name))
    return rows


def _five_radii(model, x, r: float, name: str) -> dict:
    """Seconds per (point, radius) item of ``EncoderCertifier.radii`` with 5 radii per point at once (the sweep's
    call), global and local together."""
    from vaefast.stats import clopper_pearson_one_sided

    radii = [r * f for f in (0.6, 0.8, 1.0, 1.25, 1.6)]
    hits = estimate_r_robustness(model, x, radii, num_samples=500).hits
    p_low = clopper_pearson_one_sided(hits, 500, 0.05)[0]
    certifier = EncoderCertifier.for_model(model, x)
    t0 = time.process_time()
    for method in ("global", "local"):
        certifier.radii(x, p_low, method)
    return {
        "model": name,
        "method": "global+local, 5 radii",
        "seconds_per_item": (time.process_time() - t0) / hits.numel(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=48)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--timing", action="store_true", help="time certify on random-weight MLPs instead")
    p.add_argument("--before", default=None, help="a vaefast/certify.py of a previous commit, to time as well")
    scales_help = "radii (multiples of r) at which to compare with the baselines; the first is r itself"
    p.add_argument("--r-scales", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0], help=scales_help)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.timing:
        rows = timing(args.before)
    else:
        rows = [study(name, kw, args.points, args.epochs, args.r_scales) for name, kw in MODELS.items()]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
