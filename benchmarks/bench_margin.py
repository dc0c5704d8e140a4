"""Benchmark of the numerical margin search (issues 5 and 12): vaefast's default (secant) search, the previous search
(``strategy="halving"``) and the original grid protocol, side by side on the same machine and the same weights.

Model: an MNIST-sized MLP VAE (784-512-512-10, mirrored decoder, Bernoulli), quickly trained here (``--epochs``) on
scikit-learn's digits upsampled to 28x28 (bilinear; MNIST itself is not available offline). The radius r is the
median of the points' own r* times ``--r-factor``, so most points are r-robust at delta = 0. The clean point is
decided once by an estimate of ``S = --samples`` samples (``estimate=``, as the sweep does) for every search.

- vaefast (new default): ``numerical_margin(strategy="secant")`` on ``--points`` points at once and on the first
  ``--small-points`` points (each after a warm-up, ``--reps`` times alternating with the previous search; medians).
- vaefast (previous): ``numerical_margin(strategy="halving")`` (doubling from 0.25, then halving), the same way.
- protocol (the original): ``method="grid"``, ``one_at_a_time=True``, ``optimizer="lbfgsb"`` with ``--restarts``
  restarts of up to ``--lbfgs-steps`` iterations, a fixed ``--samples`` samples per radius (``decision="fixed"``),
  radii from ``--protocol-max-radius`` down in steps of ``--granularity``; on the first ``--protocol-points``.
- attack strength: on the first ``--strength-points`` points with a margin, a stronger attack (``--strong-steps``
  steps x ``--strong-restarts`` restarts, sphere at 0.9 x the margin) decided by the searches' own rule (sequential
  test at the per-decision level ``1 - 0.05 / D``): how many points it breaks, for the new and the previous margins.

Reported: seconds per point (process CPU time and wall), radius evaluations (decisions) per point, the per-point
speed ratios, the margins of the protocol's points, the strength counts and the load average.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_margin.py [--points 100] [--small-points 3]
[--protocol-points 3] [--json out.json]``.
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
from vaefast.data import load
from vaefast.margin import max_decisions, numerical_margin
from vaefast.models import VAE, VAEConfig
from vaefast.robustness import RRobustnessResult, estimate_r_robustness, is_r_robust
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


def first_points(est: RRobustnessResult, n: int) -> RRobustnessResult:
    """The estimate of the first ``n`` points."""
    per_point = ("p_hat", "ci_low", "ci_high", "hits", "robust", "r_star", "point_index")
    return dataclasses.replace(est, **{name: getattr(est, name)[:n] for name in per_point})


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
    """The new and the previous search on all points and on the first ``small_points``, alternating, ``reps``
    times each after a warm-up; medians of the seconds per point."""
    runs: dict[str, dict[str, Any]] = {}
    for strategy in ("secant", "halving"):  # warm-up
        numerical_margin(model, x[:2], r, strategy=strategy, tol=args.tol, num_samples=args.samples, progress=False)
    for _ in range(args.reps):
        if args.baseline_tree:
            for n, v in baseline_run(args, model, x, r, (x.shape[0], args.small_points)).items():
                run = runs.setdefault(f"base/{n}", {"points": n, "cpu": [], "wall": []})
                run["cpu"].append(v["cpu"])
                run["wall"].append(v["wall"])
                run["margin"] = torch.tensor(v["margin"], dtype=torch.float64)
        for n in (x.shape[0], args.small_points):
            sub = first_points(est, n)
            for strategy in ("secant", "halving"):
                res, cpu, wall = timed(lambda s=strategy, k=n, e=sub: numerical_margin(
                    model, x[:k], r, strategy=s, tol=args.tol, num_samples=args.samples, seed=args.seed, estimate=e,
                    progress=False))  # fmt: skip
                run = runs.setdefault(f"{strategy}/{n}", {"points": n, "cpu": [], "wall": []})
                run["cpu"].append(cpu / n)
                run["wall"].append(wall / n)
                run["result"] = res
    for name, run in runs.items():
        run["cpu_s_per_point"] = statistics.median(run["cpu"])
        run["wall_s_per_point"] = statistics.median(run["wall"])
        result = run.get("result")
        run["decisions_per_point"] = (
            math.nan if result is None else sum(len(e) - 1 for e in result.evaluations) / run["points"]
        )
        print(
            f"vaefast {name.split('/')[0]:>7} on {run['points']:>3} points: {run['cpu_s_per_point']:.4f} s/point CPU, "
            f"{run['wall_s_per_point']:.4f} s/point wall (CPU per rep {[round(v, 4) for v in run['cpu']]}); "
            f"{run['decisions_per_point']:.2f} attacked radii (decisions) per point"
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


def strength(args, model, x, r, results: dict[str, Any]) -> dict[str, int]:
    """Points (of the first ``strength_points`` with a margin under every search) that a stronger attack at 0.9 x
    each search's margin breaks, decided by the searches' rule."""
    strong = MaxDamageAttack(model, 1.0, constraint="sphere", steps=args.strong_steps,
                             restarts=args.strong_restarts, seed=args.seed + 1)  # fmt: skip
    ok = torch.stack([(res.margin > 0) & res.bracketed for res in results.values()]).all(0)
    idx = ok.nonzero().squeeze(1)[: args.strength_points]
    if idx.numel() == 0:
        print("strength: no point has a bracketed margin under every search")
        return {}
    first = next(iter(results.values()))
    start = max(2 * args.tol, min(0.25, float(first.max_radius.min()) / 4))
    level = 1 - 0.05 / max_decisions("bisection", first.max_radius, start, args.tol, 0.01)
    out = {}
    for name, res in results.items():
        delta = strong(x[idx], eps=0.9 * res.margin[idx].to(x.dtype)).delta
        dec = is_r_robust(model, x[idx], r, delta=delta, max_samples=args.samples, confidence=level, seed=args.seed + 7)
        out[name] = int((dec.decided & ~dec.robust).sum())
        print(
            f"strength: {args.strong_steps} steps x {args.strong_restarts} restarts at 0.9 x the {name} margin break "
            f"{out[name]} of {idx.numel()} points"
        )
    return out


def speed_ratios(runs: dict[str, dict[str, Any]], big: int, small: int, proto_cpu: float) -> dict[str, float]:
    """Per-point speed ratios (CPU and wall) of the new search against the previous one (in this tree, and as
    committed in the baseline tree when timed) and against the protocol."""
    ratios = {}
    for ref in ("halving", "base"):
        for n, tag in ((big, ""), (small, "_small")):
            if f"{ref}/{n}" in runs:
                for clock in ("cpu", "wall"):
                    key = f"new_vs_{'previous' if ref == 'halving' else 'base_commit'}{tag}_{clock}"
                    ratios[key] = (
                        runs[f"{ref}/{n}"][f"{clock}_s_per_point"] / runs[f"secant/{n}"][f"{clock}_s_per_point"]
                    )
    ratios["new_vs_protocol_cpu"] = proto_cpu / runs[f"secant/{big}"]["cpu_s_per_point"]
    ratios["new_small_vs_protocol_cpu"] = proto_cpu / runs[f"secant/{small}"]["cpu_s_per_point"]
    for name, v in ratios.items():
        print(f"speed ratio {name}: {v:.2f}x")
    return ratios


def compare_margins(args, model, x, r, runs, proto) -> dict[str, list[bool]]:
    """Whether each search's margin is <= the protocol's + granularity on the protocol's points: as run (sequential
    decisions at the Bonferroni level, so a break needs p_hat <= ~0.45 at S = 1000), and with the protocol's own
    decision rule (``decision="fixed"``: p_hat <= 1/2 from S samples), which compares the attacks alone."""
    k, big, within = proto.margin.shape[0], x.shape[0], {}
    margins = {name: (run["result"].margin if "result" in run else run["margin"])[:k]
               for name, run in runs.items() if run["points"] == big}  # fmt: skip
    for strategy in ("secant", "halving"):
        margins[f"{strategy} (fixed rule)/{k}"] = numerical_margin(
            model, x[:k], r, strategy=strategy, tol=args.tol, num_samples=args.samples, decision="fixed",
            seed=args.seed, progress=False,
        ).margin  # fmt: skip
    for name, m in margins.items():
        within[name] = (m <= proto.margin + args.granularity + 1e-9).tolist()
        print(f"{name} margins {[round(v, 3) for v in m.tolist()]}; <= protocol + {args.granularity}: {within[name]}")
    if f"base/{big}" in runs:
        same = torch.equal(runs[f"base/{big}"]["margin"], runs[f"halving/{big}"]["result"].margin)
        print(f"base commit margins identical to strategy='halving': {same}")
    return within


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    model, x, r, est = setup(args)
    runs = vaefast_runs(args, model, x, r, est)
    proto, proto_cpu, proto_wall = protocol_run(args, model, x, r)
    big = x.shape[0]
    ratios = speed_ratios(runs, big, args.small_points, proto_cpu)
    within = compare_margins(args, model, x, r, runs, proto)
    new, old = runs[f"secant/{big}"]["result"], runs[f"halving/{big}"]["result"]
    broken = strength(args, model, x, r, {"new": new, "previous": old})
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        keep = ("points", "cpu", "wall", "cpu_s_per_point", "wall_s_per_point", "decisions_per_point")
        out = {
            "r": r, "threads": args.threads, "compiled_ops": has_compiled_ops(), "load_end": os.getloadavg()[0],
            "runs": {n: {k2: v for k2, v in run.items() if k2 in keep} for n, run in runs.items()},
            "protocol": {"points": args.protocol_points, "cpu_s_per_point": proto_cpu, "wall_s_per_point": proto_wall,
                         "margins": proto.margin.tolist()},
            "ratios": ratios, "within_protocol_plus_granularity": within, "strong_attack_breaks": broken,
        }  # fmt: skip
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
