"""The data range: one :class:`Box` that travels with the points (from the data loader, the user or the sweep spec)
and is read by the attacks, the margin search, the certificates and ``verify``.

A box ``[low, high]`` constrains every input coordinate: an attacked input ``x + delta`` must stay inside it, and the
largest perturbation it allows at a point (the distance to its farthest corner) caps the margin search. ``None``
means unbounded inputs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["UNIT_BOX", "Box", "as_box"]


class Box(NamedTuple):
    """The data range ``[low, high]`` of every input coordinate (a named pair: ``Box(0.0, 1.0) == (0.0, 1.0)``).

    Attributes:
        low: the smallest value of a coordinate.
        high: the largest (``low < high``, both finite).
    """

    low: float
    high: float

    def offsets(self, x: torch.Tensor, name: str = "x") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-coordinate bounds on delta that keep ``x + delta`` in the box.

        Args:
            x: points ``[B, *shape]`` inside the box (up to a relative 1e-6).
            name: the argument's name in the error message.

        Returns:
            ``(lo, hi)`` float64 ``[B, D]`` on ``x``'s device: ``lo = min(low - x, 0)``, ``hi = max(high - x, 0)``.

        Raises:
            ValueError: ``x`` has entries outside the box (naming ``name``).
        """
        flat = x.detach().reshape(x.shape[0], -1).to(torch.float64)
        tol = 1e-6 * max(1.0, self.high - self.low)
        if bool((flat < self.low - tol).any()) or bool((flat > self.high + tol).any()):
            lo_v, hi_v = flat.min().item(), flat.max().item()
            raise ValueError(
                f"{name} has entries outside box=({self.low:g}, {self.high:g}) (min {lo_v:.4g}, max {hi_v:.4g})"
            )
        return (self.low - flat).clamp(max=0.0), (self.high - flat).clamp(min=0.0)

    def max_perturbation(self, x: torch.Tensor) -> torch.Tensor:
        """Per point the largest ``||delta||_2`` with ``x + delta`` inside the box (its farthest corner).

        Args:
            x: points ``[B, *shape]`` inside the box.

        Returns:
            ``[B]`` float64 on the CPU: ``||max(|low - x|, |high - x|)||_2``.
        """
        lo, hi = self.offsets(x)
        return torch.linalg.vector_norm(torch.maximum(lo.abs(), hi.abs()), dim=1).cpu()

    def contains(self, x: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
        """Which points lie inside the box, up to ``tol * (high - low)``.

        Args:
            x: points ``[B, *shape]``.
            tol: the relative tolerance.

        Returns:
            ``[B]`` bool on ``x``'s device.
        """
        flat = x.detach().reshape(x.shape[0], -1).to(torch.float64)
        slack = tol * (self.high - self.low)
        return ((flat >= self.low - slack) & (flat <= self.high + slack)).all(dim=1)


UNIT_BOX = Box(0.0, 1.0)
"""The range of every dataset vaefast loads (pixels scaled to [0, 1]) and the default of every analysis."""


def as_box(value: object, name: str = "box") -> Box | None:
    """A box from a :class:`Box`, a ``(low, high)`` pair or None.

    Args:
        value: the box (None: unbounded inputs).
        name: the argument's name in error messages.

    Returns:
        The :class:`Box` (or None).

    Raises:
        TypeError / ValueError: naming ``name`` (not a pair of numbers, not finite, ``low >= high``).
    """
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a (low, high) pair or None, got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise TypeError(f"{name} must hold two numbers, got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ValueError(f"{name} must satisfy low < high (finite), got {tuple(value)!r}")
    return Box(low, high)
