"""``DataSplit``: one split of a dataset as tensors (images in [0, 1], labels, generative factors)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vaefast import rng
from vaefast._checks import check_probability
from vaefast.core.box import UNIT_BOX, Box


@dataclass
class DataSplit:
    """One split of a dataset as tensors.

    Attributes:
        x: float32 ``[N, C, H, W]`` in [0, 1].
        y: int64 labels ``[N]`` or None.
        factors: float32 generative factors ``[N, F]`` or None.
        name: the dataset's name (``"<name>:heldout"`` for a held-out part).
        factor_names: the names of the ``F`` factors, or None.
        box: the data range of every pixel (``UNIT_BOX``: every loader scales to [0, 1]); it travels with the points
            into the attacks, the margin search and the sweep.
    """

    x: torch.Tensor
    y: torch.Tensor | None
    factors: torch.Tensor | None
    name: str
    factor_names: tuple[str, ...] | None = field(default=None)
    box: Box = UNIT_BOX

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or self.x.dim() != 4 or self.x.dtype != torch.float32:
            raise ValueError(f"x must be a float32 tensor [N, C, H, W], got {_desc(self.x)}")
        n = self.x.shape[0]
        for name in ("y", "factors"):
            t = getattr(self, name)
            if t is not None and (not isinstance(t, torch.Tensor) or t.shape[0] != n):
                raise ValueError(f"{name} must be a tensor with {n} rows (one per image), got {_desc(t)}")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one point.

        Returns:
            ``(C, H, W)``.
        """
        return tuple(self.x.shape[1:])

    def subset(self, index: torch.Tensor, name: str | None = None) -> DataSplit:
        """The rows ``index`` of every tensor.

        Args:
            index: a long tensor of rows or a boolean mask.
            name: the subset's name (default: this split's).

        Returns:
            A new :class:`DataSplit`.
        """
        return DataSplit(
            self.x[index],
            None if self.y is None else self.y[index],
            None if self.factors is None else self.factors[index],
            self.name if name is None else name,
            self.factor_names,
            self.box,
        )

    def split(self, fraction: float, seed: int = 0) -> tuple[DataSplit, DataSplit]:
        """A deterministic random split into the rest and ``k = clamp(round(fraction * N), 1, N - 1)`` held-out points.

        Args:
            fraction: the held-out fraction, in (0, 1).
            seed: the permutation comes from a generator seeded with ``rng.derive_seed(seed, "data", "split")``.

        Returns:
            ``(rest, held_out)``, each in the original row order.
        """
        check_probability("fraction", fraction)
        n = len(self)
        k = max(1, min(n - 1, round(fraction * n)))
        gen = rng.generator(seed, "data", "split")
        perm = torch.randperm(n, generator=gen)
        return self.subset(perm[k:].sort().values), self.subset(perm[:k].sort().values, f"{self.name}:heldout")


def default_root(name: str) -> Path:
    """The default folder of a file-based dataset.

    Args:
        name: the dataset's name.

    Returns:
        ``$VAEFAST_DATA/<name>``, or ``~/.cache/vaefast/data/<name>`` when the variable is unset.
    """
    base = os.environ.get("VAEFAST_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "vaefast", "data")
    return Path(base) / name


def _desc(t: object) -> str:
    return f"shape {tuple(t.shape)} dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
