"""Benchmark of a sweep's cost per item (issue 19), measured in one run on this machine.

A. **The demo's sweep** (the digits demo's six models, 48 test points, its 5 radii and 5 curve budgets, S = 200,
   tol 0.02, 20 attack steps, one intra-op thread as the demo runs): this tree against the sweep as committed at the
   base commit (``--baseline-tree``, a worktree with its compiled ops built), on the same trained run folders, points,
   radii and budgets. Reported: seconds per stage and in total for both, the speed-up, and how the results compare
   (the encoder geometry and box limits must be identical; p̂ comes from another Monte-Carlo stream since a unit now
   draws one stream per model for all radii, so it must agree within its sampling error; certified counts).
B. **An MNIST-sized MLP VAE** (784-512-512-10, Bernoulli, trained ``--epochs`` on digits upsampled to 28x28) with
   ``--points`` points x 5 radii (auto: quantiles of r*): seconds per (point, radius) item of the whole sweep and of
   its margin stage, against the original protocol's seconds per item (``method="grid"`` from 4.0 by 0.05, one point
   at a time, 3 L-BFGS-B restarts of <= 100 iterations, a fixed S = 1000 per radius) on ``--protocol-points`` points.

Run: ``PYTHONPATH=. python benchmarks/bench_sweep.py --baseline-tree ../base [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vaefast.core.options import MarginOptions
from vaefast.data import load
from vaefast.margin import numerical_margin
from vaefast.models import VAE, VAEConfig, save
from vaefast.robustness import estimate_r_robustness
from vaefast.sweep import PointSet, auto_radii, run_sweep
from vaefast.training import train

STAGES = ("estimate", "bound", "margin", "evidence", "certify", "curve", "total")

BASELINE = """
import json, sys, torch
torch.set_num_threads(1)
from vaefast.sweep import PointSet, run_sweep
cfg = json.loads(sys.argv[1])
points = PointSet.from_dataset("digits", "test", cfg["points"])
run_sweep(cfg["models"], points, cfg["radii"], cfg["db"], attack_eps=cfg["eps"], num_samples=200, batch_size=16,
          margin_tol=0.02, attack_kwargs={"steps": 20}, progress=False)
"""


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-tree", default=None, help="a worktree of the base commit with its ops built")
    p.add_argument("--demo-runs", default=None, help="folder of the demo's trained run folders (default: train them)")
    p.add_argument("--points", type=int, default=100, help="MNIST-sized part: points")
    p.add_argument("--epochs", type=int, default=5, help="MNIST-sized part: training epochs")
    p.add_argument("--protocol-points", type=int, default=1)
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--skip-mnist", action="store_true")
    p.add_argument("--json", default=None, help="write the numbers here (after every part)")
    return p.parse_args()


def _rows(db: Path, table: str) -> list[dict[str, Any]]:
    """A table's rows with plain sqlite3 (the base commit's databases have an older schema)."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table}")]
    finally:
        conn.close()


def stage_seconds(db: Path, models: set[str] | None = None) -> dict[str, float]:
    """Total seconds per stage over a database's units (of ``models`` only, when given)."""
    units = [u for u in _rows(db, "units") if models is None or u["model"] in models]
    return {s: sum(u.get(f"seconds_{s}") or 0.0 for u in units) for s in STAGES}


def readable_by_base(models: dict[str, str]) -> dict[str, str]:
    """The run folders the base commit can load: its models without orthonormal (Lipschitz) layers, whose files
    changed in 0.3 (the QR retraction stores the orthonormal matrix; 0.3 reads 0.2's files, not the reverse)."""
    return {n: p for n, p in models.items() if not json.loads((Path(p) / "config.json").read_text()).get("lipschitz")}


def results(db: Path) -> dict[str, dict[str, Any]]:
    return {r["item_id"]: r for r in _rows(db, "results")}


def demo_models(folder: Path | None, tmp: Path) -> dict[str, str]:
    """The demo's trained run folders (trained here with the demo's recipe unless given)."""
    from vaefast.demo import DemoConfig, train_models

    if folder is not None:
        return {p.name: str(p) for p in sorted(Path(folder).iterdir()) if (p / "config.json").exists()}
    data = (load("digits", "train"), load("digits", "test"))
    torch.set_num_threads(1)
    runs = train_models(tmp, DemoConfig(), data, progress=False)
    return {name: str(path) for name, path in runs.items()}


def compare(new: dict[str, dict], base: dict[str, dict]) -> dict[str, Any]:
    """Item-by-item comparison of the two databases (same item ids)."""
    common = sorted(set(new) & set(base))
    same_geometry = all(
        new[i][c] == base[i][c] or abs(new[i][c] - base[i][c]) <= 1e-6 * max(1.0, abs(base[i][c]))
        for i in common
        for c in ("jac_frobenius", "sigma_min", "max_radius")
    )
    dp = [abs(new[i]["p_hat"] - base[i]["p_hat"]) for i in common]
    se = [2 * max(1e-9, (base[i]["p_hat"] * (1 - base[i]["p_hat"]) / 200) ** 0.5) for i in common]
    within = sum(d <= 3 * s for d, s in zip(dp, se, strict=True))
    return {
        "items": len(common),
        "geometry_identical": same_geometry,
        "p_hat_mean_abs_diff": statistics.fmean(dp),
        "p_hat_within_3_se_of_difference": within / len(common),
        "certified_new": sum(bool(new[i]["certified"]) for i in common),
        "certified_base_p_hat_above_half": sum(bool(base[i]["certified"]) for i in common),
    }


def demo_part(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Part A (module docstring)."""
    models = demo_models(Path(args.demo_runs) if args.demo_runs else None, tmp)
    x = PointSet.from_dataset("digits", "test", 48)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from vaefast.models import load as load_model

        radii = auto_radii({n: load_model(p) for n, p in models.items()}, x.x, num_samples=200, seed=0)
        eps = [round(radii[-1] * f, 4) for f in (0.11, 0.22, 0.44, 0.88, 1.76)]
        new_db = tmp / "new.db"
        t0 = time.perf_counter()
        run_sweep(models, x, radii, new_db, attack_eps=eps, num_samples=200, batch_size=16,
                  margin=MarginOptions(tol=0.02, steps=20), progress=False)  # fmt: skip
        new_wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    out: dict[str, Any] = {"radii": radii, "eps": eps, "new": stage_seconds(new_db), "new_wall": new_wall}
    print(f"A. demo sweep (6 models x 48 points x {len(radii)} radii, S = 200): this tree {new_wall:.1f} s wall; "
          f"stages {json.dumps({k: round(v, 1) for k, v in out['new'].items()})}")  # fmt: skip
    if args.baseline_tree:
        base_db = tmp / "base.db"
        both = readable_by_base(models)
        out["compared_models"] = sorted(both)
        cfg = {"models": both, "points": 48, "radii": radii, "eps": eps, "db": str(base_db)}
        env = dict(os.environ, PYTHONPATH=args.baseline_tree, OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", BASELINE, json.dumps(cfg)], env=env, cwd=args.baseline_tree,
                       check=True)  # fmt: skip
        out["base_wall"] = time.perf_counter() - t0
        out["base"] = stage_seconds(base_db)
        out["new_same_models"] = stage_seconds(new_db, set(both))
        out["speedup_total"] = out["base"]["total"] / out["new_same_models"]["total"]
        out["compare"] = compare(results(new_db), results(base_db))
        print(f"   on the {len(both)} models the base commit reads ({', '.join(sorted(both))}): this tree's stages "
              f"{json.dumps({k: round(v, 1) for k, v in out['new_same_models'].items()})}")  # fmt: skip
        print(f"   base commit {out['base_wall']:.1f} s wall; stages "
              f"{json.dumps({k: round(v, 1) for k, v in out['base'].items()})}")  # fmt: skip
        print(f"   speed-up of the units' total: {out['speedup_total']:.2f}x; comparison {out['compare']}")
    return out


def mnist_part(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Part B (module docstring)."""
    torch.set_num_threads(1)

    def up(split: str) -> torch.Tensor:
        return F.interpolate(load("digits", split).x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)

    model = VAE(VAEConfig(input_shape=(1, 28, 28), hidden=(512, 512), latent_dim=10), seed=0)
    train(model, up("train"), epochs=args.epochs, batch_size=64, lr=1e-3, seed=0, progress=False)
    model.eval()
    save(model, tmp / "mnist")
    x = up("test")[: args.points]
    radii = auto_radii({"m": model}, x, num_samples=1000, seed=0)
    db = tmp / "mnist.db"
    t0 = time.perf_counter()
    run_sweep({"m": str(tmp / "mnist")}, PointSet(x), radii, db, num_samples=1000, progress=False)
    wall = time.perf_counter() - t0
    stages = stage_seconds(db)
    items = args.points * len(radii)
    k = args.protocol_points
    est = estimate_r_robustness(model, x[:k], radii[2], num_samples=1000)
    t0 = time.process_time()
    protocol_options = MarginOptions(
        method="grid",
        granularity=0.05,
        max_radius=4.0,
        decision="fixed",
        optimizer="lbfgsb",
        steps=100,
        restarts=3,
        one_at_a_time=True,
    )
    numerical_margin(model, x[:k], radii[2], options=protocol_options, estimate=est)
    protocol = (time.process_time() - t0) / k
    out = {
        "radii": radii, "points": args.points, "wall": wall, "stages": stages,
        "sweep_s_per_item": stages["total"] / items, "margin_s_per_item": stages["margin"] / items,
        "protocol_s_per_item": protocol,
    }  # fmt: skip
    out["ratio_sweep_vs_protocol"] = protocol / out["sweep_s_per_item"]
    out["ratio_margin_vs_protocol"] = protocol / out["margin_s_per_item"]
    print(f"B. MNIST-sized MLP, {args.points} points x {len(radii)} radii: sweep {out['sweep_s_per_item']:.4f} s/item "
          f"(margin stage {out['margin_s_per_item']:.4f}); protocol {protocol:.1f} s/item (one point, one radius): "
          f"{out['ratio_sweep_vs_protocol']:.0f}x per item for the whole sweep, {out['ratio_margin_vs_protocol']:.0f}x "
          f"for the margins; stages {json.dumps({k2: round(v, 1) for k2, v in stages.items()})}")  # fmt: skip
    return out


def main() -> None:
    args = parse()
    report: dict[str, Any] = {"load_start": os.getloadavg()[0]}

    def dump() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_demo:
            report["demo"] = demo_part(args, Path(tmp))
            dump()
        if not args.skip_mnist:
            report["mnist"] = mnist_part(args, Path(tmp))
            dump()
    report["load_end"] = os.getloadavg()[0]
    print(f"load average {report['load_start']:.2f} -> {report['load_end']:.2f}")
    dump()


if __name__ == "__main__":
    main()
