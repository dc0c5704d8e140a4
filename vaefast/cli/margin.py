"""``vaefast margin RUN``: numerical robustness margins of a trained model on data points (where a max-damage attack
of growing size breaks r-robustness: the estimate, and the bracket [margin_lower, margin_upper] of radii decided
robust and broken at the stated confidence), optionally next to the margin bound; a short table on stdout and one CSV
row per point."""

from __future__ import annotations

import argparse

import torch

from vaefast.cli._common import add_model_and_points_options, load_model_and_points, write_csv
from vaefast.core.options import METHODS, OPTIMIZERS, MarginOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``margin`` subcommand (defaults: :class:`vaefast.core.options.MarginOptions`).

    Args:
        subparsers: the ``vaefast`` parser's subcommands.
    """
    d = MarginOptions()
    p = subparsers.add_parser(
        "margin", help="numerical robustness margins (attack-based) of a model", description=__doc__
    )
    add_model_and_points_options(p)
    p.add_argument("--r", type=float, required=True, help="reconstruction radius r")
    p.add_argument("--method", default=d.method, choices=METHODS)
    p.add_argument("--tol", type=float, default=d.tol, help="bracket width of the crossing (default %(default)s)")
    p.add_argument("--granularity", type=float, default=d.granularity, help="grid step (default %(default)s)")
    p.add_argument("--max-radius", type=float, default=None, help="largest radius (default: the box's farthest corner)")
    p.add_argument("--samples", type=int, default=d.num_samples, help="max samples per decision (default %(default)s)")
    p.add_argument("--confidence", type=float, default=d.confidence, help="of every claim (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="attack steps (default %(default)s)")
    p.add_argument("--restarts", type=int, default=d.restarts)
    p.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
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
    from vaefast._checks import check_output_file, check_positive_float, check_seed
    from vaefast.margin import numerical_margin
    from vaefast.robustness import estimate_r_robustness, margin_bound

    check_positive_float("--r", args.r)
    check_seed("--seed", args.seed)
    if args.out:
        check_output_file("--out", args.out)  # before the work: a result is never computed only to be lost
    options = MarginOptions(
        method=args.method, tol=args.tol, granularity=args.granularity, max_radius=args.max_radius,
        num_samples=args.samples, confidence=args.confidence, steps=args.steps, restarts=args.restarts,
        optimizer=args.optimizer,
    )  # fmt: skip
    model, x, box = load_model_and_points(args)
    est = estimate_r_robustness(
        model, x, args.r, num_samples=args.samples, confidence=args.confidence, seed=args.seed, point_offset=args.start
    )
    res = numerical_margin(
        model, x, args.r, options=options, box=box, seed=args.seed, point_offset=args.start, estimate=est,
        progress=True,
    )  # fmt: skip
    rows = [_csv_row(row) for row in res.to_rows()]
    if args.bound:
        mb = margin_bound(model, x, args.r, estimate=est)  # the same clean-point decision as the search
        for row, brow in zip(rows, mb.to_rows(), strict=True):
            row.update(bound=brow["bound"], whitened_bound=brow["whitened_bound"], certified=brow["certified"])
    print(summary_table(res, rows, bound=args.bound))
    if args.out:
        write_csv(rows, args.out)
    return 0


def _csv_row(row: dict) -> dict:
    """A result row with the database's names for the bracket (``margin_lower``, ``margin_upper``)."""
    out = dict(row)
    out["margin_lower"], out["margin_upper"] = out.pop("lower"), out.pop("upper")
    return out


def _quantiles(values: list[float]) -> str:
    if not values:
        return f"{'-':>9} {'-':>9} {'-':>9} {'-':>9} {'-':>9}"
    t = torch.tensor(values, dtype=torch.float64)
    q = t.quantile(t.new_tensor([0.0, 0.25, 0.5, 0.75, 1.0])).tolist()
    return " ".join(f"{v:>9.4g}" for v in q)


def summary_table(res, rows: list[dict], bound: bool = False) -> str:
    """The command's printed summary.

    Args:
        res: the :class:`vaefast.margin.NumericalMargin`.
        rows: its CSV rows (with ``bound`` and ``certified`` when ``bound``).
        bound: whether the bound was computed.

    Returns:
        The quantiles of the three numbers over the points decided robust with evidence, the counts of points not
        robust, undecided and unbracketed; with ``bound``: bound <= each end over those points.
    """
    n = len(res)
    comp = [row for row in rows if row["clean"] == "robust" and row["bracketed"]]
    undecided = sum(row["clean"] == "undecided" for row in rows)
    broken = sum(row["clean"] == "not robust" for row in rows)
    unbracketed = sum(row["clean"] == "robust" and not row["bracketed"] for row in rows)
    lines = [
        f"{n} points, r = {res.r:g}, method = {res.method}, confidence {res.confidence:g}",
        f"{'':<13}{'min':>9} {'q25':>9} {'median':>9} {'q75':>9} {'max':>9}",
    ]
    for name in ("margin_lower", "margin", "margin_upper"):
        lines.append(f"{name:<13}" + _quantiles([row[name] for row in comp]))
    lines.append(
        f"decided robust with evidence: {len(comp)} of {n}; not r-robust at delta = 0 (margin 0): {broken}; "
        f"undecided at delta = 0 (p_hat too close to 1/2, never compared): {undecided}; still r-robust at the search "
        f"limit (unbracketed): {unbracketed}"
    )
    if broken == n:
        lines.append(f"no point is r-robust at r = {res.r:g}: r is below every r*; try a larger r (vaefast estimate)")
    if bound:
        for end in ("margin_lower", "margin", "margin_upper"):
            ok = sum(row["bound"] <= row[end] for row in comp)
            lines.append(f"bound <= {end} on {ok} of {len(comp)} points decided robust with evidence")
    return "\n".join(lines)
