"""``vaefast verify results.db``: replay the stored evidence of a sweep with independent random numbers.

For each checked row: the stored δ must break r-robustness (‖δ‖ = margin, inside the box, and a fresh estimate with
more samples must not show x + δ r-robust at the chosen confidence), and a certified point must be r-robust at
δ = 0. Prints the confirmed fraction per model and r and every row that failed. Exit status: 0 all confirmed,
1 some claims failed, 2 usage error.
"""

from __future__ import annotations

import argparse

from vaefast.cli._common import model_arg


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``verify`` subcommand.

    Args:
        subparsers: the ``vaefast`` parser's subcommands.
    """
    p = subparsers.add_parser(
        "verify",
        help="replay a sweep's stored evidence with fresh random numbers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("db", help="results database written by `vaefast sweep` or `vaefast demo`")
    p.add_argument("--sample", type=int, default=None, help="check N randomly chosen rows (default: all)")
    p.add_argument("--factor", type=int, default=4, help="fresh samples = FACTOR x the sweep's (default 4)")
    p.add_argument("--confidence", type=float, default=0.99, help="Clopper-Pearson confidence (default 0.99)")
    p.add_argument("--seed", type=int, default=0, help="seed of the replay stream and of --sample")
    p.add_argument(
        "--model",
        dest="models",
        type=model_arg,
        action="append",
        default=[],
        help="NAME=SOURCE: load model NAME from SOURCE (run folder, diffusers:PATH, module:function) instead of its "
        "stored source (repeat)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Replay the evidence and print the confirmed fraction per (model, r, kind) and every failed claim.

    Args:
        args: the parsed options.

    Returns:
        0 when every claim was confirmed, 1 otherwise.
    """
    from vaefast._checks import check_device
    from vaefast.report import format_table
    from vaefast.verify import verify_sweep

    rep = verify_sweep(
        args.db,
        models=dict(args.models),
        factor=args.factor,
        confidence=args.confidence,
        sample=args.sample,
        seed=args.seed,
        device=check_device("--device", args.device),
        progress=not args.no_progress,
    )
    if rep.version_note:
        print(rep.version_note)
    print(format_table(rep.summary(), ["model", "r", "kind", "checked", "confirmed", "fraction"]))
    print(
        f"evidence re-verified: {rep.confirmed} of {rep.checked} claims confirmed "
        f"({rep.factor}x samples, confidence {rep.confidence:g}, independent stream)"
    )
    for row in rep.failed:
        print(
            f"FAILED {row['item_id']} [{row['kind']}]: p_hat {row['p_hat']:.4f} "
            f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}] n={row['num_samples']}: {row['reason']}"
        )
    return 0 if rep.all_confirmed else 1
