"""Sound upper bounds of operator norms ``||T||_2`` of linear maps, in float64.

- A matrix: its largest singular value (LAPACK, float64; absolute error about ``n u ||T||``) inflated by a relative
  ``SPECTRAL_SLACK = 1e-6``.
- Row-scaled matrices ``diag(w_b) J``: the largest eigenvalue of ``diag(w_b) J J^T diag(w_b)``, batched over ``b``.
- A linear map given only as a function: materialised on the identity basis when small, else Schur's test
  ``||T||_2 <= sqrt(||T||_1 ||T||_inf)`` on ``|T|`` (column and row sums from one application of ``|T|`` and of its
  transpose to a vector of ones).
- A convolution (any dimension, dilation, groups; stride only subsamples its output, a selection of norm <= 1): the
  zero-padded correlation is a restriction of the circular one on a grid of ``input + 2 padding`` points per
  dimension, whose norm is ``max_w ||K^(w)||_2`` over the grid's frequencies ``w`` (``K^(w)`` the DFT of the dilated
  kernel, a ``C_out/g x C_in/g`` matrix per group; Sedghi, Gupta & Long 2019). A transposed convolution is the
  adjoint of a convolution (same norm). When that costs too much: ``sum_t ||K_t||_2`` over the taps ``t`` (each tap
  is a channel mixing followed by a shift, of norm <= 1).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "SPECTRAL_SLACK",
    "conv_norm",
    "materialised",
    "row_scaled_norms",
    "schur_norm",
    "spectral_norm",
]

SPECTRAL_SLACK = 1e-6
MATERIALISE_LIMIT = 2**22  # entries of a linear map materialised for its exact norm
FFT_FLOP_LIMIT = 4e9  # work of the frequency-domain convolution bound before falling back to the tap sum

Linear = Callable[[torch.Tensor], torch.Tensor]


def spectral_norm(matrix: torch.Tensor) -> float:
    """A sound upper bound of ``||M||_2`` (float64 singular values, inflated).

    Args:
        matrix: ``[m, n]`` (any float dtype).

    Returns:
        The bound.
    """
    if matrix.numel() == 0:
        return 0.0
    m = matrix.detach().double()
    if min(m.shape) > 64 and max(m.shape) > 2 * min(m.shape):  # the smaller Gram matrix's top eigenvalue
        gram = m @ m.T if m.shape[0] < m.shape[1] else m.T @ m
        return math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0)) * (1 + SPECTRAL_SLACK)
    return float(torch.linalg.matrix_norm(m, ord=2)) * (1 + SPECTRAL_SLACK)


def row_scaled_norms(matrix: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """Per point ``b`` a sound upper bound of ``||diag(w_b) J||_2``.

    Args:
        matrix: ``J`` ``[d, n]``.
        row_scale: ``w`` ``[B, d]`` (``>= 0``).

    Returns:
        ``[B]`` float64: ``sqrt(lambda_max(diag(w) J J^T diag(w)))``, inflated.
    """
    j = matrix.double()
    gram = j @ j.T if j.shape[0] <= j.shape[1] else None
    w = row_scale.double()
    if gram is None:  # fewer columns than rows: the n x n Gram is smaller
        scaled = w[:, :, None] * j[None]
        g = scaled.transpose(1, 2) @ scaled
    else:
        g = w[:, :, None] * gram[None] * w[:, None, :]
    top = torch.linalg.eigvalsh(g)[:, -1].clamp_min(0)
    return top.sqrt() * (1 + SPECTRAL_SLACK)


def materialised(linear: Linear, in_shape: Sequence[int], dtype, device) -> torch.Tensor | None:
    """The matrix ``[numel(out), numel(in)]`` of a linear map (applied to the identity basis), or None when it would
    have more than ``MATERIALISE_LIMIT`` entries."""
    n = math.prod(in_shape)
    probe = linear(torch.zeros(1, *in_shape, dtype=dtype, device=device))
    if n * probe[0].numel() > MATERIALISE_LIMIT:
        return None
    basis = torch.eye(n, dtype=dtype, device=device).reshape(n, *in_shape)
    return linear(basis).reshape(n, -1).T


def schur_norm(abs_linear: Linear, in_shape: Sequence[int], dtype, device) -> float:
    """Schur's test on ``|T|``: ``sqrt(max row sum * max column sum)``, an upper bound of ``||T||_2``.

    Args:
        abs_linear: ``v -> |T| v`` (batched, per point shape ``in_shape``).
        in_shape: the per-point input shape.
        dtype, device: of the probe.

    Returns:
        The bound.
    """
    ones = torch.ones(1, *in_shape, dtype=dtype, device=device, requires_grad=True)
    with torch.enable_grad():
        rows = abs_linear(ones)
        (cols,) = torch.autograd.grad(rows, ones, torch.ones_like(rows))
    return math.sqrt(float(rows.detach().max()) * float(cols.max())) * (1 + SPECTRAL_SLACK)


def _tap_phases(kernel: Sequence[int], dilation: Sequence[int], grid: Sequence[int], freqs: torch.Tensor):
    taps = torch.tensor(list(itertools.product(*[range(k) for k in kernel])), dtype=torch.float64, device=freqs.device)
    scale = torch.tensor([d / n for d, n in zip(dilation, grid, strict=True)], dtype=torch.float64, device=freqs.device)
    angle = 2 * math.pi * (freqs.double() * scale) @ taps.T  # [F, T]
    return torch.polar(torch.ones_like(angle), -angle)


def conv_norm(weight: torch.Tensor, groups: int, dilation: Sequence[int], grid: Sequence[int]) -> float:
    """A sound upper bound of the norm of a (transposed) convolution (module docstring).

    Args:
        weight: ``[C_a, C_b / groups, *kernel]`` (a convolution's weight, or a transposed one's).
        groups: the groups.
        dilation: per spatial dimension.
        grid: per spatial dimension, the circular grid (input + 2 padding of the convolution, or of the adjoint one).

    Returns:
        The bound.
    """
    w = weight.detach().double()
    ca, cb, *kernel = w.shape
    blocks = w.reshape(groups, ca // groups, cb, -1)
    tap_sum = float(torch.linalg.matrix_norm(blocks.permute(0, 3, 1, 2), ord=2).sum(dim=1).max())
    n_freq = math.prod(grid)
    work = n_freq * groups * (ca // groups) * cb * (min(ca // groups, cb) + blocks.shape[-1])
    if work > FFT_FLOP_LIMIT:
        return tap_sum * (1 + SPECTRAL_SLACK)
    freqs = torch.tensor(list(itertools.product(*[range(n) for n in grid])), dtype=torch.float64, device=w.device)
    best = 0.0
    complex_blocks = blocks.to(torch.complex128)
    for start in range(0, n_freq, 256):
        phases = _tap_phases(kernel, dilation, grid, freqs[start : start + 256])
        k_hat = torch.einsum("goct,ft->fgoc", complex_blocks, phases)
        best = max(best, float(torch.linalg.matrix_norm(k_hat, ord=2).max()))
    return min(best, tap_sum) * (1 + SPECTRAL_SLACK)


def _verified_top(scale: torch.Tensor, gram: torch.Tensor, guess: torch.Tensor) -> torch.Tensor:
    """Per row ``s`` of ``scale`` a verified ``t >= lambda_max(diag(s) G diag(s))``: the first of ``guess (1 + f)``
    (f growing) for which the Cholesky factorisation of ``t I - A - c I`` succeeds in floating point,
    ``c = 2 (n + 1) u tr(t I - A)``, which proves ``t I - A`` positive definite (Rump, "Verification of positive
    definiteness", BIT 2006); the largest eigenvalue (inflated) where no factor works."""
    n = gram.shape[-1]
    out = torch.full_like(guess, math.inf)
    u = torch.finfo(gram.dtype).eps / 2
    todo = torch.arange(guess.shape[0], device=guess.device)
    trace = (scale * scale * gram.diagonal()).sum(1)
    for factor in (1.02, 1.1, 1.5):
        s, t = scale[todo], guess[todo].clamp_min(1e-300) * factor
        shifted = s[:, :, None] * gram[None] * s[:, None, :]
        shifted.neg_()
        c = 2 * (n + 1) * u * (n * t - trace[todo]).abs() + 1e-300
        shifted.diagonal(dim1=1, dim2=2).add_((t - c)[:, None])
        _, info = torch.linalg.cholesky_ex(shifted)
        ok = info == 0
        out[todo[ok]] = t[ok]
        todo = todo[~ok]
        if todo.numel() == 0:
            return out
    s = scale[todo]
    out[todo] = torch.linalg.eigvalsh(s[:, :, None] * gram[None] * s[:, None, :])[:, -1].clamp_min(0) * (
        1 + SPECTRAL_SLACK
    )
    return out


def column_scaled_norms(gram: torch.Tensor, scale: torch.Tensor, iterations: int = 32) -> torch.Tensor:
    """Per row ``b`` of ``scale`` a sound upper bound of ``||W diag(s_b)||_2`` from ``G = W^T W``.

    ``||W diag(s)||_2^2 = lambda_max(diag(s) G diag(s))``: a power iteration (one product with G per step) gives a
    guess, which the Cholesky test of :func:`_verified_top` proves (or raises) to an upper bound.

    Args:
        gram: ``G`` ``[n, n]`` float64.
        scale: ``s`` ``[B, n]`` (``>= 0``).
        iterations: of the power iteration.

    Returns:
        ``[B]`` float64.
    """
    v = scale + 1e-3 * scale.amax(1, keepdim=True)
    for _ in range(iterations):
        v = scale * ((scale * v) @ gram)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    guess = (v * scale * ((scale * v) @ gram)).sum(1)
    return (_verified_top(scale, gram, guess) * (1 + SPECTRAL_SLACK)).sqrt()
