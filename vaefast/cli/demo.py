"""``vaefast demo --out results/demo``: the main job, end to end on the embedded digits data.

1. Train β-VAEs (β ∈ {1, 2, 4, 8}) and one β-TCVAE (TC weight 4) on the digits training split with a fast MLP
   configuration (reused when ``<out>/runs/<name>`` already holds the same trained model).
2. Radii ``auto``: quantiles of the pooled r*(x) of every model on the swept test points and one radius above
   them (:func:`vaefast.sweep.auto_radii`: every model is studied on both sides of its typical r*); the attack
   budgets of the p̂-vs-norm curves are fractions of the points' median ‖x‖₂; curves at the middle radius.
3. Sweep models × points × radii into ``<out>/results.db`` (resumed if a previous demo was interrupted),
   replay every stored claim with fresh random numbers (``vaefast verify``), write the report to
   ``<out>/report/index.html``, print the headline numbers.
Seeded and deterministic.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vaefast.cli.sweep import add_sweep_options, attack_kwargs

MODELS: dict[str, dict] = {
    "beta1": {"objective": "beta_vae", "beta": 1.0},
    "beta2": {"objective": "beta_vae", "beta": 2.0},
    "beta4": {"objective": "beta_vae", "beta": 4.0},
    "beta8": {"objective": "beta_vae", "beta": 8.0},
    "tcvae4": {"objective": "beta_tcvae", "tc_weight": 4.0},
}
ARCH = {
    "input_shape": (1, 8, 8),
    "architecture": "mlp",
    "hidden": (128, 128),
    "latent_dim": 8,
    "likelihood": "gaussian",  # fixed std 0.2: with a Bernoulli likelihood beta >= 4 collapses every latent on digits
    "gaussian_std": 0.2,
}
EPS_FRACTIONS = (0.025, 0.05, 0.1, 0.2, 0.4)  # attack budgets as fractions of the median ||x||_2 of the points


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train beta-VAEs + a beta-TCVAE on digits, sweep, report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="results/demo", help="output folder (default results/demo)")
    p.add_argument("--points", type=int, default=48, help="test points to sweep (default 48)")
    p.add_argument("--epochs", type=int, default=40, help="training epochs per model (default 40)")
    p.add_argument("--retrain", action="store_true", help="train again even if the run folders hold models")
    p.add_argument("--fresh", action="store_true", help="discard an existing results.db instead of resuming")
    add_sweep_options(p)
    p.set_defaults(func=run, samples=200, batch_size=16, tol=0.02, attack_steps=20)


def _nice(value: float) -> float:
    """``value`` rounded to 3 significant digits (readable radii / budgets, exact in the database)."""
    return float(f"{value:.3g}")


def train_models(out: Path, epochs: int, seed: int, retrain: bool, progress: bool) -> dict[str, Path]:
    """Train (or reuse) the demo models; returns ``{name: run folder}``."""
    from vaefast.data import load
    from vaefast.models import VAE, VAEConfig
    from vaefast.training import learned_nothing_warnings, train

    train_x, test_x = load("digits", "train"), load("digits", "test")
    runs = {}
    for k, (name, obj) in enumerate(MODELS.items()):
        run = out / "runs" / name
        recipe = {"config": {**ARCH, **obj}, "epochs": epochs, "seed": seed + k, "batch_size": 64, "lr": 2e-3}
        marker = run / "demo_recipe.json"
        if not retrain and marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(recipe)):
            print(f"[demo] reusing {run}")
        else:
            t0 = time.perf_counter()
            model = VAE(VAEConfig(**recipe["config"]), seed=recipe["seed"])
            train(
                model,
                train_x,
                test_x,
                epochs=epochs,
                batch_size=recipe["batch_size"],
                lr=recipe["lr"],
                seed=recipe["seed"],
                out=run,
                progress=progress,
            )
            model.save(run)
            marker.write_text(json.dumps(recipe, indent=1))
            print(f"[demo] trained {name} in {time.perf_counter() - t0:.1f} s -> {run}")
            for warning in learned_nothing_warnings(model, test_x, train_x):
                print(f"[demo] warning: {name}: {warning}")
        runs[name] = run
    return runs


def attack_budgets(points) -> list[float]:
    """Budgets of the p̂-vs-norm curves: ``EPS_FRACTIONS`` × the median ‖x‖₂ of the points (3 significant digits)."""
    scale = float(points.x.flatten(1).norm(dim=1).median())
    return [float(f"{scale * f:.3g}") for f in EPS_FRACTIONS]


def _remove_db(db: Path) -> None:
    """Delete ``db`` with its WAL files and any shard folder."""
    import shutil

    for p in db.parent.glob(db.name + "*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def run(args: argparse.Namespace) -> int:
    import torch

    from vaefast import report
    from vaefast.sweep import (
        AUTO_R_ABOVE,
        AUTO_R_QUANTILES,
        PointSet,
        SweepMismatchError,
        auto_radii,
        load_models,
        run_sweep,
    )
    from vaefast.verify import verify_sweep

    torch.set_num_threads(1)  # tiny MLPs: one thread is fastest on a shared machine, and fixes the reduction order
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    runs = train_models(out, args.epochs, args.seed, args.retrain, progress)
    t_train = time.perf_counter() - t_start
    models, _ = load_models({n: str(p) for n, p in runs.items()})
    points = PointSet.from_dataset("digits", "test", args.points)
    radii = auto_radii(models, points.x, num_samples=args.samples, seed=args.seed)
    eps = attack_budgets(points)
    print(
        f"[demo] radii r = {radii} (quantiles {AUTO_R_QUANTILES} of pooled r*, and {AUTO_R_ABOVE} x the last); "
        f"attack budgets eps = {eps}"
    )
    db = out / "results.db"
    if args.fresh and db.exists():
        _remove_db(db)

    def sweep():
        return run_sweep(
            {n: str(p) for n, p in runs.items()},  # run folders: recorded as the models table's source
            points,
            radii,
            db,
            attack_eps=eps,
            curve_radii=[radii[len(radii) // 2]],
            num_samples=args.samples,
            confidence=args.confidence,
            seed=args.seed,
            batch_size=args.batch_size,
            margin_tol=args.tol,
            margin_max_radius=args.max_radius,
            attack_kwargs=attack_kwargs(args),
            resume=True,
            progress=progress,
        )

    t0 = time.perf_counter()
    try:
        res = sweep()
    except SweepMismatchError:
        print(f"[demo] {db} holds another sweep: starting it afresh")
        _remove_db(db)
        res = sweep()
    t_sweep = time.perf_counter() - t0
    t0 = time.perf_counter()
    checked = verify_sweep(db, seed=args.seed, progress=progress)
    t_verify = time.perf_counter() - t0
    print(f"[demo] evidence re-verified: {checked.confirmed} of {checked.checked} claims confirmed")
    for row in checked.failed:
        print(f"[demo] FAILED {row['item_id']} [{row['kind']}]: {row['reason']}")
    t0 = time.perf_counter()
    page = report.write_report(db, out / "report")
    t_report = time.perf_counter() - t0
    data = report.load(db)
    print()
    print(report.format_table(report.summary_rows(data), report.SUMMARY_COLUMNS))
    print()
    print(report.format_headline(report.headline(data)))
    total = time.perf_counter() - t_start
    print(
        f"\n[demo] time: training {t_train:.1f} s, sweep {t_sweep:.1f} s ({res.units_computed} units computed, "
        f"{res.units_skipped} reused), verify {t_verify:.1f} s, report {t_report:.1f} s, total {total:.1f} s"
    )
    print(f"[demo] results database: {db}")
    print(f"[demo] report: {page}")
    return 0
