"""One traced op as a call template: the ATen op and its arguments by name, with the tensors that depend on x left
as placeholders (:class:`Var`) and sizes that depend on the batch as functions of it (:class:`Sym`), so the same op
runs on any batch of points, intervals or Jacobian rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

__all__ = ["Call", "CertificationRefused", "Sym", "Var"]


class CertificationRefused(ValueError):
    """The encoder cannot be certified soundly: an op that cannot be traced or has no sound rule (the message names
    the op and where it sits), or a traced graph that does not reproduce ``model.encode``."""


@dataclass(frozen=True)
class Var:
    """The ``pos``-th input of a node that depends on x."""

    pos: int


@dataclass(frozen=True)
class Sym:
    """A size that depends on the batch: ``fn(batch)`` (e.g. the batch itself, for ``x.view(x.shape[0], -1)``)."""

    fn: Callable[[int], int]
    text: str


def _fill(value: Any, inputs: tuple[torch.Tensor, ...], batch: int) -> Any:
    if isinstance(value, Var):
        return inputs[value.pos]
    if isinstance(value, Sym):
        return value.fn(batch)
    if isinstance(value, (list, tuple)):
        return type(value)(_fill(v, inputs, batch) for v in value)
    return value


def has_placeholder(value: Any, kind: type) -> bool:
    """Whether ``value`` (nested lists included) holds a placeholder of type ``kind``."""
    if isinstance(value, kind):
        return True
    if isinstance(value, (list, tuple)):
        return any(has_placeholder(v, kind) for v in value)
    return False


@dataclass(frozen=True)
class Call:
    """``op(**args)`` with placeholders; ``out_index`` picks one output of an op that returns several.

    Attributes:
        op: the functional ATen overload (in-place variants are replaced by their functional form).
        args: every schema argument by name (defaults filled in).
        out_index: the output used, or None for a single-output op.
    """

    op: torch._ops.OpOverload
    args: dict[str, Any]
    out_index: int | None = None

    def __call__(self, *inputs: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """Run the op with ``inputs`` in place of the placeholders (``batch``: the leading size, default the first
        input's)."""
        batch = inputs[0].shape[0] if batch is None else batch
        out = self.op(**{k: _fill(v, inputs, batch) for k, v in self.args.items()})
        return out if self.out_index is None else out[self.out_index]

    def with_args(self, **changes: Any) -> Call:
        """The same call with some arguments replaced."""
        return replace(self, args={**self.args, **changes})

    def var_names(self) -> list[str]:
        """The argument names that hold an input depending on x, in order."""
        return [k for k, v in self.args.items() if has_placeholder(v, Var)]

    @property
    def name(self) -> str:
        """``aten.<op>.<overload>``."""
        return str(self.op)
