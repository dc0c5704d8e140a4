"""``vaefast margin RUN``: numerical robustness margins (smallest max-damage attack radius that breaks
r-robustness) of a trained model on data points, optionally next to the margin bound; a short table on stdout and
one CSV row per point."""

from __future__ import annotations

import argparse

from vaefast.cli._common import add_model_and_points_options, load_model_and_points, write_csv


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``margin`` subcommand.

    Args:
        subparsers: the ``vaefast`` parser's subcommands.
    """
    p = subparsers.add_parser(
        "margin", help="numerical robustness margins (attack-based) of a model", description=__doc__
    )
    add_model_and_points_options(p)
    p.add_argument("--r", type=float, required=True, help="reconstruction radius r")
    p.add_argument("--method", default="bisection", choices=("bisection", "grid"))
    p.add_argument("--tol", type=float, default=0.01, help="bisection bracket width (default 0.01)")
    p.add_argument("--granularity", type=float, default=0.01, help="grid step (default 0.01)")
    p.add_argument("--max-radius", type=float, default=None, help="largest radius (default: the box's farthest corner)")
    p.add_argument("--samples", type=int, default=1000, help="max Monte-Carlo samples per decision (default 1000)")
    p.add_argument("--steps", type=int, default=50, help="attack steps (default 50)")
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--optimizer", default="pgd", choices=("pgd", "adam", "lbfgsb"))
    p.add_argument("--bound", action="store_true", help="also compute the margin bound for comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="CSV file for the per-point rows")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Search the margins (and bound), print the quantiles, write the CSV.

    Args:
        args: the parsed options.

    Returns:
        The exit status (0).
    """
    from vaefast.margin import numerical_margin
    from vaefast.robustness import estimate_r_robustness, margin_bound

    model, x = load_model_and_points(args)
    est = estimate_r_robustness(model, x, args.r, num_samples=args.samples, seed=args.seed, point_offset=args.start)
    res = numerical_margin(
        model, x, args.r, method=args.method, tol=args.tol, granularity=args.granularity, max_radius=args.max_radius,
        num_samples=args.samples, steps=args.steps, restarts=args.restarts, optimizer=args.optimizer, seed=args.seed,
        point_offset=args.start, estimate=est, progress=True,
    )  # fmt: skip
    rows = res.to_rows()
    if args.bound:
        mb = margin_bound(model, x, args.r, estimate=est)  # the same clean-point decision as the search
        for row, brow in zip(rows, mb.to_rows(), strict=True):
            row.update(bound=brow["bound"], whitened_bound=brow["whitened_bound"], certified=brow["certified"])
    print(summary_table(res, rows, bound=args.bound))
    if args.out:
        write_csv(rows, args.out)
    return 0


def summary_table(res, rows: list[dict], bound: bool = False) -> str:
    """The command's printed summary.

    Args:
        res: the :class:`vaefast.margin.NumericalMargin`.
        rows: its rows (with ``bound`` and ``certified`` when ``bound``).
        bound: whether the bound was computed.

    Returns:
        Margin quantiles, and how many points were uncertified (margin 0), bracketed, or left at the search limit;
        with ``bound``: bound <= margin over the points where both are meaningful (certified and bracketed).
    """
    m = res.margin
    q = [float(v) for v in m.quantile(m.new_tensor([0.0, 0.25, 0.5, 0.75, 1.0]))]
    n = len(res)
    zero = int((m == 0).sum())
    unbracketed = int((~res.bracketed).sum())
    lines = [
        f"{n} points, r = {res.r:g}, method = {res.method}",
        f"{'min':>8} {'q25':>8} {'median':>8} {'q75':>8} {'max':>8}",
        f"{q[0]:>8.4g} {q[1]:>8.4g} {q[2]:>8.4g} {q[3]:>8.4g} {q[4]:>8.4g}",
        f"not r-robust at delta = 0 (margin 0, no certificate): {zero} of {n}; still r-robust at the search limit "
        f"(unbracketed, margin = limit): {unbracketed} of {n}",
    ]
    if zero == n:
        lines.append(f"no point is r-robust at r = {res.r:g}: r is below every r*; try a larger r (vaefast estimate)")
    if bound:
        comp = [row for row in rows if row["certified"] and row["bracketed"] and row["margin"] > 0]
        ok = sum(row["bound"] <= row["margin"] for row in comp)
        lines.append(f"bound <= margin on {ok} of {len(comp)} comparable points (certified and bracketed)")
    return "\n".join(lines)
