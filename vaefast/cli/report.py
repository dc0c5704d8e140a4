"""``vaefast report results.db --out report/``: PNG figures and index.html from a sweep database."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` subcommand.

    Args:
        subparsers: the ``vaefast`` parser's subcommands.
    """
    p = subparsers.add_parser("report", help="figures and an HTML page from a results database")
    p.add_argument("db", help="results database written by `vaefast sweep`")
    p.add_argument("--out", default="report", help="output folder (default report/)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the report and print the headline and the page's path.

    Args:
        args: the parsed options.

    Returns:
        The exit status (0).
    """
    from vaefast import report
    from vaefast._checks import check_output_dir
    from vaefast._version import version_note

    check_output_dir("--out", args.out)
    page = report.write_report(args.db, args.out)
    data = report.load(args.db)
    note = version_note(data.meta.get("vaefast_version"), str(args.db))
    if note:
        print(note)
    print(report.format_headline(report.headline(data)))
    print(f"report: {page}")
    return 0
