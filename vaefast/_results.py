"""Shared plumbing for result dataclasses: conversion of tensor fields to plain Python for JSON / CSV."""

from __future__ import annotations

import dataclasses
from typing import Any

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


class ResultMixin:
    """Shared methods of the result dataclasses (which have a ``point_index`` field): ``to_dict`` and ``len``."""

    def to_dict(self) -> dict[str, Any]:
        """Every dataclass field as plain Python.

        Returns:
            ``{field: to_python(value)}`` (tensors become nested lists).
        """
        return {f.name: to_python(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def __len__(self) -> int:
        return int(self.point_index.shape[0])  # type: ignore[attr-defined]
