"""The encoding of a batch of points, computed once per analysis and shared by its stages: ``mu(x)``,
``log sigma^2(x)`` and the reference reconstruction ``g(mu(x))`` (flattened), the centre of every distance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Encoding", "encode", "posterior"]


@dataclass(frozen=True)
class Encoding:
    """``mu [B, d]``, ``logvar [B, d]`` of ``q(z | x + delta)`` and the clean reference ``center = g(mu(x)) [B, D']``.

    For a perturbed input the posterior moves while the centre stays the clean reconstruction (SPEC §1).
    """

    mu: torch.Tensor
    logvar: torch.Tensor
    center: torch.Tensor

    def take(self, rows: torch.Tensor) -> Encoding:
        """The rows ``rows`` (an index tensor on the encoding's device, repeats allowed).

        Returns:
            A new :class:`Encoding`.
        """
        return Encoding(self.mu[rows], self.logvar[rows], self.center[rows])

    def __len__(self) -> int:
        return int(self.mu.shape[0])


def posterior(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.encode(x)`` under ``no_grad``, checked to be ``(mu, logvar)`` of shape ``[B, d]``.

    Args:
        model: a protocol model.
        x: validated points ``[B, *input_shape]``.

    Returns:
        ``(mu, logvar)``, contiguous.

    Raises:
        ValueError: the encoder returned other shapes.
    """
    with torch.no_grad():
        mu, logvar = model.encode(x)
    if mu.dim() != 2 or logvar.shape != mu.shape or mu.shape[0] != x.shape[0]:
        raise ValueError(
            f"model.encode must return mu, logvar of shape [B, d], got {tuple(mu.shape)}, {tuple(logvar.shape)}"
        )
    return mu.contiguous(), logvar.contiguous()


def encode(
    model: Any, x: torch.Tensor, delta: torch.Tensor | None = None, center: torch.Tensor | None = None
) -> Encoding:
    """The encoding of ``x`` (or of ``x + delta`` with the clean centre).

    Args:
        model: a protocol model.
        x: validated clean points ``[B, *input_shape]``.
        delta: a validated perturbation of ``x``'s shape, or None.
        center: the clean reference ``g(mu(x))`` if already known (saves a decode).

    Returns:
        The :class:`Encoding` of ``q(z | x + delta)`` around ``g(mu(x))``.
    """
    mu, logvar = posterior(model, x)
    if center is None:
        with torch.no_grad():
            center = model.decode(mu)
        if tuple(center.shape) != tuple(x.shape):
            raise ValueError(
                f"model.decode must return the input's shape [N, {', '.join(map(str, x.shape[1:]))}], got "
                f"{tuple(center.shape)} for {x.shape[0]} latent codes"
            )
        center = center.reshape(x.shape[0], -1)
    if delta is not None:
        mu, logvar = posterior(model, x + delta)
    return Encoding(mu, logvar, center.contiguous())
