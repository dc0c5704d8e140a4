"""Sound certificates against the first-order bound and the numerical margin, for an ordinary VAE, one with every
network 4-Lipschitz, and one with a 2-Lipschitz encoder and an ordinary decoder (of ELBO close to the ordinary one;
``certify`` needs no decoder constant), on the embedded digits (MLP, Gaussian likelihood std 0.2).

Per model: the test ELBO, r = 1.3 x the median r* of the points, and over the certified points the median sound
certified radius (global and local Lipschitz constants), the median first-order bound, the median numerical margin,
and the seconds per point of ``certify`` (process CPU time, after a warm-up).

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_certify.py [--points 48] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vaefast.certification import certify
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


def study(name: str, overrides: dict, points: int, epochs: int) -> dict:
    """Train one model and measure its certificates, bound and margin on ``points`` test points."""
    cfg = VAEConfig(latent_dim=8, likelihood="gaussian", gaussian_std=0.2, **overrides)
    model = VAE(cfg, seed=0)
    train(model, load("digits").x, epochs=epochs, batch_size=64, lr=2e-3, seed=0, progress=False)
    model.eval()
    x = load("digits", "test").x[:points]
    elbo = evaluate(model, load("digits", "test"), seed=0)["elbo"]
    r = 1.3 * float(estimate_r_robustness(model, x, [1.0], num_samples=500).r_star.median())
    est = estimate_r_robustness(model, x, [r], num_samples=1000, seed=1)
    mb = margin_bound(model, x, r, estimate=est)
    nm = numerical_margin(model, x, r, estimate=est, seed=1, progress=False)
    out = {"model": name, "test_elbo": elbo, "r": r, "certified": int(mb.certified.sum())}
    ok = mb.certified
    for method in ("global", "local"):
        certify(model, x[:2], r, method=method)  # warm-up
        t0 = time.process_time()
        cert = certify(model, x, r, method=method, estimate=est)
        out[f"seconds_per_point_{method}"] = (time.process_time() - t0) / points
        out[f"median_cert_{method}"] = statistics.median(cert.radius[ok].tolist())
        out[f"cert_le_margin_{method}"] = float((cert.radius[ok] <= nm.margin[ok]).double().mean())
    out["median_bound"] = statistics.median(mb.bound[ok].tolist())
    out["median_margin"] = statistics.median(nm.margin[ok].tolist())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=48)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [study(name, kw, args.points, args.epochs) for name, kw in MODELS.items()]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
