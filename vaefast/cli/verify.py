"""``vaefast verify results.db``: re-derive every deterministic column of a sweep and replay its stored evidence
with independent random numbers (:mod:`vaefast.verify`).

Every row: the sweep's identity and completeness against its spec, the clean decision, intervals and bounds from
the stored counts and components, the margins' order, the evidence's norm, box and counts; the rows checked (all,
or ``--sample N``) also against the model (geometry, and the clean and evidence counts recounted on the sweep's own
random numbers). Then each stored δ must break r-robustness and each certified point must be r-robust at δ = 0
under a fresh estimate with more samples. Prints the confirmed fraction per model and r, every claim that failed
and every discrepancy with its row. The database is opened read-only (the claims are stored in it when it can be
written). Exit status: 0 all confirmed and consistent, 1 a claim failed or a column disagrees, 2 usage error.
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
    p.add_argument(
        "--confidence",
        type=float,
        default=0.99,
        help="confidence of the replay, for all claims together (Bonferroni; default 0.99)",
    )
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
    p.add_argument(
        "--no-recompute",
        action="store_true",
        help="do not run the margin search of the rows checked again (faster; margins are then only checked "
        "against each other and their evidence)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Re-derive the columns, replay the evidence, print the confirmed fraction per (model, r, kind), every failed
    claim and every discrepancy.

    Args:
        args: the parsed options.

    Returns:
        0 when every claim was confirmed and every re-derived column agrees, 1 otherwise.
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
        recompute=not args.no_recompute,
    )
    if rep.version_note:
        print(rep.version_note)
    print(format_table(rep.summary(), ["model", "r", "kind", "checked", "confirmed", "fraction"]))
    print(
        f"evidence re-verified: {rep.confirmed} of {rep.checked} claims confirmed "
        f"({rep.factor}x samples, independent stream, confidence {rep.confidence:g} for all claims together: "
        f"each interval at {rep.claim_confidence:.6g})"
    )
    for row in rep.failed:
        print(
            f"FAILED {row['item_id']} [{row['kind']}]: p_hat {row['p_hat']:.4f} "
            f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}] n={row['num_samples']}: {row['reason']}"
        )
    print(f"re-derived columns: {len(rep.discrepancies)} discrepancies")
    for d in rep.discrepancies:
        print(f"DISCREPANCY {d.item_id} [{d.check}]: {d.reason}")
    if not rep.stored:
        print(f"{args.db} is read-only: the replayed claims were not stored in it")
    return 0 if rep.passed else 1
