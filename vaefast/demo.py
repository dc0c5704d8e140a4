"""The main job, end to end on the embedded digits data (``vaefast demo``, ``make demo``).

1. Train β-VAEs (β ∈ {1, 2, 4, 8}) and one β-TCVAE (TC weight 4) on the digits training split with a fast MLP
   configuration (reused when ``<out>/runs/<name>`` already holds the same trained model).
2. Radii ``auto``: quantiles of the pooled r*(x) of every model on the swept test points and one radius above
   them (:func:`vaefast.sweep.auto_radii`); the attack budgets of the p̂-vs-norm curves are fractions of the
   points' median ‖x‖₂; curves at the middle radius.
3. Sweep models × points × radii into ``<out>/results.db`` (resumed if a previous demo was interrupted), replay
   every stored claim with fresh random numbers (:func:`vaefast.verify.verify_sweep`), write the report to
   ``<out>/report/index.html``.

Seeded and deterministic. The library modules are imported when the demo runs, so that the command line's parser,
which reads :class:`DemoConfig`'s defaults, stays quick.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODELS: dict[str, dict[str, Any]] = {
    "beta1": {"objective": "beta_vae", "beta": 1.0},
    "beta2": {"objective": "beta_vae", "beta": 2.0},
    "beta4": {"objective": "beta_vae", "beta": 4.0},
    "beta8": {"objective": "beta_vae", "beta": 8.0},
    "tcvae4": {"objective": "beta_tcvae", "tc_weight": 4.0},
}
ARCH: dict[str, Any] = {
    "input_shape": (1, 8, 8),
    "architecture": "mlp",
    "hidden": (128, 128),
    "latent_dim": 8,
    "likelihood": "gaussian",  # fixed std 0.2: with a Bernoulli likelihood beta >= 4 collapses every latent on digits
    "gaussian_std": 0.2,
}
EPS_FRACTIONS = (0.025, 0.05, 0.1, 0.2, 0.4)  # attack budgets as fractions of the median ||x||_2 of the points

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    """The default ``log``: say nothing."""


@dataclass
class DemoConfig:
    """The demo's settings.

    Attributes:
        points: test points to sweep.
        epochs: training epochs per model.
        retrain: train again even if the run folders hold the same trained models.
        fresh: discard an existing results database instead of resuming it.
        num_samples, confidence, seed, batch_size, margin_tol, margin_max_radius, attack_kwargs: the sweep's
            settings (:func:`vaefast.sweep.run_sweep`); ``seed`` also seeds the training and the replay.
    """

    points: int = 48
    epochs: int = 40
    retrain: bool = False
    fresh: bool = False
    num_samples: int = 200
    confidence: float = 0.95
    seed: int = 0
    batch_size: int = 16
    margin_tol: float = 0.02
    margin_max_radius: float | None = None
    attack_kwargs: dict[str, Any] = field(default_factory=lambda: {"steps": 20})

    def sweep_settings(self) -> dict[str, Any]:
        """The sweep's settings.

        Returns:
            The keyword arguments of :func:`vaefast.sweep.run_sweep` this config sets.
        """
        return {
            "num_samples": self.num_samples, "confidence": self.confidence, "seed": self.seed,
            "batch_size": self.batch_size, "margin_tol": self.margin_tol, "margin_max_radius": self.margin_max_radius,
            "attack_kwargs": dict(self.attack_kwargs),
        }  # fmt: skip


@dataclass
class DemoResult:
    """What the demo did and found.

    Attributes:
        db: the results database.
        page: the report's ``index.html``.
        radii: the swept radii.
        eps: the attack budgets of the curves.
        sweep: the sweep's :class:`vaefast.sweep.SweepResult`.
        verification: the replay's :class:`vaefast.verify.VerifyReport`.
        summary: :func:`vaefast.analysis.summary_rows` of the database.
        headline: :func:`vaefast.analysis.headline` of the database.
        seconds: wall-clock seconds of ``training``, ``sweep``, ``verify``, ``report`` and ``total``.
    """

    db: Path
    page: Path
    radii: list[float]
    eps: list[float]
    sweep: Any
    verification: Any
    summary: list[dict[str, Any]]
    headline: dict[str, Any]
    seconds: dict[str, float]


def _train_one(name: str, recipe: dict[str, Any], run: Path, data: tuple, progress: bool, log: Log) -> None:
    """Train one demo model from its recipe into ``run`` and log any learned-nothing warning."""
    from vaefast import models
    from vaefast.models import VAE, VAEConfig
    from vaefast.training import learned_nothing_warnings, train

    train_x, test_x = data
    t0 = time.perf_counter()
    model = VAE(VAEConfig(**recipe["config"]), seed=recipe["seed"])
    train(
        model, train_x, test_x, epochs=recipe["epochs"], batch_size=recipe["batch_size"], lr=recipe["lr"],
        seed=recipe["seed"], out=run, progress=progress,
    )  # fmt: skip
    models.save(model, run)
    (run / "demo_recipe.json").write_text(json.dumps(recipe, indent=1))
    log(f"[demo] trained {name} in {time.perf_counter() - t0:.1f} s -> {run}")
    for warning in learned_nothing_warnings(model, test_x, train_x):
        log(f"[demo] warning: {name}: {warning}")


def train_models(out: Path, config: DemoConfig, progress: bool = False, log: Log = _quiet) -> dict[str, Path]:
    """Train the demo's models, or reuse those already trained with the same recipe.

    Args:
        out: the demo folder (models go to ``out/runs/<name>``).
        config: the demo's settings (epochs, seed, retrain).
        progress: show training progress bars.
        log: receives one line per model trained or reused.

    Returns:
        ``{name: run folder}``.
    """
    from vaefast.data import load

    data = (load("digits", "train"), load("digits", "test"))
    runs = {}
    for k, (name, obj) in enumerate(MODELS.items()):
        run = out / "runs" / name
        recipe = {"config": {**ARCH, **obj}, "epochs": config.epochs, "seed": config.seed + k, "batch_size": 64}
        recipe["lr"] = 2e-3
        marker = run / "demo_recipe.json"
        if not config.retrain and marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(recipe)):
            log(f"[demo] reusing {run}")
        else:
            _train_one(name, recipe, run, data, progress, log)
        runs[name] = run
    return runs


def attack_budgets(x: Any) -> list[float]:
    """Budgets of the p̂-vs-norm curves.

    Args:
        x: the swept points ``[P, *input_shape]``.

    Returns:
        :data:`EPS_FRACTIONS` × the points' median ‖x‖₂, to 3 significant digits.
    """
    scale = float(x.flatten(1).norm(dim=1).median())
    return [float(f"{scale * f:.3g}") for f in EPS_FRACTIONS]


def remove_db(db: Path) -> None:
    """Delete a results database with its WAL files and any shard folder.

    Args:
        db: the database file.
    """
    for p in db.parent.glob(db.name + "*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _sweep(runs: dict[str, Path], points: Any, radii: list[float], eps: list[float], db: Path, config: DemoConfig,
           progress: bool, log: Log) -> Any:  # fmt: skip
    """Sweep (resuming an interrupted demo); a database of another sweep is started afresh."""
    from vaefast.sweep import SweepMismatchError, run_sweep

    def sweep() -> Any:
        return run_sweep(
            {n: str(p) for n, p in runs.items()},  # run folders: recorded as the models table's source
            points, radii, db, attack_eps=eps, curve_radii=[radii[len(radii) // 2]], resume=True, progress=progress,
            **config.sweep_settings(),
        )  # fmt: skip

    try:
        return sweep()
    except SweepMismatchError:
        log(f"[demo] {db} holds another sweep: starting it afresh")
        remove_db(db)
        return sweep()


def _choose(runs: dict[str, Path], config: DemoConfig, log: Log) -> tuple[Any, list[float], list[float]]:
    """The points, the radii from their r* and the attack budgets."""
    from vaefast.sweep import AUTO_R_ABOVE, AUTO_R_QUANTILES, PointSet, auto_radii, load_models

    models, _ = load_models({n: str(p) for n, p in runs.items()})
    points = PointSet.from_dataset("digits", "test", config.points)
    radii = auto_radii(models, points.x, num_samples=config.num_samples, seed=config.seed)
    eps = attack_budgets(points.x)
    log(
        f"[demo] radii r = {radii} (quantiles {AUTO_R_QUANTILES} of pooled r*, and {AUTO_R_ABOVE} x the last); "
        f"attack budgets eps = {eps}"
    )
    return points, radii, eps


def _verify(db: Path, config: DemoConfig, progress: bool, log: Log) -> Any:
    """Replay every stored claim; log the count and each claim that failed."""
    from vaefast.verify import verify_sweep

    checked = verify_sweep(db, seed=config.seed, progress=progress)
    log(f"[demo] evidence re-verified: {checked.confirmed} of {checked.checked} claims confirmed")
    for row in checked.failed:
        log(f"[demo] FAILED {row['item_id']} [{row['kind']}]: {row['reason']}")
    return checked


def run_demo(
    out: str | Path = "results/demo", config: DemoConfig | None = None, *, progress: bool = True, log: Log = _quiet
) -> DemoResult:
    """Train (or reuse) the demo models, sweep them, replay the evidence and write the report.

    Runs with one intra-op thread (tiny MLPs: fastest on a shared machine, and a fixed reduction order); the
    caller's thread count is restored afterwards.

    Args:
        out: the demo folder: ``runs/``, ``results.db`` and ``report/`` go there.
        config: the demo's settings (default :class:`DemoConfig`).
        progress: show progress bars.
        log: receives the demo's progress lines (models trained or reused, radii, re-verification).

    Returns:
        A :class:`DemoResult` with the headline numbers.
    """
    import torch

    from vaefast import analysis, report

    config = config or DemoConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = {"start": time.perf_counter()}
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        runs = train_models(out, config, progress, log)
        t["training"] = time.perf_counter()
        points, radii, eps = _choose(runs, config, log)
        db = out / "results.db"
        if config.fresh and db.exists():
            remove_db(db)
        t0 = time.perf_counter()
        swept = _sweep(runs, points, radii, eps, db, config, progress, log)
        t["sweep"] = time.perf_counter()
        checked = _verify(db, config, progress, log)
        t["verify"] = time.perf_counter()
        page = report.write_report(db, out / "report")
        t["report"] = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    data = analysis.load(db)
    seconds = {"training": t["training"] - t["start"], "sweep": t["sweep"] - t0, "verify": t["verify"] - t["sweep"]}
    seconds.update(report=t["report"] - t["verify"], total=time.perf_counter() - t["start"])
    return DemoResult(
        db, page, radii, eps, swept, checked, analysis.summary_rows(data), analysis.headline(data), seconds
    )
