"""The main job, end to end: β-VAEs, a β-TCVAE and a VAE with a Lipschitz-constrained encoder on one dataset,
swept, verified, reported (``vaefast demo``).

1. Train β-VAEs (β ∈ {1, 2, 4, 8}), one β-TCVAE (TC weight 4) and, on the MLP recipes, one VAE whose encoder mean
   and log-variance are 2-Lipschitz (ordinary decoder: the sound certificates' model, beside the ordinary ones in
   the report's tightness view; :func:`demo_models`) on the training split of the dataset with its recipe
   (:data:`RECIPES`; reused when ``<out>/runs/<name>`` already holds the model trained with the same recipe on the
   same data).
2. Radii ``auto``: quantiles of the pooled r*(x) of every model on the swept test points and one radius above
   them (:func:`vaefast.sweep.auto_radii`); the attack budgets of the p̂-vs-norm curves are fractions of the
   points' median ‖x‖₂; curves at the middle radius.
3. Sweep models × points × radii into ``<out>/results.db`` (resumed if a previous demo was interrupted), replay
   every stored claim with fresh random numbers (:func:`vaefast.verify.verify_sweep`), write the report to
   ``<out>/report/index.html``; on MNIST, Fashion-MNIST and CIFAR-10 the report sets the measured bound-vs-margin
   correlation beside the published one (:data:`vaefast.analysis.PUBLISHED_PEARSON`).

Datasets and their recipes (:data:`RECIPES`):

- ``digits`` (the default; embedded, no files): the fast MLP ``64-128-128-8`` with a Gaussian likelihood (fixed
  std 0.2), 40 epochs, 48 test points, one intra-op thread. A Bernoulli likelihood collapses β ≥ 4 to the prior on
  these 8×8 images; the Gaussian keeps every model informative. Its numbers are the README's headline.
- ``mnist``, ``fashion-mnist`` (IDX files read from ``root``): an MLP VAE, ``784-512-512`` encoder and mirrored
  decoder, 10 latent dimensions, Bernoulli likelihood (the ``784-512-512-10`` MNIST VAE against which the original
  grid protocol is timed, and the original experiments' likelihood on MNIST-like data); 20 epochs of batch 128,
  Adam 1e-3, 100 test points. Checked on 5,000 real MNIST digits (4,000 for training, 20 epochs): no model
  collapses and none raises a learned-nothing warning; β = 8 keeps 2 latent dimensions above 0.5 nats (test ELBO
  −172.5 against the per-pixel-mean baseline's −207.9), β = 4 five, the β-TCVAE six.
- ``cifar10`` (python batches read from ``root``): a convolutional VAE (stride-2 4×4 convolutions 32-64-64, a
  dense layer of 256, 32 latent dimensions) with a Gaussian likelihood of fixed std 0.1 (natural colour images:
  a Bernoulli likelihood is a poor model of them). With std 0.1 a nat of KL at β = 8 costs as much as 0.16 of summed
  squared error over the 3,072 pixels, far less than a latent dimension removes, so β = 8 should stay informative
  (not checked on real CIFAR-10 images: the warnings will say). 20 epochs of batch 128, Adam 1e-3, 100 test
  points.

The training prints the learned-nothing warnings of :func:`vaefast.training.learned_nothing_warnings` (posterior
collapse, or an ELBO no better than the per-pixel-mean baseline); a model that learned nothing still goes
through the sweep, and the warning says so.

Seeded and deterministic for a given device and thread count. The library modules are imported when the demo
runs, so that the command line's parser, which reads :class:`DemoConfig`'s defaults and :data:`RECIPES`, stays
quick.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaefast.core.options import MarginOptions

MODELS: dict[str, dict[str, Any]] = {
    "beta1": {"objective": "beta_vae", "beta": 1.0},
    "beta2": {"objective": "beta_vae", "beta": 2.0},
    "beta4": {"objective": "beta_vae", "beta": 4.0},
    "beta8": {"objective": "beta_vae", "beta": 8.0},
    "tcvae4": {"objective": "beta_tcvae", "tc_weight": 4.0},
    # the certificates' model: an ordinary decoder and an encoder whose mean and log-variance are 2-Lipschitz
    # (orthonormal layers + GroupSort; MLP recipes only). On digits its test ELBO is 18.1 against beta1's 17.6, and its
    # median sound certificate in the demo 2.2x the beta family's (benchmarks/README.md, sound certificates: 4.7x).
    "lipschitz2": {"objective": "elbo", "lipschitz": {"mu": 2.0, "logvar": 2.0}},
}
ARCH: dict[str, Any] = {  # the digits demo's architecture
    "input_shape": (1, 8, 8),
    "architecture": "mlp",
    "hidden": (128, 128),
    "latent_dim": 8,
    "likelihood": "gaussian",  # fixed std 0.2: with a Bernoulli likelihood beta >= 4 collapses every latent on digits
    "gaussian_std": 0.2,
}
MNIST_ARCH: dict[str, Any] = {  # the original experiments' MLP VAE of the 28x28 sets (Bernoulli likelihood)
    "input_shape": (1, 28, 28),
    "architecture": "mlp",
    "hidden": (512, 512),
    "latent_dim": 10,
    "likelihood": "bernoulli",
}
CIFAR_ARCH: dict[str, Any] = {  # convolutional VAE for CIFAR-10 (default conv stack 32-64-64 for 32x32)
    "input_shape": (3, 32, 32),
    "architecture": "conv",
    "hidden": (256,),
    "latent_dim": 32,
    "likelihood": "gaussian",
    "gaussian_std": 0.1,
}
EPS_FRACTIONS = (0.025, 0.05, 0.1, 0.2, 0.4)  # attack budgets as fractions of the median ||x||_2 of the points


@dataclass(frozen=True)
class DatasetRecipe:
    """How the demo trains and sweeps one dataset.

    Attributes:
        arch: the :class:`vaefast.models.VAEConfig` fields shared by the models (each model's own fields are
            added).
        epochs: training epochs per model.
        batch_size: training batch size.
        lr: Adam's learning rate.
        points: test points swept by default.
        threads: torch intra-op threads for the whole demo (None: leave torch's setting).
    """

    arch: dict[str, Any]
    epochs: int
    batch_size: int
    lr: float
    points: int
    threads: int | None


RECIPES: dict[str, DatasetRecipe] = {
    "digits": DatasetRecipe(ARCH, epochs=40, batch_size=64, lr=2e-3, points=48, threads=1),
    "mnist": DatasetRecipe(MNIST_ARCH, epochs=20, batch_size=128, lr=1e-3, points=100, threads=None),
    "fashion-mnist": DatasetRecipe(MNIST_ARCH, epochs=20, batch_size=128, lr=1e-3, points=100, threads=None),
    "cifar10": DatasetRecipe(CIFAR_ARCH, epochs=20, batch_size=128, lr=1e-3, points=100, threads=None),
}
DATASETS = tuple(RECIPES)

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    """The default ``log``: say nothing."""


@dataclass
class DemoConfig:
    """The demo's settings.

    Attributes:
        data: the dataset, one of :data:`DATASETS` (its recipe: :data:`RECIPES`).
        root: the folder of a file-based dataset's files in their distribution format (None: the default folder,
            ``$VAEFAST_DATA/<name>`` or ``~/.cache/vaefast/data/<name>``, fetched with torchvision when it is
            installed and the files are absent; a given ``root`` is only read). Must be None for digits.
        device: where training, the sweep and the replay run: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a
            ``torch.device``.
        points: test points to sweep: a count (the first ``points`` of the test split), ``"all"`` (the whole test
            split) or None (the recipe's default).
        epochs: training epochs per model (None: the recipe's default).
        arch: :class:`vaefast.models.VAEConfig` fields that replace the recipe's architecture (e.g. smaller
            ``hidden`` sizes for a quick look; empty: the recipe's, the original experiments' on the real sets).
        retrain: train again even if the run folders hold the same trained models.
        fresh: discard an existing results database instead of resuming it.
        num_samples, confidence, seed, batch_size, margin: the sweep's settings (:class:`vaefast.sweep.SweepSpec`;
            ``margin`` the search's :class:`~vaefast.core.options.MarginOptions`, whose attack settings also run the
            curves); ``seed`` also seeds the training and the replay.
    """

    data: str = "digits"
    root: str | Path | None = None
    device: Any = "cpu"
    points: int | str | None = None
    epochs: int | None = None
    arch: dict[str, Any] = field(default_factory=dict)
    retrain: bool = False
    fresh: bool = False
    num_samples: int = 200
    confidence: float = 0.95
    seed: int = 0
    batch_size: int = 16
    margin: MarginOptions = field(default_factory=lambda: MarginOptions(tol=0.02, steps=20))

    def recipe(self) -> DatasetRecipe:
        """The recipe of :attr:`data`.

        Returns:
            ``RECIPES[data]`` (a ``ValueError`` naming the datasets for any other name).
        """
        if self.data not in RECIPES:
            raise ValueError(f"data must be one of {list(DATASETS)}, got {self.data!r}")
        return RECIPES[self.data]

    def model_arch(self) -> dict[str, Any]:
        """The architecture shared by the models.

        Returns:
            The recipe's :class:`vaefast.models.VAEConfig` fields with :attr:`arch` on top (checked: an unknown or
            invalid field is a ``ValueError``/``TypeError`` naming it).
        """
        from vaefast.models import VAEConfig

        if not isinstance(self.arch, dict):
            raise TypeError(f"arch must be a dict of VAEConfig fields, got {type(self.arch).__name__}")
        merged = {**self.recipe().arch, **self.arch}
        VAEConfig.from_dict({**merged, **MODELS["beta1"]})
        return merged

    def check(self) -> None:
        """Every setting checked before any data is read, any model trained or any file written: the recipe, the
        architecture, the device, ``epochs``, ``points`` (its type; the count against the test split once it is
        read) and the sweep's settings (:class:`vaefast.sweep.SweepSpec`).

        Raises:
            TypeError / ValueError: naming the setting.
        """
        from vaefast._checks import check_device, check_positive_int
        from vaefast.sweep.spec import SweepSpec

        self.recipe()
        self.model_arch()
        check_device("device", self.device)
        if self.epochs is not None:
            check_positive_int("epochs", self.epochs)
        if isinstance(self.points, int) or self.points is None:
            if self.points is not None:
                check_positive_int("points", self.points)
        elif not (isinstance(self.points, str) and self.points.strip().lower() == "all"):
            raise ValueError(f"points must be a positive int, 'all' or None, got {self.points!r}")
        for name in ("retrain", "fresh"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        SweepSpec(radii=(1.0,), **self.sweep_settings())

    def sweep_settings(self) -> dict[str, Any]:
        """The sweep's settings.

        Returns:
            The keyword arguments of :func:`vaefast.sweep.run_sweep` this config sets.
        """
        return {
            "num_samples": self.num_samples, "confidence": self.confidence, "seed": self.seed,
            "batch_size": self.batch_size, "margin": self.margin,
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
        headline: :func:`vaefast.analysis.headline` of the database (with the published correlation, if any).
        seconds: wall-clock seconds of ``training``, ``sweep``, ``verify``, ``report`` and ``total``.
        dataset: the dataset's name.
        device: the device the demo ran on.
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
    dataset: str = "digits"
    device: str = "cpu"


def default_out(data: str) -> Path:
    """The demo's default folder for a dataset.

    Args:
        data: the dataset's name.

    Returns:
        ``results/demo`` for digits, ``results/demo-<data>`` for the others.
    """
    return Path("results/demo" if data == "digits" else f"results/demo-{data}")


def resolve_points(points: int | str | None, default: int, available: int, where: str) -> int:
    """How many test points to sweep.

    Args:
        points: a count, ``"all"`` or None (``default``).
        default: the recipe's count (capped to ``available``).
        available: the points of the test split.
        where: ``"<dataset>/test"``, for the error message.

    Returns:
        The count, at most ``available``.

    Raises:
        ValueError: a count below 1 or above ``available``, or a string other than ``"all"``.
    """
    from vaefast._checks import check_positive_int

    if points is None:
        return min(default, available)
    if isinstance(points, str):
        if points.strip().lower() != "all":
            raise ValueError(f"points must be a positive int or 'all', got {points!r}")
        return available
    check_positive_int("points", points)
    if points > available:
        raise ValueError(f"points {points} is more than {where} holds ({available} points); use at most that or 'all'")
    return points


def load_demo_data(config: DemoConfig) -> tuple[Any, Any]:
    """The dataset's test split, then its training split (a missing file is the loader's clear error).

    Args:
        config: ``data`` and ``root`` (an explicit ``root`` is only read: no download).

    Returns:
        ``(train, test)`` as :class:`vaefast.data.DataSplit`.
    """
    from vaefast.data import load

    kwargs = {} if config.data == "digits" or config.root is None else {"download": False}
    test = load(config.data, "test", config.root, **kwargs)
    return load(config.data, "train", config.root, **kwargs), test


def demo_points(test: Any, config: DemoConfig) -> Any:
    """The swept points: the first ``points`` of the test split (what ``PointSet.from_dataset`` would take).

    Args:
        test: the test split.
        config: ``data`` and ``points``.

    Returns:
        The :class:`vaefast.sweep.PointSet`.
    """
    from vaefast.sweep import PointSet

    n = resolve_points(config.points, config.recipe().points, len(test), f"{config.data}/test")
    labels = None if test.y is None else test.y[:n].tolist()
    return PointSet(test.x[:n].contiguous(), dataset=config.data, split="test", indices=list(range(n)), labels=labels)


def data_digest(*splits: Any) -> str:
    """SHA-256 of the pixels of the splits, so that a run folder trained on other files is not reused.

    Args:
        *splits: :class:`vaefast.data.DataSplit` objects.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    for split in splits:
        h.update(split.x.contiguous().numpy().tobytes())
    return h.hexdigest()


def _train_one(name: str, recipe: dict[str, Any], run: Path, data: tuple, device: Any, progress: bool,
               log: Log) -> None:  # fmt: skip
    """Train one demo model from its recipe into ``run`` and log any learned-nothing warning."""
    from vaefast import models
    from vaefast.models import VAE, VAEConfig
    from vaefast.training import learned_nothing_warnings, train

    train_x, test_x = data
    t0 = time.perf_counter()
    model = VAE(VAEConfig(**recipe["config"]), seed=recipe["seed"])
    train(
        model, train_x, test_x, epochs=recipe["epochs"], batch_size=recipe["batch_size"], lr=recipe["lr"],
        seed=recipe["seed"], device=device, out=run, progress=progress,
    )  # fmt: skip
    models.save(model, run)
    (run / "demo_recipe.json").write_text(json.dumps(recipe, indent=1))
    log(f"[demo] trained {name} in {time.perf_counter() - t0:.1f} s -> {run}")
    for warning in learned_nothing_warnings(model, test_x, train_x):
        log(f"[demo] warning: {name}: {warning}")


def demo_models(arch: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The demo's models for one architecture.

    Args:
        arch: the shared :class:`vaefast.models.VAEConfig` fields.

    Returns:
        :data:`MODELS` without the Lipschitz-constrained ones where the architecture cannot have them (convolutions,
        or odd hidden widths: GroupSort works on pairs).
    """
    lipschitz_ok = arch.get("architecture", "mlp") == "mlp" and all(h % 2 == 0 for h in arch.get("hidden", ()))
    return {name: obj for name, obj in MODELS.items() if lipschitz_ok or "lipschitz" not in obj}


def train_models(
    out: Path, config: DemoConfig, data: tuple[Any, Any], device: Any = "cpu", progress: bool = False,
    log: Log = _quiet,
) -> dict[str, Path]:  # fmt: skip
    """Train the demo's models, or reuse those already trained with the same recipe on the same data.

    Args:
        out: the demo folder (models go to ``out/runs/<name>``).
        config: the demo's settings (data, epochs, seed, retrain).
        data: ``(train, test)`` splits (the test split picks the best epoch and feeds the learned-nothing check).
        device: where to train.
        progress: show training progress bars.
        log: receives one line per model trained or reused, and every learned-nothing warning.

    Returns:
        ``{name: run folder}``.
    """
    rec, arch = config.recipe(), config.model_arch()
    epochs = rec.epochs if config.epochs is None else config.epochs
    same = {"epochs": epochs, "batch_size": rec.batch_size, "lr": rec.lr, "data": config.data}
    same["data_sha256"] = data_digest(*data)
    runs, kept = {}, demo_models(arch)
    for k, (name, obj) in enumerate(MODELS.items()):  # k keys the seed: the same for a model on every recipe
        if name not in kept:
            continue
        run = out / "runs" / name
        recipe = {"config": {**arch, **obj}, "seed": config.seed + k, **same}
        marker = run / "demo_recipe.json"
        if not config.retrain and marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(recipe)):
            log(f"[demo] reusing {run}")
        else:
            _train_one(name, recipe, run, data, device, progress, log)
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
           device: Any, progress: bool, log: Log) -> Any:  # fmt: skip
    """Sweep (resuming an interrupted demo); a database of another sweep is started afresh."""
    from vaefast.sweep import SweepMismatchError, run_sweep

    def sweep() -> Any:
        return run_sweep(
            {n: str(p) for n, p in runs.items()},  # run folders: recorded as the models table's source
            points, radii, db, attack_eps=eps, curve_radii=[radii[len(radii) // 2]], resume=True, progress=progress,
            device=device, **config.sweep_settings(),
        )  # fmt: skip

    try:
        return sweep()
    except SweepMismatchError:
        log(f"[demo] {db} holds another sweep: starting it afresh")
        remove_db(db)
        return sweep()


def _choose(runs: dict[str, Path], points: Any, config: DemoConfig, device: Any, log: Log) -> tuple[list, list]:
    """The radii from the points' r* (estimated on ``device``) and the attack budgets."""
    from vaefast.sweep import AUTO_R_ABOVE, AUTO_R_QUANTILES, auto_radii, load_models

    models, _ = load_models({n: str(p) for n, p in runs.items()})
    models = {n: m.to(device) for n, m in models.items()}
    radii = auto_radii(models, points.x, num_samples=config.num_samples, seed=config.seed)
    eps = attack_budgets(points.x)
    log(
        f"[demo] radii r = {radii} (quantiles {AUTO_R_QUANTILES} of pooled r*, and {AUTO_R_ABOVE} x the last); "
        f"attack budgets eps = {eps}"
    )
    return radii, eps


def _verify(db: Path, config: DemoConfig, device: Any, progress: bool, log: Log) -> Any:
    """Replay every stored claim; log the count and each claim that failed."""
    from vaefast.verify import verify_sweep

    checked = verify_sweep(db, seed=config.seed, device=device, progress=progress)
    log(f"[demo] evidence re-verified: {checked.confirmed} of {checked.checked} claims confirmed")
    for row in checked.failed:
        log(f"[demo] FAILED {row['item_id']} [{row['kind']}]: {row['reason']}")
    log(f"[demo] re-derived columns: {len(checked.discrepancies)} discrepancies")
    for d in checked.discrepancies:
        log(f"[demo] DISCREPANCY {d.item_id} [{d.check}]: {d.reason}")
    return checked


def _describe(config: DemoConfig, data: tuple[Any, Any], points: Any, device: Any) -> str:
    """One line: the dataset, its sizes, the architecture, the epochs and the device."""
    rec = config.recipe()
    a = config.model_arch()
    net = "conv " if a["architecture"] == "conv" else ""
    sizes = "-".join(str(v) for v in (*a["hidden"], a["latent_dim"]))
    epochs = rec.epochs if config.epochs is None else config.epochs
    return (
        f"[demo] {config.data}: {len(data[0])} training points, {points.x.shape[0]} of {len(data[1])} test points "
        f"swept; models: {net}{tuple(a['input_shape'])}-{sizes} {a['likelihood']} VAEs, {epochs} epochs; "
        f"device {device}"
    )


def _stages(out: Path, config: DemoConfig, device: Any, progress: bool, log: Log) -> dict[str, Any]:
    """Load the data and check the points, train, choose the radii, sweep, verify, report (timed)."""
    from vaefast import report

    t = {"start": time.perf_counter()}
    data = load_demo_data(config)
    points = demo_points(data[1], config)  # a bad point count fails here, before any training
    log(_describe(config, data, points, device))
    out.mkdir(parents=True, exist_ok=True)
    runs = train_models(out, config, data, device, progress, log)
    del data
    t["training"] = time.perf_counter()
    radii, eps = _choose(runs, points, config, device, log)
    db = out / "results.db"
    if config.fresh and db.exists():
        remove_db(db)
    t["sweep0"] = time.perf_counter()
    swept = _sweep(runs, points, radii, eps, db, config, device, progress, log)
    t["sweep"] = time.perf_counter()
    checked = _verify(db, config, device, progress, log)
    t["verify"] = time.perf_counter()
    page = report.write_report(db, out / "report")
    t["report"] = time.perf_counter()
    return {"db": db, "page": page, "radii": radii, "eps": eps, "sweep": swept, "verification": checked, "t": t}


def run_demo(
    out: str | Path | None = None, config: DemoConfig | None = None, *, progress: bool = False, log: Log = _quiet
) -> DemoResult:
    """Train (or reuse) the demo models on the dataset, sweep them, replay the evidence and write the report.

    Runs with the recipe's intra-op threads (digits: one thread; tiny MLPs are fastest so on a shared machine, and
    the reduction order is fixed); the caller's thread count is restored afterwards. Every input is checked before
    any training or write: every setting (:meth:`DemoConfig.check`: the dataset name, ``device``, a CUDA request
    without a GPU being a ``ValueError``, the epochs, the sweep's settings), the folder ``out`` (writable), the
    files under ``root`` (the loader's ``FileNotFoundError`` names them) and the point count (a ``ValueError`` when
    the test split holds fewer).

    Args:
        out: the demo folder: ``runs/``, ``results.db`` and ``report/`` go there (None: :func:`default_out`).
        config: the demo's settings (default :class:`DemoConfig`: the digits demo on the CPU).
        progress: show progress bars.
        log: receives the demo's progress lines (data, models trained or reused, warnings, radii, re-verification,
            the published correlation beside the measured one).

    Returns:
        A :class:`DemoResult` with the headline numbers.
    """
    import torch

    from vaefast import analysis, report
    from vaefast._checks import check_device, check_output_dir

    config = config or DemoConfig()
    config.check()  # every setting fails here, before any data is read, any model trained or any file written
    recipe = config.recipe()
    device = check_device("device", config.device)
    out = check_output_dir("out", default_out(config.data) if out is None else out)
    threads = torch.get_num_threads()
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    try:
        done = _stages(out, config, device, progress, log)
    finally:
        torch.set_num_threads(threads)
    t = done.pop("t")
    data = analysis.load(done["db"])
    h = analysis.headline(data)
    if report.format_published(h):
        log(f"[demo] {report.format_published(h)}")
    seconds = {"training": t["training"] - t["start"], "sweep": t["sweep"] - t["sweep0"]}
    seconds.update(verify=t["verify"] - t["sweep"], report=t["report"] - t["verify"])
    seconds["total"] = time.perf_counter() - t["start"]
    return DemoResult(**done, summary=analysis.summary_rows(data), headline=h, seconds=seconds, dataset=config.data,
                      device=str(device))  # fmt: skip
