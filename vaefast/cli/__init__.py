"""The ``vaefast`` command line: one subcommand per main job, each in its own module.

Each module in ``SUBCOMMANDS`` exposes ``register(subparsers)``, which adds its parser and sets
``func=<handler(args) -> int>`` as the parser default. Every expected failure of a handler (a bad argument or input,
a file that cannot be read or written, a results database that cannot be opened or written, corrupt data, a
diverging training run, a concurrent writer, a full disk, a missing optional dependency) is printed as one line
``vaefast <command>: error: <message>`` on stderr that names the file or argument, exit status 2 (argparse's own
usage errors exit 2 too; :mod:`vaefast.cli._errors`); ``vaefast verify`` exits 1 when a check failed. ``--debug``
(before or after the command) lets the exception through with its traceback. ``vaefast --version`` prints
``vaefast <version>``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from vaefast.cli._errors import failure

DEBUG_HELP = "show the traceback of a failure instead of one line"


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line too: ``vaefast <command>: error: <message>`` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        """Print the error in one line and exit with status 2.

        Args:
            message: argparse's description of the problem.
        """
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


SUBCOMMANDS: list[str] = ["sweep", "verify", "export", "report", "demo", "train", "info", "estimate", "margin"]


def build_parser() -> argparse.ArgumentParser:
    """The ``vaefast`` parser with every subcommand registered.

    Returns:
        The parser.
    """
    from vaefast import __version__

    parser = OneLineParser(prog="vaefast", description="Adversarial robustness of VAEs, fast.")
    parser.add_argument("--version", action="version", version=f"vaefast {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name in SUBCOMMANDS:
        importlib.import_module(f"vaefast.cli.{name}").register(sub)
    for command in sub.choices.values():  # also after the command; SUPPRESS keeps the top level's value
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``vaefast`` command.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 when ``verify`` found a claim or column that does not hold, 2 for an
        expected failure (one line on stderr), 3 for an unexpected one (a bug), 130 on Ctrl-C (argparse's usage
        errors and ``--help`` / ``--version`` raise ``SystemExit`` as usual).
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:
        if args.debug:
            raise
        message, status = failure(exc, args)
        print(f"vaefast {args.command}: error: {message}", file=sys.stderr)
        return status
