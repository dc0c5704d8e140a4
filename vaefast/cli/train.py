"""``vaefast train``: train a VAE on a dataset and write a run folder.

Run folder: ``config.json`` + ``model.safetensors`` (the best-validation model; ``vaefast.load_model(out)``),
``metrics.csv`` (per epoch), ``checkpoints/{best,last}/``, ``metrics.json`` (test ELBO, IWAE log-likelihood...,
and ``warnings``: e.g. posterior collapse, printed as ``warning: ...``). An existing run folder is refused unless
``--force``. Every option is checked before training; the run is written into a hidden folder beside ``--out``
and moved into place once complete, so a run that fails (a diverging loss, Ctrl-C, a full disk) leaves nothing
behind and an earlier run in ``--out`` untouched.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vaefast.models.config import ACTIVATIONS, ARCHITECTURES, LIKELIHOODS, OBJECTIVES

if TYPE_CHECKING:
    from vaefast.models import VAEConfig

DEFAULTS = {"epochs": 30, "batch_size": 64, "lr": 2e-3, "latent": 8, "hidden": [256, 256]}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand.

    Args:
        subparsers: the ``vaefast`` parser's subcommands.
    """
    from vaefast.data import DATASETS

    p = subparsers.add_parser("train", help="train a VAE and write a run folder", description=__doc__)
    p.add_argument("--data", default="digits", choices=DATASETS, help="dataset (default: digits)")
    p.add_argument("--root", default=None, help="folder with the dataset files (mnist, fashion-mnist, cifar10)")
    p.add_argument("--arch", default="mlp", choices=ARCHITECTURES, help="encoder/decoder architecture")
    p.add_argument("--latent", type=int, default=DEFAULTS["latent"], help="latent dimension d")
    p.add_argument("--hidden", type=int, nargs="+", default=DEFAULTS["hidden"], help="dense hidden sizes")
    p.add_argument("--activation", default="relu", choices=ACTIVATIONS)
    p.add_argument("--likelihood", default="bernoulli", choices=LIKELIHOODS)
    p.add_argument("--gaussian-std", type=float, default=0.1, help="std of the fixed-variance Gaussian likelihood")
    p.add_argument(
        "--lipschitz",
        type=float,
        default=None,
        help="L: every network L-Lipschitz (orthonormal layers + GroupSort; MLP, even widths) for vaefast.certify",
    )
    p.add_argument(
        "--lipschitz-decoder",
        default=None,
        metavar="{L,none}",
        help="the decoder's constant instead of --lipschitz's; 'none': an ordinary decoder (certify needs none)",
    )
    p.add_argument("--objective", default=None, choices=OBJECTIVES, help="default: beta_vae if --beta != 1 else elbo")
    p.add_argument("--beta", type=float, default=1.0, help="KL weight (beta_vae); TC weight default (beta_tcvae)")
    p.add_argument("--tc-weight", type=float, default=None, help="beta_tcvae total-correlation weight (default --beta)")
    p.add_argument("--mi-weight", type=float, default=1.0, help="beta_tcvae mutual-information weight (alpha)")
    p.add_argument("--dimkl-weight", type=float, default=1.0, help="beta_tcvae dimension-wise KL weight (gamma)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and noise")
    p.add_argument("--patience", type=int, default=None, help="early stopping patience in epochs (default: off)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of the train split held out")
    p.add_argument("--iw-samples", type=int, default=100, help="K for the importance-weighted test log-likelihood")
    p.add_argument(
        "--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto (cuda when a GPU is visible, else cpu)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for mlp, torch's for conv)")
    p.add_argument("--out", required=True, help="run folder to create (an existing run is refused without --force)")
    p.add_argument("--force", action="store_true", help="overwrite the run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


RUN_FILES = ("config.json", "model.safetensors", "metrics.json")


def check_out(out: str | Path, force: bool) -> Path:
    """The run folder ``--out``, refused when it already holds a run (unless ``--force``).

    Args:
        out: the folder to write.
        force: overwrite an existing run.

    Returns:
        ``out`` as a Path.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not force:
        raise ValueError(f"--out {out} already holds a run ({', '.join(held)}); pass --force to overwrite it")
    return out


def check_options(args: argparse.Namespace) -> None:
    """The numeric options and the objective's weights, checked before any data is read or any work done.

    Args:
        args: the parsed options.

    Raises:
        TypeError / ValueError: naming the option; a weight the objective ignores (``--beta`` with ``--objective
            elbo``, the β-TCVAE weights with another objective) is refused rather than recorded unused.
    """
    from vaefast._checks import (
        check_num_samples,
        check_positive_float,
        check_positive_int,
        check_probability,
        check_seed,
    )

    for name in ("epochs", "batch_size", "latent"):
        check_positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
    for width in args.hidden:
        check_positive_int("--hidden", width)
    check_positive_float("--lr", args.lr)
    check_seed("--seed", args.seed)
    check_probability("--val-fraction", args.val_fraction)
    check_num_samples("--iw-samples", args.iw_samples)
    for name in ("patience", "threads"):
        if getattr(args, name) is not None:
            check_positive_int(f"--{name}", getattr(args, name))
    objective = args.objective or ("beta_vae" if args.beta != 1.0 else "elbo")
    if objective == "elbo" and args.beta != 1.0:
        raise ValueError(
            f"--beta {args.beta:g} has no effect with --objective elbo (the ELBO weighs the KL by 1): "
            "use --objective beta_vae, or leave --beta out"
        )
    if objective != "beta_tcvae":
        given = [f"--{n.replace('_', '-')}" for n, default in (("tc_weight", None), ("mi_weight", 1.0),
                 ("dimkl_weight", 1.0)) if getattr(args, n) != default]  # fmt: skip
        if given:
            raise ValueError(f"{', '.join(given)} only apply to --objective beta_tcvae (got --objective {objective})")


@contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A hidden folder beside ``out`` to write the run into, moved into ``out`` when the block completes and removed
    when it fails.

    Args:
        out: the run folder (checked: it can be created, and holds no run unless ``--force``).

    Yields:
        The staging folder.
    """
    staging = out.absolute().parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    out.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()


def model_config(args: argparse.Namespace, input_shape: tuple[int, ...]) -> VAEConfig:
    """The model configuration the options describe.

    Args:
        args: the parsed options.
        input_shape: the dataset's input shape.

    Returns:
        The :class:`VAEConfig` (objective: beta_vae when ``--beta`` != 1, else elbo).
    """
    from vaefast.models import VAEConfig

    return VAEConfig(
        input_shape=input_shape,
        architecture=args.arch,
        hidden=tuple(args.hidden),
        activation=args.activation,
        latent_dim=args.latent,
        likelihood=args.likelihood,
        gaussian_std=args.gaussian_std,
        objective=args.objective or ("beta_vae" if args.beta != 1.0 else "elbo"),
        beta=args.beta,
        tc_weight=args.beta if args.tc_weight is None else args.tc_weight,
        mi_weight=args.mi_weight,
        dimkl_weight=args.dimkl_weight,
        lipschitz=lipschitz_setting(args.lipschitz, args.lipschitz_decoder),
    )


def lipschitz_setting(every: float | None, decoder: str | None) -> float | dict[str, float | None] | None:
    """``VAEConfig.lipschitz`` from ``--lipschitz`` and ``--lipschitz-decoder``.

    Args:
        every: ``--lipschitz L`` (every network), or None.
        decoder: ``--lipschitz-decoder``: a number, ``"none"`` (an ordinary decoder), or None (not given).

    Returns:
        ``every`` when ``--lipschitz-decoder`` is not given, else ``{"mu": every, "logvar": every, "decoder": D}``.

    Raises:
        ValueError: ``--lipschitz-decoder`` is neither a finite number > 0 nor ``none``.
    """
    if decoder is None:
        return every
    if decoder.strip().lower() == "none":
        constant = None
    else:
        try:
            constant = float(decoder)
        except ValueError:
            constant = math.nan
        if not math.isfinite(constant) or constant <= 0:
            raise ValueError(f"--lipschitz-decoder must be a number > 0 or 'none', got {decoder!r}")
    return {"mu": every, "logvar": every, "decoder": constant}


def run(args: argparse.Namespace) -> int:
    """Train the model, write the run folder and its metrics, print a summary.

    Args:
        args: the parsed options.

    Returns:
        The exit status (0).
    """
    from vaefast import data
    from vaefast._checks import check_device, check_output_dir
    from vaefast.models import VAE
    from vaefast.training import run_metrics, train, write_metrics

    check_options(args)
    out = check_out(check_output_dir("--out", args.out), args.force)
    device = check_device("--device", args.device)
    start = time.perf_counter()
    full = data.load(args.data, "train", args.root)
    test = data.load(args.data, "test", args.root)
    train_split, val_split = full.split(args.val_fraction, seed=args.seed)
    config = model_config(args, full.input_shape)
    if args.threads is not None or args.arch == "mlp":
        torch.set_num_threads(args.threads if args.threads is not None else 1)
    model = VAE(config, seed=args.seed)
    with staging_folder(out) as staging:
        history = train(
            model, train_split, val_split, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            seed=args.seed, device=device, out=staging, patience=args.patience, progress=not args.no_progress,
        )  # fmt: skip
        metrics = run_metrics(model, history, train_split, val_split, test, iw_samples=args.iw_samples, seed=args.seed)
        metrics = {"data": args.data, **metrics, "total_seconds": time.perf_counter() - start}
        metrics.update(seed=args.seed, batch_size=args.batch_size, lr=args.lr, device=str(device))
        write_metrics(staging, metrics)
    print(summary(config.to_dict(), metrics, out))
    return 0


def summary(config: dict, metrics: dict, out: Path) -> str:
    """A short human-readable summary of a run: what was trained, its test metrics, one ``warning: ...`` line per
    entry of ``metrics["warnings"]``.

    Args:
        config: the model config (``VAEConfig.to_dict()``).
        metrics: the run's ``metrics.json`` (empty: the config line only).
        out: the run folder.

    Returns:
        The text, lines joined by newlines.
    """
    lines = [
        f"run {out}: {config['architecture']} VAE on {metrics.get('data')}, latent {config['latent_dim']}, "
        f"{config['likelihood']} likelihood, objective {config['objective']} (beta={config['beta']})",
    ]
    if metrics:
        lines.append(
            f"  epochs {metrics['epochs_run']} (best {metrics['best_epoch']}), {metrics['train_seconds']:.1f} s; "
            f"test ELBO {metrics['test_elbo']:.3f} (recon {metrics['test_recon']:.3f}, KL {metrics['test_kl']:.3f}); "
            f"IW log-lik (K={metrics['iw_samples']}) {metrics['test_iw_log_likelihood']:.3f}"
        )
        if metrics.get("test_pixel_mean_baseline") is not None:
            lines.append(
                f"  trivial baseline (per-pixel mean, {config['likelihood']} likelihood) "
                f"{metrics['test_pixel_mean_baseline']:.3f}"
            )
        lines.append(f"  mean encoder sigma on test {metrics['test_mean_encoder_sigma']:.4f}")
        lines.extend(f"warning: {warning}" for warning in metrics.get("warnings") or [])
    return "\n".join(lines)
