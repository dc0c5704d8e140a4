"""Benchmark of the numerical margin search (issues 12, 17, 19): vaefast's search (one radius), the search as
committed before issue 17 (``--baseline-tree``, a worktree of the base commit) and the original grid protocol, on
the same machine, weights, points, r and clean estimate.

Model: an MNIST-sized MLP VAE (784-512-512-10, mirrored decoder, Bernoulli), quickly trained here (``--epochs``) on
scikit-learn's digits upsampled to 28x28 (bilinear; MNIST itself is not available offline). The radius r is the
median of the points' own r* times ``--r-factor``, so most points are r-robust at delta = 0. The clean point is
decided once by an estimate of ``S = --samples`` samples (``estimate=``, as the sweep does) for every search.

- vaefast: ``numerical_margin`` (its default search: the estimate, margin_lower and margin_upper) on ``--points``
  points at once and on the first ``--small-points`` points, after a warm-up, ``--reps`` times, at ``--threads``
  intra-op threads (also at 2 threads with ``num_threads=2`` to show the thread rule); medians.
- base commit: the previous default search, timed in a subprocess of ``--baseline-tree`` on the same data.
- protocol (the original): ``method="grid"``, ``one_at_a_time=True``, ``optimizer="lbfgsb"`` with ``--restarts``
  restarts of up to ``--lbfgs-steps`` iterations, a fixed ``--samples`` samples per radius (``decision="fixed"``),
  radii from ``--protocol-max-radius`` down in steps of ``--granularity``; on the first ``--protocol-points``.
- attack strength: on the first ``--strength-points`` points with evidence, a stronger attack (``--strong-steps``
  steps x ``--strong-restarts`` restarts, sphere at 0.9 x margin_upper) decided at the search's per-decision level:
  how many points it breaks.

Reported: seconds per point (process CPU time and wall), attacked inputs per point, the per-point speed ratios, the
three margins against the protocol's, the strength count and the load average.

Run: ``PYTHONPATH=. python benchmarks/bench_margin.py [--points 100] [--small-points 3] [--protocol-points 3]
[--baseline-tree ../base] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from vaefast import has_compiled_ops
from vaefast.attacks import MaxDamageAttack
from vaefast.core.decide import BROKEN, Rule, decide
from vaefast.core.encoding import encode
from vaefast.core.options import MarginOptions
from vaefast.core.sampling import Sampler
from vaefast.core.search import budget, start_radius
from vaefast.data import load
from vaefast.margin import numerical_margin
from vaefast.models import VAE, VAEConfig
from vaefast.robustness import RRobustnessResult, estimate_r_robustness
from vaefast.training import train


def mnist_sized_digits(split: str) -> torch.Tensor:
    x = load("digits", split).x
    return F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=100)
    p.add_argument("--small-points", type=int, default=3)
    p.add_argument("--protocol-points", type=int, default=3)
    p.add_argument("--strength-points", type=int, default=20)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each vaefast search (medians)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--tol", type=float, default=0.01)
    p.add_argument("--lbfgs-steps", type=int, default=100, help="L-BFGS-B iterations per protocol attack")
    p.add_argument("--restarts", type=int, default=3, help="L-BFGS-B restarts per protocol attack")
    p.add_argument("--granularity", type=float, default=0.05)
    p.add_argument("--protocol-max-radius", type=float, default=4.0)
    p.add_argument("--strong-steps", type=int, default=200)
    p.add_argument("--strong-restarts", type=int, default=5)
    p.add_argument("--r-factor", type=float, default=1.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--baseline-tree",
        default=None,
        help="a git worktree of the base commit (compiled ops copied in): also time today's search there",
    )
    p.add_argument("--json", default=None, help="write the numbers to this JSON file")
    return p.parse_args()


def setup(args: argparse.Namespace) -> tuple[VAE, torch.Tensor, float, Any]:
    """The trained model, the points, r and the clean estimate."""
    model = VAE(VAEConfig(input_shape=(1, 28, 28), hidden=(512, 512), latent_dim=10), seed=args.seed)
    t0 = time.perf_counter()
    train(model, mnist_sized_digits("train"), epochs=args.epochs, batch_size=64, lr=1e-3, seed=args.seed,
          progress=False)  # fmt: skip
    model.eval()
    x = mnist_sized_digits("test")[: args.points]
    r = float(estimate_r_robustness(model, x, 1.0, num_samples=args.samples).r_star.median()) * args.r_factor
    est = estimate_r_robustness(model, x, r, num_samples=args.samples, seed=args.seed)
    print(
        f"model 784-512-512-10 trained {args.epochs} epochs in {time.perf_counter() - t0:.1f} s; r = {r:.4f}; "
        f"{int(est.robust.sum())} of {x.shape[0]} points r-robust at delta = 0; compiled ops: {has_compiled_ops()}; "
        f"threads: {torch.get_num_threads()}; load average at start {os.getloadavg()[0]:.2f}"
    )
    return model, x, r, est


def first_points(est: RRobustnessResult, n: int, model, x) -> RRobustnessResult:
    """The estimate of the first ``n`` points (its source digest recomputed for them)."""
    from vaefast.robustness import estimate_source

    per_point = ("p_hat", "ci_low", "ci_high", "hits", "robust", "decision", "r_star", "point_index")
    sub = dataclasses.replace(est, **{name: getattr(est, name)[:n] for name in per_point})
    return dataclasses.replace(sub, source=estimate_source(model, x[:n]))


def timed(fn) -> tuple[Any, float, float]:
    """``fn()``, its process CPU time and its wall time."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


BASELINE = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
import vaefast
from vaefast.margin import numerical_margin
from vaefast.robustness import estimate_r_robustness
model = vaefast.load_model(sys.argv[1]).eval()
data = torch.load(sys.argv[2])
x, r, kw = data["x"], data["r"], data["kw"]
est = estimate_r_robustness(model, x, r, num_samples=kw["num_samples"], seed=kw["seed"])
numerical_margin(model, x[:2], r, progress=False, **kw)  # warm-up
out = {}
for n in data["sizes"]:
    w0, c0 = time.perf_counter(), time.process_time()
    sub = {k: getattr(est, k)[:n] for k in ("p_hat", "ci_low", "ci_high", "hits", "robust", "r_star", "point_index")}
    res = numerical_margin(model, x[:n], r, estimate=type(est)(**{**est.__dict__, **sub}), progress=False, **kw)
    out[n] = {"cpu": (time.process_time() - c0) / n, "wall": (time.perf_counter() - w0) / n,
              "margin": res.margin.tolist()}
print(json.dumps(out))
"""


def baseline_run(args, model, x, r, sizes: tuple[int, ...]) -> dict[int, dict[str, Any]]:
    """Today's search as committed in ``--baseline-tree`` (a ``git worktree`` of the base commit with the compiled
    ops copied in), run in a subprocess on the same weights, points, r and clean estimate: its defaults on each
    size after a warm-up. Returns ``{size: {"cpu", "wall" (s/point), "margin"}}``."""
    import subprocess
    import sys
    import tempfile

    from vaefast.models import save

    with tempfile.TemporaryDirectory() as tmp:
        save(model, f"{tmp}/model")
        kw = {"tol": args.tol, "num_samples": args.samples, "seed": args.seed}
        torch.save({"x": x, "r": r, "kw": kw, "sizes": list(sizes)}, f"{tmp}/data.pt")
        env = dict(os.environ, PYTHONPATH=args.baseline_tree)
        cmd = [sys.executable, "-c", BASELINE, f"{tmp}/model", f"{tmp}/data.pt", str(args.threads)]
        out = subprocess.run(cmd, env=env, cwd=args.baseline_tree, capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def vaefast_runs(args, model, x, r, est) -> dict[str, dict[str, Any]]:
    """This tree's search on all points and on the first ``small_points`` (at ``--threads`` and at 2 threads), and
    the base commit's when ``--baseline-tree`` is given, ``reps`` times after a warm-up; medians per point."""
    runs: dict[str, dict[str, Any]] = {}
    opts = MarginOptions(tol=args.tol, num_samples=args.samples)
    numerical_margin(model, x[:2], r, options=opts, progress=False)  # warm-up
    for _ in range(args.reps):
        if args.baseline_tree:
            for n, v in baseline_run(args, model, x, r, (x.shape[0], args.small_points)).items():
                run = runs.setdefault(f"base/{n}", {"points": n, "cpu": [], "wall": []})
                run["cpu"].append(v["cpu"])
                run["wall"].append(v["wall"])
                run["margin"] = torch.tensor(v["margin"], dtype=torch.float64)
        for n in (x.shape[0], args.small_points):
            sub = first_points(est, n, model, x)
            for threads in (args.threads, 2):
                res, cpu, wall = timed(lambda k=n, e=sub, t=threads: numerical_margin(
                    model, x[:k], r, options=opts, seed=args.seed, estimate=e, num_threads=t))  # fmt: skip
                run = runs.setdefault(f"new@{threads}/{n}", {"points": n, "cpu": [], "wall": []})
                run["cpu"].append(cpu / n)
                run["wall"].append(wall / n)
                run["result"] = res
    for name, run in runs.items():
        run["cpu_s_per_point"] = statistics.median(run["cpu"])
        run["wall_s_per_point"] = statistics.median(run["wall"])
        result = run.get("result")
        run["rows_per_point"] = math.nan if result is None else float(result.rows.double().mean())
        print(
            f"{name.split('/')[0]:>7} on {run['points']:>3} points: {run['cpu_s_per_point']:.4f} s/point CPU, "
            f"{run['wall_s_per_point']:.4f} s/point wall (CPU per rep {[round(v, 4) for v in run['cpu']]}); "
            f"{run['rows_per_point']:.2f} attacked inputs per point"
        )
    return runs


def protocol_run(args, model, x, r) -> tuple[Any, float, float]:
    """The original protocol on the first ``protocol_points`` points: seconds per point (CPU, wall)."""
    k = args.protocol_points
    res, cpu, wall = timed(lambda: numerical_margin(
        model, x[:k], r, method="grid", granularity=args.granularity, max_radius=args.protocol_max_radius,
        num_samples=args.samples, decision="fixed", optimizer="lbfgsb", steps=args.lbfgs_steps,
        restarts=args.restarts, one_at_a_time=True, seed=args.seed, progress=False))  # fmt: skip
    evals = sum(len(e) - 1 for e in res.evaluations) / k
    print(
        f"original protocol (grid from {args.protocol_max_radius:g} by {args.granularity:g}, one point at a time, "
        f"{args.restarts} L-BFGS-B restarts <= {args.lbfgs_steps} iterations, fixed S={args.samples}): {k} points, "
        f"{cpu / k:.1f} s/point CPU, {wall / k:.1f} s/point wall ({evals:.0f} radii/point); "
        f"margins {[round(v, 3) for v in res.margin.tolist()]}"
    )
    return res, cpu / k, wall / k


def strength(args, model, x, r, res) -> dict[str, int]:
    """Points (of the first ``strength_points`` with evidence) that a stronger attack at 0.9 x margin_upper breaks,
    decided at the search's per-decision level."""
    strong = MaxDamageAttack(model, 1.0, constraint="sphere", steps=args.strong_steps,
                             restarts=args.strong_restarts, seed=args.seed + 1)  # fmt: skip
    idx = ((res.clean == 1) & res.bracketed).nonzero().squeeze(1)[: args.strength_points]
    if idx.numel() == 0:
        print("strength: no point has evidence")
        return {}
    opts = MarginOptions(tol=args.tol, num_samples=args.samples)
    _, _, rows = budget(opts, res.max_radius, start_radius(opts, res.max_radius), 1)
    delta = strong(x[idx], eps=0.9 * res.upper[idx].to(x.dtype)).delta
    dec = decide(
        Sampler(model, x.device),
        encode(model, x[idx], delta),
        idx.clone(),
        torch.tensor([r], dtype=torch.float64),
        Rule.sequential(args.samples, 0.05 / rows),
        args.seed + 7,
    )
    broken = int((dec.decision[:, 0] == BROKEN).sum())
    print(f"strength: {args.strong_steps} steps x {args.strong_restarts} restarts at 0.9 x margin_upper break "
          f"{broken} of {idx.numel()} points")  # fmt: skip
    return {"checked": int(idx.numel()), "broken": broken}


def speed_ratios(runs: dict[str, dict[str, Any]], args, big: int, proto_cpu: float) -> dict[str, float]:
    """Per-point speed ratios: this search against the base commit's, against itself at 2 threads, and against the
    protocol (CPU time)."""
    small, new = args.small_points, f"new@{args.threads}"
    ratios = {}
    for n, tag in ((big, ""), (small, "_small")):
        for clock in ("cpu", "wall"):
            if f"base/{n}" in runs:
                ratios[f"new_vs_base_commit{tag}_{clock}"] = (
                    runs[f"base/{n}"][f"{clock}_s_per_point"] / runs[f"{new}/{n}"][f"{clock}_s_per_point"]
                )
            if args.threads != 2:
                ratios[f"threads_{args.threads}_vs_2{tag}_{clock}"] = (
                    runs[f"new@2/{n}"][f"{clock}_s_per_point"] / runs[f"{new}/{n}"][f"{clock}_s_per_point"]
                )
    ratios["new_vs_protocol_cpu"] = proto_cpu / runs[f"{new}/{big}"]["cpu_s_per_point"]
    ratios["new_small_vs_protocol_cpu"] = proto_cpu / runs[f"{new}/{small}"]["cpu_s_per_point"]
    for name, v in ratios.items():
        print(f"speed ratio {name}: {v:.2f}x")
    return ratios


def compare_margins(args, res, proto) -> dict[str, Any]:
    """The three margins against the protocol's on its points (the protocol's answer is the first grid radius still
    robust from the top, so the truth lies within one granularity of it)."""
    k = proto.margin.shape[0]
    out = {name: getattr(res, name)[:k].tolist() for name in ("lower", "margin", "upper")}
    out["protocol"] = proto.margin.tolist()
    for name, v in out.items():
        print(f"{name:>9} margins on the protocol's points: {[round(m, 3) for m in v]}")
    return out


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    model, x, r, est = setup(args)
    runs = vaefast_runs(args, model, x, r, est)
    proto, proto_cpu, proto_wall = protocol_run(args, model, x, r)
    big = x.shape[0]
    ratios = speed_ratios(runs, args, big, proto_cpu)
    res = runs[f"new@{args.threads}/{big}"]["result"]
    margins = compare_margins(args, res, proto)
    broken = strength(args, model, x, r, res)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        keep = ("points", "cpu", "wall", "cpu_s_per_point", "wall_s_per_point", "rows_per_point")
        out = {
            "r": r, "threads": args.threads, "compiled_ops": has_compiled_ops(), "load_end": os.getloadavg()[0],
            "runs": {n: {k2: v for k2, v in run.items() if k2 in keep} for n, run in runs.items()},
            "protocol": {"points": args.protocol_points, "cpu_s_per_point": proto_cpu, "wall_s_per_point": proto_wall},
            "ratios": ratios, "margins": margins, "strong_attack": broken,
        }  # fmt: skip
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
