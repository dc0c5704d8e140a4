"""Shared plumbing for result dataclasses: conversion of tensor fields to plain Python for JSON / CSV, and how a
result prints (a short per-point table with its counts, never raw tensors)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch


def to_python(value: Any) -> Any:
    """A value as plain Python.

    Args:
        value: anything.

    Returns:
        A tensor as (nested) lists of Python scalars (detached, on CPU); anything else unchanged.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    return value


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_rows(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """A plain-text table of some columns of ``rows``.

    Args:
        rows: dicts (e.g. a result's ``to_rows()``).
        columns: the keys to show, in order.

    Returns:
        The table, right-aligned, one line per row under a header.
    """
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [" ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += [" ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


class ResultMixin:
    """Shared methods of the result dataclasses (which have a ``point_index`` field and ``to_rows()``): ``to_dict``,
    ``len``, ``summary`` (what the command line prints), ``to_frame`` (pandas) and a short ``repr``.

    A subclass names the columns of its table (``_SHOW``) and may add counts (:meth:`counts`); it is declared
    ``@dataclass(repr=False)`` so that the dataclass does not replace the short ``repr``.
    """

    _SHOW: ClassVar[tuple[str, ...]] = ("point",)

    def to_dict(self) -> dict[str, Any]:
        """Every dataclass field as plain Python.

        Returns:
            ``{field: to_python(value)}`` (tensors become nested lists).
        """
        return {f.name: to_python(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def __len__(self) -> int:
        return int(self.point_index.shape[0])  # type: ignore[attr-defined]

    def counts(self) -> dict[str, int]:
        """The counts a reader wants first (e.g. points decided robust, undecided); none by default.

        Returns:
            ``{what: how many}``.
        """
        return {}

    def summary(self, rows: int | None = None) -> str:
        """The result as text: its counts, then a table of the per-point (per radius) rows.

        Args:
            rows: show at most this many rows (None: all).

        Returns:
            The text.
        """
        table = self.to_rows()  # type: ignore[attr-defined]
        shown = table if rows is None else table[:rows]
        counts = ", ".join(f"{k} {v}" for k, v in self.counts().items())
        head = f"{type(self).__name__}: {len(self)} points" + (f"; {counts}" if counts else "")
        more = (
            f"\n... {len(table) - len(shown)} more rows (.summary() shows all, .to_rows() gives them)"
            if len(shown) < len(table)
            else ""
        )
        return f"{head}\n{format_rows(shown, self._SHOW)}{more}"

    def to_frame(self) -> Any:
        """The rows as a pandas DataFrame.

        Returns:
            ``pandas.DataFrame(self.to_rows())``.

        Raises:
            ImportError: pandas is not installed (one line naming it).
        """
        try:
            import pandas
        except ImportError:
            raise ImportError("to_frame needs pandas, which is not installed: pip install pandas") from None
        return pandas.DataFrame(self.to_rows())  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return self.summary(rows=5)
