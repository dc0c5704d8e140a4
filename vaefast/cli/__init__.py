"""The ``vaefast`` command line: one subcommand per main job, each in its own module.

Each module in ``SUBCOMMANDS`` exposes ``register(subparsers)``, which adds its parser and sets
``func=<handler(args) -> int>`` as the parser default. A ``ValueError``, ``TypeError`` or ``FileNotFoundError`` from
a handler, or a missing optional dependency (:class:`vaefast._extras.MissingExtraError`, naming the extra to install),
is printed as one line ``vaefast <command>: error: <message>`` on stderr, exit status 2 (argparse's own
usage errors exit 2 too); ``vaefast --version`` prints ``vaefast <version>``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vaefast._extras import MissingExtraError

SUBCOMMANDS: list[str] = ["sweep", "verify", "export", "report", "demo", "train", "info", "estimate", "margin"]


def build_parser() -> argparse.ArgumentParser:
    """The ``vaefast`` parser with every subcommand registered.

    Returns:
        The parser.
    """
    from vaefast import __version__

    parser = argparse.ArgumentParser(prog="vaefast", description="Adversarial robustness of VAEs, fast.")
    parser.add_argument("--version", action="version", version=f"vaefast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"vaefast.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``vaefast`` command.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a bad argument or input (argparse's usage errors and ``--help`` /
        ``--version`` raise ``SystemExit`` as usual).
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, MissingExtraError) as exc:
        print(f"vaefast {args.command}: error: {exc}", file=sys.stderr)
        return 2
