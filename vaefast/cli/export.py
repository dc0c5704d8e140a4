"""``vaefast export results.db --csv out.csv`` / ``--json out.json``: the results (or curves/units) table."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a results database table to CSV or JSON")
    p.add_argument("db", help="results database written by `vaefast sweep`")
    p.add_argument("--csv", default=None, help="write CSV here")
    p.add_argument("--json", default=None, help="write JSON (a list of row objects) here")
    p.add_argument("--table", default="results", choices=["results", "curves", "units", "points", "models"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vaefast.store import export

    if not args.csv and not args.json:
        raise ValueError("give --csv and/or --json")
    n = export(args.db, csv_path=args.csv, json_path=args.json, table=args.table)
    print(f"exported {n} {args.table} rows" + "".join(f" -> {p}" for p in (args.csv, args.json) if p))
    return 0
