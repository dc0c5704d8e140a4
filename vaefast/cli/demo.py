"""``vaefast demo --out results/demo``: the main job, end to end on the embedded digits data.

Trains β-VAEs (β ∈ {1, 2, 4, 8}) and a β-TCVAE on digits (reused when already trained), chooses the radii from the
points' r* and the attack budgets from their norms, sweeps into ``<out>/results.db`` (resumed if interrupted),
replays every stored claim with fresh random numbers, writes ``<out>/report/index.html`` and prints the headline
(:func:`vaefast.demo.run_demo`). Seeded and deterministic.
"""

from __future__ import annotations

import argparse

from vaefast.cli._common import add_sweep_options, sweep_options
from vaefast.demo import DemoConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand (its sweep defaults are :class:`vaefast.demo.DemoConfig`'s).

    Args:
        subparsers: the ``vaefast`` parser's subcommands.
    """
    d = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="train beta-VAEs + a beta-TCVAE on digits, sweep, report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="results/demo", help="output folder (default %(default)s)")
    p.add_argument("--points", type=int, default=d.points, help="test points to sweep (default %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs per model (default %(default)s)")
    p.add_argument("--retrain", action="store_true", help="train again even if the run folders hold models")
    p.add_argument("--fresh", action="store_true", help="discard an existing results.db instead of resuming")
    add_sweep_options(
        p, samples=d.num_samples, confidence=d.confidence, seed=d.seed, batch_size=d.batch_size, tol=d.margin_tol,
        max_radius=d.margin_max_radius, attack_steps=d.attack_kwargs.get("steps"),
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the per (model, r) table, the headline, the timings and where the files are.

    Args:
        args: the parsed options.

    Returns:
        The exit status (0).
    """
    from vaefast import report
    from vaefast.demo import run_demo

    config = DemoConfig(points=args.points, epochs=args.epochs, retrain=args.retrain, fresh=args.fresh,
                        **sweep_options(args))  # fmt: skip
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
