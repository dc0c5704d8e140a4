"""``vaefast estimate RUN``: Monte-Carlo r-robustness (p_hat with Clopper–Pearson interval, r*) of a trained model
on data points, optionally with the margin bound; a short table on stdout and one CSV row per (point, radius)."""

from __future__ import annotations

import argparse

from vaefast.cli._common import add_model_and_points_options, load_model_and_points, write_csv
from vaefast.core.options import DEFAULT_NUM_SAMPLES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``estimate`` subcommand.

    Args:
        subparsers: the ``vaefast`` parser's subcommands.
    """
    p = subparsers.add_parser(
        "estimate", help="r-robustness probabilities, r* and margin bounds of a model", description=__doc__
    )
    add_model_and_points_options(p)
    p.add_argument("--r", type=float, nargs="+", action="extend", required=True, help="radii (repeatable)")
    p.add_argument(
        "--samples", type=int, default=DEFAULT_NUM_SAMPLES, help="Monte-Carlo samples per point (default %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--confidence", type=float, default=0.95, help="Clopper–Pearson confidence (default 0.95)")
    p.add_argument("--bound", action="store_true", help="also compute the margin bounds (one per radius)")
    p.add_argument("--out", default=None, help="CSV file for the per-(point, radius) rows")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Estimate (and bound), print the per-radius table, write the CSV.

    Args:
        args: the parsed options.

    Returns:
        The exit status (0).
    """
    from vaefast._checks import as_radii, check_num_samples, check_output_file, check_probability, check_seed
    from vaefast.robustness import estimate_r_robustness

    as_radii("--r", args.r)
    check_num_samples("--samples", args.samples)
    check_probability("--confidence", args.confidence)
    check_seed("--seed", args.seed)
    if args.out:
        check_output_file("--out", args.out)  # before the work: a result is never computed only to be lost
    model, x, box = load_model_and_points(args)
    res = estimate_r_robustness(
        model, x, args.r, num_samples=args.samples, seed=args.seed, confidence=args.confidence,
        point_offset=args.start, progress=True,
    )  # fmt: skip
    rows = res.to_rows()
    if args.bound:
        _add_bounds(rows, model, x, res, box)
    print(summary_table(res, rows, bound=args.bound))
    if args.out:
        write_csv(rows, args.out)
    return 0


def _add_bounds(rows: list[dict], model, x, res, box) -> None:
    """Join every radius's bounds (from the same estimate: one clean-point decision) and box limit into ``rows``."""
    from vaefast.robustness import margin_bound

    limit = box.max_perturbation(x)
    by_key = {(row["point"], row["r"]): row for row in rows}
    for r in res.radii.tolist():
        for b, brow in enumerate(margin_bound(model, x, r, estimate=res).to_rows()):
            row = by_key[(brow["point"], r)]
            for key in ("bound", "certified_bound", "spectral_bound", "whitened_bound", "latent_margin", "certified"):
                row[key] = brow[key]
            row["box_limit"] = float(limit[b])
            row["bound_exceeds_box"] = brow["bound"] > row["box_limit"]


def summary_table(res, rows: list[dict], bound: bool = False) -> str:
    """The command's printed summary.

    Args:
        res: the :class:`vaefast.robustness.RRobustnessResult`.
        rows: its rows (with the bound columns when ``bound``).
        bound: whether the bounds were computed.

    Returns:
        Per radius: mean p_hat, fraction robust, mean CI width (and the median bound over certified points, capped
        to the box, with the count of bounds larger than the box allows); then r* quantiles and how to choose r.
    """
    header = f"{'r':>8} {'mean p_hat':>10} {'robust':>7} {'CI width':>9}"
    if bound:
        header += f" {'median bound':>13} {'> box':>6}"
    lines = [f"{len(res)} points, S = {res.num_samples}, confidence {res.confidence:g}", header]
    for k, r in enumerate(res.radii.tolist()):
        line = (
            f"{r:>8.4g} {res.p_hat[:, k].mean().item():>10.4f} {res.robust[:, k].double().mean().item():>7.1%} "
            f"{(res.ci_high[:, k] - res.ci_low[:, k]).mean().item():>9.4f}"
        )
        if bound:
            cert = [row for row in rows if row["r"] == r and row["certified"]]
            capped = sorted(min(row["bound"], row["box_limit"]) for row in cert)
            median = f"{capped[len(capped) // 2]:.4g}" if capped else "-"
            line += f" {median:>13} {sum(row['bound_exceeds_box'] for row in cert):>6}"
        lines.append(line)
    q = res.r_star.quantile(res.r_star.new_tensor([0.0, 0.25, 0.5, 0.75, 1.0])).tolist()
    lines.append(
        f"r*: min {q[0]:.4g}  q25 {q[1]:.4g}  median {q[2]:.4g}  q75 {q[3]:.4g}  max {q[4]:.4g}  "
        "(a point is r-robust iff r > r*: choose r between the quartiles, e.g. the median)"
    )
    if bound and any(row["bound_exceeds_box"] for row in rows):
        lines.append(
            "'> box': bounds larger than the largest perturbation the [0, 1] box allows at the point "
            "(capped in the median): r is so large that the point is robust to any perturbation of the input"
        )
    return "\n".join(lines)
