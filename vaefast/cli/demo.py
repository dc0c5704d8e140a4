"""``vaefast demo [--data digits|mnist|fashion-mnist|cifar10] [--root DIR] [--device cpu|cuda|cuda:N|auto]``.

Trains β-VAEs (β ∈ {1, 2, 4, 8}) and a β-TCVAE on the dataset with its recipe (digits: a small MLP with a Gaussian
likelihood; mnist / fashion-mnist: the 784-512-512-10 MLP VAE with a Bernoulli likelihood; cifar10: a convolutional
VAE with a Gaussian likelihood; reused when already trained), chooses the radii from the points' r* and the attack
budgets from their norms, sweeps into ``<out>/results.db`` (resumed if interrupted), replays every stored claim with
fresh random numbers, writes ``<out>/report/index.html`` and prints the headline, with the published bound-vs-margin
correlation beside the measured one on MNIST, Fashion-MNIST and CIFAR-10 (:func:`vaefast.demo.run_demo`).
mnist and fashion-mnist are read from their IDX files (``train-images-idx3-ubyte.gz`` ...) and cifar10 from its
python batches (``cifar-10-batches-py/data_batch_1`` ... ``test_batch``) under ``--root``. Seeded and deterministic.
"""

from __future__ import annotations

import argparse

from vaefast.cli._common import add_sweep_options, sweep_options
from vaefast.demo import DATASETS, RECIPES, DemoConfig


def points_arg(text: str) -> int | str:
    """``--points N`` or ``--points all``.

    Args:
        text: the option's value.

    Returns:
        The int, or ``"all"``.
    """
    if text.strip().lower() == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of points or 'all', got {text!r}") from None


def _per_dataset(attr: str) -> str:
    return ", ".join(f"{name} {getattr(r, attr)}" for name, r in RECIPES.items())


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand (its sweep defaults are :class:`vaefast.demo.DemoConfig`'s).

    Args:
        subparsers: the ``vaefast`` parser's subcommands.
    """
    d = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="train beta-VAEs + a beta-TCVAE on a dataset (default digits), sweep, verify, report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", default=d.data, choices=DATASETS, help="dataset (default %(default)s)")
    p.add_argument("--root", default=None, help="folder of the dataset's files (default $VAEFAST_DATA/<data>)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto: training, sweep, verify")
    p.add_argument("--out", default=None, help="output folder (default results/demo, results/demo-<data> otherwise)")
    p.add_argument("--points", type=points_arg, default=None,
                   help=f"test points to sweep, N or 'all' (default: {_per_dataset('points')})")  # fmt: skip
    p.add_argument("--epochs", type=int, default=None, help=f"epochs per model (default: {_per_dataset('epochs')})")
    p.add_argument("--retrain", action="store_true", help="train again even if the run folders hold models")
    p.add_argument("--fresh", action="store_true", help="discard an existing results.db instead of resuming")
    add_sweep_options(
        p, num_samples=d.num_samples, confidence=d.confidence, seed=d.seed, batch_size=d.batch_size, margin=d.margin
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the per (model, r) table, the headline, the timings and where the files are.

    Args:
        args: the parsed options.

    Returns:
        The exit status (0).
    """
    from vaefast import report
    from vaefast._checks import check_device, check_output_dir
    from vaefast.demo import run_demo

    if args.out is not None:
        check_output_dir("--out", args.out)

    config = DemoConfig(
        data=args.data, root=args.root, device=check_device("--device", args.device), points=args.points,
        epochs=args.epochs, retrain=args.retrain, fresh=args.fresh, **sweep_options(args),
    )  # fmt: skip
    res = run_demo(args.out, config, progress=not args.no_progress, log=print)
    t = res.seconds
    print()
    print(report.format_table(res.summary, report.SUMMARY_COLUMNS))
    print()
    print(report.format_headline(res.headline))
    print(
        f"\n[demo] time: training {t['training']:.1f} s, sweep {t['sweep']:.1f} s ({res.sweep.units_computed} units "
        f"computed, {res.sweep.units_skipped} reused), verify {t['verify']:.1f} s, report {t['report']:.1f} s, "
        f"total {t['total']:.1f} s"
    )
    print(f"[demo] results database: {res.db}")
    print(f"[demo] report: {res.page}")
    return 0
