"""Digests that bind a result to what produced it: the model's weights, the points, a perturbation.

A reused result (an :class:`~vaefast.robustness.RRobustnessResult` handed to ``margin_bound``, ``numerical_margin``
or ``certify``) must have been computed for the same model, points and perturbation; comparing digests catches a
mix-up. The digest is computed where the tensors live (one small device-to-host copy per call): per tensor its
shape, dtype and three float64 reductions ``sum v``, ``sum v w`` and ``sum v^2`` with fixed weights
``w_i = frac(i phi) + 1/2`` (``phi`` the golden ratio), so a changed entry, a permutation or a scaling changes it.
It detects accidents, not adversaries (the sweep's ``weights_sha256`` is the exact identity of stored models).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

__all__ = ["model_digest", "tensor_digest"]

_PHI = 0.6180339887498949


def _reductions(t: torch.Tensor) -> torch.Tensor:
    """``[sum v, sum v w, sum v^2]`` of a tensor's entries in float64, on its device."""
    v = t.detach().reshape(-1).to(torch.float64)
    w = torch.arange(v.numel(), dtype=torch.float64, device=v.device).mul_(_PHI).remainder_(1.0).add_(0.5)
    return torch.stack([v.sum(), (v * w).sum(), (v * v).sum()])


def tensor_digest(tensors: Iterable[torch.Tensor | None]) -> str:
    """A 16-hex-digit digest of tensors' shapes, dtypes and values (module docstring).

    Args:
        tensors: the tensors in order; ``None`` entries count as absent (a digest of ``[x, None]`` differs from one
            of ``[x, delta]``).

    Returns:
        The first 16 hex digits of a SHA-256 over the shapes, dtypes and reductions.
    """
    h = hashlib.sha256()
    sums: list[torch.Tensor] = []
    for t in tensors:
        if t is None:
            h.update(b"none;")
            continue
        h.update(f"{tuple(t.shape)}|{t.dtype};".encode())
        if t.numel():
            sums.append(_reductions(t))
    if sums:
        device = sums[0].device
        stacked = torch.cat([s.to(device) for s in sums])  # one device-to-host copy, not one per tensor
        h.update(stacked.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_digest(model: torch.nn.Module) -> str:
    """:func:`tensor_digest` of a model's state (parameters and buffers, in ``state_dict`` order).

    Args:
        model: an ``nn.Module`` (any other object digests as its type name).

    Returns:
        The digest.
    """
    if not isinstance(model, torch.nn.Module):
        return hashlib.sha256(type(model).__qualname__.encode()).hexdigest()[:16]
    return tensor_digest(v for v in model.state_dict().values() if isinstance(v, torch.Tensor))
