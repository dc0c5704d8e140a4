"""The command line's one error boundary: every expected failure of a command becomes one line on stderr that names
the file or the argument, with exit status 2; a traceback only with ``--debug``.

Expected failures: bad arguments and inputs (``ValueError``, ``TypeError``, a missing optional dependency), files
(``OSError``: missing, unreadable, unwritable, a folder in a file's place, a full disk; the message names the file),
results databases (:class:`vaefast.store.DatabaseError`, or an SQLite error, named by the command's database),
corrupt data (a damaged gzip or pickle stream), a training run that diverged (``FloatingPointError``) and another
process of a distributed sweep that stopped (:class:`vaefast.sweep.RankFailedError`). Anything else is a bug: one
line that says so and how to get the traceback, exit status 3. Ctrl-C is one line and exit status 130.
"""

from __future__ import annotations

import argparse
import errno
import pickle
import sqlite3
import zlib

from vaefast._extras import MissingExtraError

USAGE, INTERNAL, INTERRUPTED = 2, 3, 130

_CORRUPT = (zlib.error, EOFError, pickle.UnpicklingError)


def _expected() -> tuple[type[BaseException], ...]:
    from vaefast.sweep.transport import RankFailedError

    return (ValueError, TypeError, OSError, sqlite3.Error, MissingExtraError, FloatingPointError, RankFailedError,
            *_CORRUPT)  # fmt: skip


def _os_message(exc: OSError) -> str:
    """``FILE: reason`` for an OS error that names its file (``FILE -> OTHER`` for a rename), else its text."""
    if exc.filename is None:
        return str(exc)
    where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on the device (the disk or quota is full)"
    return f"{where}: {reason}"


def _subject(args: argparse.Namespace) -> str:
    """What a command reads or writes, for a failure that does not name its own file."""
    for attr in ("db", "run", "out", "root", "data"):
        value = getattr(args, attr, None)
        if isinstance(value, str) and value:
            return value
    return "the input"


def failure(exc: BaseException, args: argparse.Namespace) -> tuple[str, int]:
    """The one line and the exit status of a command's failure.

    Args:
        exc: what the command raised.
        args: its parsed arguments (for a failure that names no file: the command's database or input).

    Returns:
        ``(message, status)``: status 2 for an expected failure, 3 for a bug, 130 for Ctrl-C.
    """
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", INTERRUPTED
    if not isinstance(exc, _expected()):
        return (
            f"unexpected {type(exc).__name__}: {exc} (a bug in vaefast: run the command again with --debug for the "
            "traceback, and please report it)",
            INTERNAL,
        )
    from vaefast.store import DatabaseError

    if isinstance(exc, OSError) and not isinstance(exc, DatabaseError):
        message = _os_message(exc)
    elif isinstance(exc, sqlite3.Error):
        message = f"{_subject(args)}: SQLite error: {exc}"
    elif isinstance(exc, _CORRUPT):
        message = f"{_subject(args)}: corrupt or truncated data ({type(exc).__name__}: {exc})"
    else:
        message = str(exc) or type(exc).__name__
    return " ".join(message.split()), USAGE
