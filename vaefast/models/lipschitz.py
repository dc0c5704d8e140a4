"""Lipschitz-constrained layers: orthonormal linear maps (PyTorch's ``orthogonal`` parametrization) with the
gradient-norm-preserving GroupSort activation (Anil, Lucas & Grosse 2019), scaled to a chosen constant.

An ``nn.Linear`` under ``torch.nn.utils.parametrizations.orthogonal`` has orthonormal rows or columns, so
``||W||_2 = 1``; ``GroupSort`` sorts each group of ``group`` consecutive features, a permutation on every linear
piece, so it is 1-Lipschitz in l2. A network ``Scale(L) o W_k o GroupSort o ... o W_1`` is therefore L-Lipschitz,
and ``vaefast.certify`` reads its constant exactly (``||W||_2 = 1`` up to rounding).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations

__all__ = ["GroupSort", "Scale", "orthonormal_linear"]


class GroupSort(nn.Module):
    """Sort every group of ``group`` consecutive features in ascending order (1-Lipschitz, gradient-norm preserving).

    Args:
        group: the group size (2: "MaxMin"); the feature count must be a multiple of it.
    """

    def __init__(self, group: int = 2) -> None:
        super().__init__()
        if isinstance(group, bool) or not isinstance(group, int) or group < 2:
            raise ValueError(f"group must be an int >= 2, got {group!r}")
        self.group = group

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Sorted groups.

        Args:
            h: ``[N, F]`` with ``F % group == 0``.

        Returns:
            ``[N, F]``.
        """
        n, f = h.shape
        if f % self.group:
            raise ValueError(f"GroupSort: {f} features are not a multiple of the group size {self.group}")
        return h.reshape(n, f // self.group, self.group).sort(dim=-1).values.reshape(n, f)

    def extra_repr(self) -> str:
        return f"group={self.group}"


class Scale(nn.Module):
    """Multiply by a fixed constant ``factor`` (the Lipschitz constant of a network of orthonormal layers).

    Args:
        factor: ``> 0``.
    """

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.register_buffer("factor", torch.tensor(float(factor)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``factor * h``.

        Args:
            h: any tensor.

        Returns:
            ``factor * h``.
        """
        return h * self.factor.to(h.dtype)

    def extra_repr(self) -> str:
        return f"factor={float(self.factor):g}"


def orthonormal_linear(fan_in: int, fan_out: int) -> nn.Linear:
    """``nn.Linear(fan_in, fan_out)`` whose weight stays orthonormal (``||W||_2 = 1``) during training.

    Args:
        fan_in, fan_out: the sizes.

    Returns:
        The parametrized layer (``layer.weight`` is the orthonormal matrix).
    """
    return parametrizations.orthogonal(nn.Linear(fan_in, fan_out))
