"""Lipschitz-constrained layers: orthonormal linear maps with the gradient-norm-preserving GroupSort activation
(Anil, Lucas & Grosse 2019), scaled to a chosen constant.

An ``nn.Linear`` made by :func:`orthonormal_linear` has orthonormal rows or columns, so ``||W||_2 = 1``; ``GroupSort``
sorts each group of ``group`` consecutive features, a permutation on every linear piece, so it is 1-Lipschitz in l2. A
network ``Scale(L) o W_k o GroupSort o ... o W_1`` is therefore L-Lipschitz, and ``vaefast.certify`` reads its
constant exactly (``||W||_2 = 1`` up to rounding).

**How the weight stays orthonormal, cheaply.** ``layer.weight`` is a ``torch.nn.utils.parametrize`` parametrization
(:class:`Orthonormal`) of the stored matrix ``V`` (``layer.parametrizations.weight.original``): ``W = V`` when ``V`` is
orthonormal to rounding (``max |V V^T - I| <= 64 eps`` on the smaller side), else ``W = Q``, the orthonormal factor of
``V``'s QR decomposition with the signs that make ``diag(R) > 0`` (differentiable, and ``Q = V`` for an orthonormal
``V``). Whether ``V`` is orthonormal is checked once per change of ``V`` (the tensor, its version counter, dtype and
device), not per forward. Training (:func:`vaefast.train`) calls :func:`retract_` after every optimiser step, which
replaces ``V`` by its ``Q`` once: the forward pass is then ``W = V`` at no cost and the step is a projected one (the
optimiser's update of ``V``, then the QR retraction back to the orthonormal matrices), where PyTorch's ``orthogonal``
parametrization differentiated a Householder product or a matrix exponential on every forward (an MNIST-sized VAE
with a 2-Lipschitz encoder: 64x the ordinary model's epoch time, 2.2x with the retraction;
benchmarks/bench_training.py). Model files of that parametrization load through :func:`upgrade_state_dict`.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

__all__ = [
    "GroupSort",
    "Orthonormal",
    "Scale",
    "is_orthonormal",
    "orthonormal_layers",
    "orthonormal_linear",
    "orthonormalize",
    "retract_",
    "upgrade_state_dict",
]

ROUNDING = 64  # a matrix is orthonormal "to rounding" when max |V V^T - I| <= ROUNDING * eps of its dtype


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


def orthonormalize(v: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor of ``v``: ``Q`` of the QR decomposition of ``v`` (of ``v^T`` when ``v`` is wide), with the
    column signs that make ``diag(R) >= 0``, so that an orthonormal ``v`` maps to itself (to rounding).

    Args:
        v: a matrix ``[m, n]`` of full rank ``min(m, n)`` (differentiable through torch's QR).

    Returns:
        ``[m, n]`` with orthonormal columns (``m >= n``) or rows (``m < n``).
    """
    wide = v.shape[-2] < v.shape[-1]
    q, r = torch.linalg.qr(v.mT if wide else v)
    signs = torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype).unsqueeze(-2)
    q = q * signs if q.requires_grad else q.mul_(signs)  # in place where autograd allows: a third faster at 784x512
    return q.mT if wide else q


@torch.no_grad()
def is_orthonormal(v: torch.Tensor) -> bool:
    """Whether ``v`` has orthonormal rows or columns to rounding.

    Args:
        v: a matrix ``[m, n]``.

    Returns:
        ``max |G - I| <= ROUNDING * eps`` for the Gram matrix ``G`` of the smaller side (``v v^T`` or ``v^T v``).
    """
    gram = v @ v.mT if v.shape[-2] < v.shape[-1] else v.mT @ v
    error = (gram - torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)).abs().max()
    return bool(error <= ROUNDING * torch.finfo(v.dtype).eps)


class Orthonormal(nn.Module):
    """The parametrization of :func:`orthonormal_linear`: ``W = V`` when ``V`` is orthonormal to rounding, else
    :func:`orthonormalize` ``(V)`` (module docstring). The answer of :func:`is_orthonormal` is kept for the ``V`` it
    was computed on (the same tensor, version counter, dtype and device): a changed or replaced ``V`` is checked
    again."""

    def __init__(self) -> None:
        super().__init__()
        self._orthonormal: tuple[int, int, torch.dtype, torch.device] | None = None

    @staticmethod
    def _key(v: torch.Tensor) -> tuple[int, int, torch.dtype, torch.device]:
        return id(v), v._version, v.dtype, v.device

    def mark_orthonormal(self, v: torch.Tensor) -> None:
        """Record that ``v`` (the stored matrix, as it is now) is orthonormal, so forwards use it as it is.

        Args:
            v: the parametrization's ``original``.
        """
        self._orthonormal = self._key(v)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """The orthonormal weight.

        Args:
            v: the stored matrix ``V`` ``[out, in]``.

        Returns:
            ``V`` itself when it is orthonormal to rounding, else its orthonormal factor.
        """
        if self._orthonormal != self._key(v):
            if not is_orthonormal(v):
                return orthonormalize(v)
            self.mark_orthonormal(v)
        return v

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """What to store for an assigned weight (``layer.weight = w``): its orthonormal factor.

        Args:
            w: ``[out, in]``.

        Returns:
            :func:`orthonormalize` ``(w)``.
        """
        return orthonormalize(w.detach())


def orthonormal_linear(fan_in: int, fan_out: int) -> nn.Linear:
    """``nn.Linear(fan_in, fan_out)`` whose weight is orthonormal (``||W||_2 = 1``) however it is trained.

    Args:
        fan_in, fan_out: the sizes.

    Returns:
        The parametrized layer (``layer.weight`` is the orthonormal matrix; its initial value is the orthonormal
        factor of ``nn.Linear``'s initial weight).
    """
    layer = parametrize.register_parametrization(nn.Linear(fan_in, fan_out), "weight", Orthonormal())
    layer.parametrizations.weight[0].mark_orthonormal(layer.parametrizations.weight.original)
    return layer


def orthonormal_layers(module: nn.Module) -> Iterator[tuple[Orthonormal, nn.Parameter]]:
    """The :class:`Orthonormal` parametrizations of ``module`` and its submodules, with their stored matrices.

    Args:
        module: any module.

    Yields:
        ``(parametrization, original)`` for each weight parametrized by an :class:`Orthonormal` alone.
    """
    for m in module.modules():
        if parametrize.is_parametrized(m):
            for chain in m.parametrizations.values():
                if len(chain) == 1 and isinstance(chain[0], Orthonormal):
                    yield chain[0], chain.original


@torch.no_grad()
def retract_(module: nn.Module) -> int:
    """Replace every stored matrix of ``module``'s orthonormal layers by its orthonormal factor (after an optimiser
    step: the QR retraction), so the next forwards use it as it is.

    Args:
        module: a model with :func:`orthonormal_linear` layers (others are left alone).

    Returns:
        The number of layers retracted.
    """
    count = 0
    for parametrization, v in orthonormal_layers(module):
        v.copy_(orthonormalize(v))
        parametrization.mark_orthonormal(v)
        count += 1
    return count


def upgrade_state_dict(state: MutableMapping[str, torch.Tensor]) -> MutableMapping[str, torch.Tensor]:
    """Convert the orthonormal layers of a state dict saved with PyTorch's ``orthogonal`` parametrization (vaefast
    0.2: ``<layer>.parametrizations.weight.original`` with a ``...weight.0.base`` buffer) to this module's format (the
    orthonormal matrix as ``original``); other entries are left as they are.

    Args:
        state: the state dict (changed in place).

    Returns:
        ``state``.
    """
    for base_key in [k for k in state if k.endswith(".parametrizations.weight.0.base")]:
        prefix = base_key[: -len("0.base")]
        original = state[prefix + "original"]
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # the layer's initialisation draws numbers
            linear = nn.Linear(original.shape[1], original.shape[0], bias=False, dtype=original.dtype)
            old = parametrizations.orthogonal(linear.to(original.device))
            old.parametrizations.weight.original.copy_(original)
            old.parametrizations.weight[0].base.copy_(state.pop(base_key))
            state[prefix + "original"] = old.weight.detach().clone()
    return state
