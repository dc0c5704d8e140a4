"""Progress output that fits its place: a tqdm bar on an interactive terminal, one line per stage in a log.

Library functions take ``progress`` (default off); the command line turns it on. With progress on and stderr a
terminal, :func:`progress_bar` is a tqdm bar; with stderr redirected (a log file, CI) it prints one line when the
stage ends (``<desc>: <n> <unit>s in <s> s``) instead of carriage-return updates.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["progress_bar"]


class _LogLine:
    """The log form of a bar: counts quietly, prints one line on :meth:`close`."""

    def __init__(self, iterable: Iterable[Any] | None, desc: str, unit: str) -> None:
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.n, self.start, self.closed = 0, time.perf_counter(), False

    def __iter__(self):
        for item in self.iterable or ():
            yield item
            self.n += 1
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str = "", *_args: Any, **_kwargs: Any) -> None:
        self.postfix = text

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            seconds = time.perf_counter() - self.start
            tail = f" ({self.postfix})" if getattr(self, "postfix", "") else ""
            print(f"{self.desc}: {self.n} {self.unit}{'s' if self.n != 1 else ''} in {seconds:.1f} s{tail}",
                  file=sys.stderr)  # fmt: skip


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    unit: str = "it",
    total: int | None = None,
    enabled: bool = True,
    leave: bool = True,
) -> Any:
    """A progress display for one stage.

    Args:
        iterable: what to iterate (or None and call ``update``).
        desc: the stage's name.
        unit: what is counted.
        total: the expected count (for the bar).
        enabled: False gives a silent tqdm (``disable=True``).
        leave: keep the bar on the terminal when done (inner bars: False).

    Returns:
        A tqdm bar (terminal, or disabled) or a one-line logger; both have ``update``, ``close``, ``set_postfix``,
        ``set_postfix_str`` and iterate over ``iterable``.
    """
    from tqdm.auto import tqdm

    if not enabled or sys.stderr is None:
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)
    return _LogLine(iterable, desc, unit)
