"""Benchmark of the r-robustness estimator (issue 4).

1. Time of ``estimate_r_robustness`` on an MNIST-sized MLP VAE (784-512-512-10, mirrored decoder, random init) with
   S samples for B points, against (a) the decoder forward alone on the same B*S latent samples in the same batch
   sizes (the floor; target: decoder >= 85% of the estimator's time) and (b) the same estimator written naively in
   eager PyTorch (randn, mul, add, decoder, norm, compare, kthvalue for r*), same batch sizes.
2. Samples drawn by ``is_r_robust`` against a fixed S on the test points of a digits VAE trained here for a few
   seconds, at radii set from the points' own r* distribution.

Run: ``PYTHONPATH=. python benchmarks/bench_estimator.py [--points 256] [--samples 1000] [--threads 1]``.
All timings are the minimum over ``--repeats`` interleaved rounds, taken in one process.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vaefast import has_compiled_ops
from vaefast._chunks import chunk_sizes
from vaefast.models import VAE, VAEConfig
from vaefast.robustness import default_max_batch_elements, estimate_r_robustness, is_r_robust


def _best_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Minimum time of each function over ``repeats`` rounds; within a round the functions run one after another,
    so a load spike on the shared machine hits all of them alike rather than one."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def decoder_only(model: VAE, zs: list[torch.Tensor]) -> None:
    """The floor: the decoder mean g(z) on the same latent batches the estimator decodes."""
    with torch.no_grad():
        for z in zs:
            model.decode(z)


def naive_estimator(model: VAE, x: torch.Tensor, r: float, num_samples: int, point_chunk: int, seed: int = 0):
    """Eager PyTorch: eps = randn, z = mu + sigma * eps, y = g(z), ||y - g(mu)||, compare; r* by kthvalue."""
    gen = torch.Generator().manual_seed(seed)
    hits, r_star = [], []
    with torch.no_grad():
        for b0 in range(0, x.shape[0], point_chunk):
            xc = x[b0 : b0 + point_chunk]
            mu, logvar = model.encode(xc)
            center = model.decode(mu).flatten(1)
            eps = torch.randn(mu.shape[0], num_samples, mu.shape[1], generator=gen, dtype=mu.dtype)
            z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
            y = model.decode(z.reshape(-1, mu.shape[1])).reshape(mu.shape[0], num_samples, -1)
            dist = torch.linalg.vector_norm(y - center.unsqueeze(1), dim=-1)
            hits.append((dist <= r).sum(1))
            r_star.append(dist.kthvalue(num_samples // 2 + 1, dim=1).values)
    return torch.cat(hits), torch.cat(r_star)


def bench_estimator(args: argparse.Namespace) -> dict:
    cfg = VAEConfig(input_shape=(1, 28, 28), hidden=(512, 512), latent_dim=10, activation="relu")
    model = VAE(cfg, seed=0).eval()
    b, s = args.points, args.samples
    x = torch.rand(b, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out_dim = 784
    max_elems = args.max_batch_elements or default_max_batch_elements(x.device)
    point_chunk, sample_chunk = chunk_sizes(b, s, out_dim, max_elems)
    # the latent batches the estimator decodes: point_chunk x sample_chunk (last ones smaller)
    gen = torch.Generator().manual_seed(1)
    zs = []
    for b0 in range(0, b, point_chunk):
        nb = min(point_chunk, b - b0)
        for s0 in range(0, s, sample_chunk):
            zs.append(torch.randn(nb * min(sample_chunk, s - s0), 10, generator=gen))
    r = 0.6  # about the median r* of this random-init model
    estimate_r_robustness(model, x[:2], r, num_samples=8)  # warm-up
    naive_chunk = max(1, max_elems // (s * out_dim))  # naive holds all S samples of a point at once
    times = _best_interleaved(
        {
            "estimator": lambda: estimate_r_robustness(model, x, r, num_samples=s, max_batch_elements=max_elems),
            "decoder": lambda: decoder_only(model, zs),
            "naive": lambda: naive_estimator(model, x, r, s, naive_chunk),
        },
        args.repeats,
    )
    t_est, t_dec, t_naive = times["estimator"], times["decoder"], times["naive"]
    res = estimate_r_robustness(model, x, r, num_samples=s)
    nh, nr = naive_estimator(model, x, r, s, naive_chunk)
    return {
        "points": b,
        "samples": s,
        "compiled_ops": has_compiled_ops(),
        "threads": torch.get_num_threads(),
        "point_chunk": point_chunk,
        "sample_chunk": sample_chunk,
        "t_estimator_s": t_est,
        "t_decoder_only_s": t_dec,
        "t_naive_s": t_naive,
        "decoder_fraction": t_dec / t_est,
        "naive_over_estimator": t_naive / t_est,
        "mean_p_hat": res.p_hat.mean().item(),
        "naive_mean_p_hat": (nh.double() / s).mean().item(),
        "mean_r_star": res.r_star.mean().item(),
        "naive_mean_r_star": nr.double().mean().item(),
    }


def bench_sequential(args: argparse.Namespace) -> dict:
    from vaefast.data import load
    from vaefast.training import train

    model = VAE(VAEConfig(input_shape=(1, 8, 8), hidden=(128, 128), latent_dim=4), seed=0)
    train(model, load("digits", "train"), epochs=args.train_epochs, batch_size=64, seed=0, progress=False)
    model.eval()
    x = load("digits", "test").x[: args.test_points]
    fixed = args.samples
    base = estimate_r_robustness(model, x, 1.0, num_samples=fixed, seed=0)
    med = base.r_star.median().item()
    out = {"test_points": x.shape[0], "fixed_samples": fixed, "train_epochs": args.train_epochs, "radii": []}
    for factor in (0.5, 0.8, 1.0, 1.25, 2.0):
        r = factor * med
        t0 = time.perf_counter()
        dec = is_r_robust(model, x, r, max_samples=10000, seed=0)
        t_seq = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = estimate_r_robustness(model, x, r, num_samples=fixed, seed=0)
        t_fix = time.perf_counter() - t0
        agree = (dec.robust == ref.robust[:, 0]).double().mean().item()
        capped = is_r_robust(model, x, r, max_samples=fixed, seed=0)  # never more than the fixed S
        out["radii"].append(
            {
                "r": r,
                "r_over_median_r_star": factor,
                "mean_samples": dec.samples_used.double().mean().item(),
                "median_samples": dec.samples_used.double().median().item(),
                "max_samples": int(dec.samples_used.max()),
                "decided": dec.decided.double().mean().item(),
                "agree_with_fixed": agree,
                "robust_fraction": dec.robust.double().mean().item(),
                "saving": fixed / dec.samples_used.double().mean().item(),
                "le_64_samples": (dec.samples_used <= 64).double().mean().item(),
                "mean_samples_capped": capped.samples_used.double().mean().item(),
                "decided_capped": capped.decided.double().mean().item(),
                "saving_capped": fixed / capped.samples_used.double().mean().item(),
                "t_sequential_s": t_seq,
                "t_fixed_s": t_fix,
            }
        )
    total = sum(d["mean_samples"] for d in out["radii"]) / len(out["radii"])
    out["mean_samples_all_radii"] = total
    out["mean_saving_all_radii"] = fixed / total
    total_capped = sum(d["mean_samples_capped"] for d in out["radii"]) / len(out["radii"])
    out["mean_saving_capped_all_radii"] = fixed / total_capped
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=256)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch-elements", type=int, default=None)
    parser.add_argument("--test-points", type=int, default=300)
    parser.add_argument("--train-epochs", type=int, default=40)
    parser.add_argument("--skip-sequential", action="store_true")
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"estimator": bench_estimator(args)}
    e = report["estimator"]
    print(
        f"estimator B={e['points']} S={e['samples']} (compiled ops: {e['compiled_ops']}, threads {e['threads']}, "
        f"chunks {e['point_chunk']} points x {e['sample_chunk']} samples)\n"
        f"  estimate_r_robustness {e['t_estimator_s']:.3f} s | decoder alone {e['t_decoder_only_s']:.3f} s "
        f"({e['decoder_fraction']:.1%} of the estimator) | naive eager {e['t_naive_s']:.3f} s "
        f"({e['naive_over_estimator']:.2f}x the estimator)\n"
        f"  mean p_hat {e['mean_p_hat']:.4f} (naive {e['naive_mean_p_hat']:.4f}), "
        f"mean r* {e['mean_r_star']:.4f} (naive {e['naive_mean_r_star']:.4f})"
    )
    if not args.skip_sequential:
        report["sequential"] = q = bench_sequential(args)
        print(f"is_r_robust vs fixed S={q['fixed_samples']} on {q['test_points']} digits test points")
        print(f"  {'r':>7} {'r/med r*':>8} {'mean S':>8} {'median S':>8} {'max S':>6} {'<=64':>6} {'decided':>8} "
              f"{'agree':>7} {'saving':>7} {'t seq':>7} {'t fixed':>7} | cap {q['fixed_samples']}: "
              f"{'mean S':>7} {'decided':>8} {'saving':>7}")  # fmt: skip
        for d in q["radii"]:
            print(
                f"  {d['r']:>7.4f} {d['r_over_median_r_star']:>8.2f} {d['mean_samples']:>8.1f} "
                f"{d['median_samples']:>8.0f} {d['max_samples']:>6d} {d['le_64_samples']:>6.1%} {d['decided']:>8.1%} "
                f"{d['agree_with_fixed']:>7.1%} {d['saving']:>6.1f}x {d['t_sequential_s']:>7.3f} "
                f"{d['t_fixed_s']:>7.3f} | "
                f"{'':>9}{d['mean_samples_capped']:>7.1f} {d['decided_capped']:>8.1%} {d['saving_capped']:>6.1f}x"
            )
        print(
            f"  mean over radii: {q['mean_samples_all_radii']:.1f} samples, saving {q['mean_saving_all_radii']:.1f}x "
            f"(max_samples=10000); saving {q['mean_saving_capped_all_radii']:.1f}x "
            f"with max_samples={q['fixed_samples']}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
