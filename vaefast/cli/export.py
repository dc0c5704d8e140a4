"""``vaefast export results.db --csv out.csv`` / ``--json out.json``: one table of a results database."""

from __future__ import annotations

import argparse

from vaefast.schema import TABLES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand.

    Args:
        subparsers: the ``vaefast`` parser's subcommands.
    """
    p = subparsers.add_parser("export", help="export a results database table to CSV or JSON")
    p.add_argument("db", help="results database written by `vaefast sweep`")
    p.add_argument("--csv", default=None, help="write CSV here")
    p.add_argument("--json", default=None, help="write JSON (a list of row objects) here")
    p.add_argument("--table", default="results", choices=[t for t in TABLES if t != "meta"], help="(default results)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export the table and print how many rows went where.

    Args:
        args: the parsed options.

    Returns:
        The exit status (0).
    """
    from vaefast._checks import check_output_file
    from vaefast.store import export

    if not args.csv and not args.json:
        raise ValueError("give --csv and/or --json")
    for name, path in (("--csv", args.csv), ("--json", args.json)):
        if path:
            check_output_file(name, path)
    n = export(args.db, csv_path=args.csv, json_path=args.json, table=args.table)
    print(f"exported {n} {args.table} rows" + "".join(f" -> {p}" for p in (args.csv, args.json) if p))
    return 0
