"""Pure-PyTorch reference implementations of every compiled op: the test oracle and the readable spec."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from vaefast._chunks import points_per_batch, spans

# --- reparam_sample --------------------------------------------------------------------------------
# Mirrors csrc/common/philox.h and csrc/common/reparam_math.h operation for operation (same float32 constants,
# same order of IEEE +, -, *, /, sqrt; no libm log/sin/cos/exp), so the compiled op's bits can be checked.

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _f32(value: float) -> float:
    """``value`` rounded once to the nearest float32 (as ``static_cast<float>(double)`` does in C++)."""
    return float(np.float32(value))


_TWO_POW_M24 = 2.0**-24
_SQRT2_F = _f32(math.sqrt(2.0))
_LN2_HI_F = 0.693145751953125
_LN2_LO_F = _f32(1.4286067653301870e-06)
_HALF_PI_OVER_2P23 = _f32(1.5707963267948966 / 8388608.0)
_ATANH_C = [_f32(1.0 / k) for k in (11, 9, 7, 5, 3)]
_SIN_C = [_f32(c) for c in (1.0 / 362880.0, -1.0 / 5040.0, 1.0 / 120.0, -1.0 / 6.0)]
_COS_C = [_f32(c) for c in (-1.0 / 3628800.0, 1.0 / 40320.0, -1.0 / 720.0, 1.0 / 24.0, -0.5)]


def _mul32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of ``a * m`` for int64 ``a`` in [0, 2^32), without int64 overflow."""
    t1 = a * (m & 0xFFFF)  # < 2^48
    t2 = a * (m >> 16)  # < 2^48
    mid = t1 + ((t2 & 0xFFFF) << 16)  # a*m = mid + (t2 >> 16) 2^32
    return (t2 >> 16) + (mid >> 32), mid & _MASK32


def philox4x32_10(
    c: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], k0: int, k1: int
) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10: ten rounds of the Philox S-box with the key bumped by the Weyl constants between rounds.

    Args:
        c: the counter, four int64 tensors holding uint32 words (broadcast against each other).
        k0, k1: the key words.

    Returns:
        The four output words (int64 tensors holding uint32 values).
    """
    x0, x1, x2, x3 = c
    for r in range(10):
        if r > 0:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mul32(x0, _PHILOX_M[0])
        hi1, lo1 = _mul32(x2, _PHILOX_M[1])
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    return x0, x1, x2, x3


def _uniform_open0(x: torch.Tensor) -> torch.Tensor:
    """Top 24 bits -> float32 in (0, 1]: ((x >> 8) + 1) 2^-24 (exact)."""
    return ((x >> 8) + 1).to(torch.float32) * _TWO_POW_M24


def _log_unit(u: torch.Tensor) -> torch.Tensor:
    """ln u, u in [2^-24, 1]: exponent from the bits, ln m = 2 atanh((m-1)/(m+1)) to s^11."""
    bits = u.contiguous().view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    big = m > _SQRT2_F
    m = m * torch.where(big, 0.5, 1.0).to(torch.float32)
    e = e + big.to(torch.int32)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    p = _ATANH_C[0] * s2
    for c in _ATANH_C[1:]:
        p = (p + c) * s2
    t = s + s * p
    ef = e.to(torch.float32)
    return ef * _LN2_HI_F + (ef * _LN2_LO_F + (t + t))


def _sin_poly(t: torch.Tensor) -> torch.Tensor:
    t2 = t * t
    p = _SIN_C[0] * t2
    for c in _SIN_C[1:]:
        p = (p + c) * t2
    return t + t * p


def _cos_poly(t: torch.Tensor) -> torch.Tensor:
    t2 = t * t
    p = _COS_C[0] * t2
    for c in _COS_C[1:]:
        p = (p + c) * t2
    return 1.0 + p


def _sincos_turn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos) of 2 pi (v + 1/2) / 2^24, v = x >> 8: quadrant from the top bits, reflection past pi/4."""
    v = x >> 8
    quad = v >> 22
    rem = v & 0x3FFFFF
    flip = rem >= 0x200000
    odd = torch.where(flip, 2 * (0x400000 - rem) - 1, 2 * rem + 1)
    t = odd.to(torch.float32) * _HALF_PI_OVER_2P23
    sp, cp = _sin_poly(t), _cos_poly(t)
    s, c = torch.where(flip, cp, sp), torch.where(flip, sp, cp)
    swap = (quad & 1) == 1
    s, c = torch.where(swap, c, s), torch.where(swap, s, c)
    s = torch.where(quad >= 2, -s, s)
    c = torch.where((quad == 1) | (quad == 2), -c, c)
    return s, c


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded IEEE square root (numpy's; ``torch.sqrt`` on CPU may be off by an ulp).

    Args:
        x: a float tensor (any device).

    Returns:
        ``sqrt(x)`` on ``x``'s device.
    """
    return torch.from_numpy(np.sqrt(x.detach().cpu().numpy())).to(x.device)


def _box_muller(xu: torch.Tensor, xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = sqrt_rn(-2.0 * _log_unit(_uniform_open0(xu)))
    s, c = _sincos_turn(xa)
    return r * c, r * s


def reparam_eps(
    num_points: int,
    num_samples: int,
    latent_dim: int,
    seed: int = 0,
    offset: int = 0,
    sample_offset: int = 0,
    point_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """eps[b, s, j] ~ N(0, 1) float32, keyed by (seed; offset + id(b), sample_offset + s, j) as in the kernels.

    Philox counter (j // 4, sample_offset + s, lo32(p), hi32(p)) with ``p = offset + id(b)``, key (lo32(seed),
    hi32(seed)); its words (x0, x1) -> eps[4q], eps[4q+1] and (x2, x3) -> eps[4q+2], eps[4q+3] by Box-Muller.

    Args:
        num_points, num_samples, latent_dim: ``B``, ``S``, ``d``.
        seed: the key.
        offset: added to every point id.
        sample_offset: the index of sample 0.
        point_ids: ``id(b)``, int64 ``[B]`` (default ``b``).

    Returns:
        ``eps`` ``[B, S, d]`` float32 on CPU.
    """
    q = (latent_dim + 3) // 4
    ids = torch.arange(num_points, dtype=torch.int64) if point_ids is None else point_ids.to(torch.int64).cpu()
    point = (offset + ids).view(-1, 1, 1)
    sample = (sample_offset + torch.arange(num_samples, dtype=torch.int64)).view(1, -1, 1)
    block = torch.arange(q, dtype=torch.int64).view(1, 1, -1)
    shape = (num_points, num_samples, q)
    ctr = (block.expand(shape), sample.expand(shape), (point & _MASK32).expand(shape), (point >> 32).expand(shape))
    x0, x1, x2, x3 = philox4x32_10(ctr, seed & _MASK32, seed >> 32)
    e0, e1 = _box_muller(x0, x1)
    e2, e3 = _box_muller(x2, x3)
    eps = torch.stack((e0, e1, e2, e3), dim=-1).reshape(num_points, num_samples, 4 * q)
    return eps[..., :latent_dim]


def exp_det(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)`` from +, -, *, floor and exponent bits only, as ``rmath::exp_det`` (identical on every device).

    ``x = n ln 2 + r`` (Cody–Waite split of ln 2), ``exp(r)`` by its Taylor polynomial (degree 13 in float64, 8 in
    float32), scaled by ``2^n`` as two exact powers of two.

    Args:
        x: float32 or float64 (clamped to the range where the result is finite and normal).

    Returns:
        ``exp(x)`` in ``x``'s dtype.
    """
    if x.dtype == torch.float64:
        lo, hi, log2e, ln2_hi, ln2_lo, degree = (
            -746.0,
            710.0,
            1.4426950408889634,
            6.93147180369123816490e-01,
            (1.90821492927058770002e-10),
            13,
        )
        rnd = float
    else:
        lo, hi, log2e, ln2_hi, ln2_lo, degree = -104.0, 89.0, _f32(1.4426950408889634), _LN2_HI_F, _LN2_LO_F, 8
        rnd = _f32
    x = x.clamp(lo, hi)
    nf = torch.floor(x * log2e + 0.5)
    r = (x - nf * ln2_hi) - nf * ln2_lo
    p = torch.full_like(r, rnd(1.0 / math.factorial(degree)))
    for k in range(degree - 1, -1, -1):
        p = p * r + rnd(1.0 / math.factorial(k))
    n = nf.to(torch.int64)
    n1 = n >> 1
    return p * _pow2(n1, x.dtype) * _pow2(n - n1, x.dtype)


def _pow2(n: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2^n exactly, built from the exponent bits (n in the normal range)."""
    if dtype == torch.float64:
        return ((n + 1023) << 52).view(torch.float64)
    return ((n + 127) << 23).to(torch.int32).view(torch.float32)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reparam_forward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    num_samples: int,
    seed: int,
    offset: int,
    sample_offset: int,
    point_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    acc = _acc_dtype(mu.dtype)
    eps = reparam_eps(mu.shape[0], num_samples, mu.shape[1], seed, offset, sample_offset, point_ids).to(mu.device)
    sigma = exp_det(logvar.to(acc) * 0.5)
    z = mu.to(acc).unsqueeze(1) + sigma.unsqueeze(1) * eps.to(acc)
    return z.to(mu.dtype)


class _ReparamSample(torch.autograd.Function):
    """Autograd of z = mu + sigma eps: dmu = sum_s g, dlogvar = 1/2 sum_s g (z - mu) (= 1/2 sigma eps g)."""

    @staticmethod
    def forward(ctx, mu, logvar, num_samples, seed, offset, sample_offset, point_ids=None):  # noqa: D102
        z = _reparam_forward(mu, logvar, num_samples, seed, offset, sample_offset, point_ids)
        ctx.save_for_backward(mu, z)
        return z

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        mu, z = ctx.saved_tensors
        return reparam_backward(grad, mu, z) + (None, None, None, None, None)


def reparam_backward(grad: torch.Tensor, mu: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``z = mu + exp(logvar / 2) eps`` (``sigma eps = z - mu``, so eps is not needed).

    Args:
        grad: ``g = dL/dz`` ``[B, S, d]``.
        mu: ``[B, d]``.
        z: ``[B, S, d]``.

    Returns:
        ``(dL/dmu, dL/dlogvar) = (sum_s g, 1/2 sum_s g (z - mu))``.
    """
    return grad.sum(1), 0.5 * (grad * (z - mu.unsqueeze(1))).sum(1)


def reparam_sample(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    num_samples: int,
    seed: int = 0,
    offset: int = 0,
    sample_offset: int = 0,
    point_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``z[b, s, :] = mu[b] + exp(logvar[b] / 2) * eps[b, s, :]``, bit for bit as ``torch.ops.vaefast.reparam_sample``.

    eps from :func:`reparam_eps` (float32), the arithmetic in float32 (float64 for float64 inputs), differentiable in
    ``mu`` and ``logvar``.

    Args:
        mu, logvar: ``[B, d]``.
        num_samples: ``S``.
        seed, offset, sample_offset, point_ids: as in :func:`reparam_eps`.

    Returns:
        ``z`` ``[B, S, d]`` in ``mu``'s dtype.
    """
    return _ReparamSample.apply(mu, logvar, num_samples, seed, offset, sample_offset, point_ids)


# --- sphere_hits -----------------------------------------------------------------------------------


def sphere_distances(y: torch.Tensor, center: torch.Tensor, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """``dist[b, s] = ||y[b, s] - center[b]||_2``: the sum of squares in float64, rounded to the accumulation dtype
    (float64 for float64 y, else float32), then the correctly rounded square root in that dtype.

    Args:
        y: ``[B, S, D]``.
        center: ``[B, D]``.
        chunk_elements: numbers of ``y`` per float64 batch.

    Returns:
        ``[B, S]``.
    """
    acc = _acc_dtype(y.dtype)
    parts = []
    for b0, b1 in spans(y.shape[0], points_per_batch(max(1, y.shape[1] * y.shape[2]), 1, chunk_elements)):
        diff = y[b0:b1].to(torch.float64) - center[b0:b1].to(torch.float64).unsqueeze(1)
        parts.append(sqrt_rn((diff * diff).sum(-1).to(acc)))
    return torch.cat(parts) if parts else y.new_zeros((0, y.shape[1]), dtype=acc)


def sphere_hits(
    y: torch.Tensor, center: torch.Tensor, radii: torch.Tensor, return_distances: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``hits[b, k] = #{s : ||y[b, s] - center[b]||_2 <= radii[k]}``, the distances of :func:`sphere_distances`
    compared in float64.

    Args:
        y: ``[B, S, D]``.
        center: ``[B, D]``.
        radii: ``[K]``.
        return_distances: also return the distances.

    Returns:
        ``hits`` int64 ``[B, K]`` (and ``dist`` ``[B, S]``).
    """
    dist = sphere_distances(y, center)
    hits = (dist.to(torch.float64).unsqueeze(-1) <= radii.to(torch.float64, copy=False).to(y.device)).sum(1)
    return (hits, dist) if return_distances else hits


# --- mlp_jacobian_frobenius ------------------------------------------------------------------------


@dataclass(frozen=True)
class Activation:
    """One activation of ``csrc/common/activations.h``: its function, default parameter and ``nn.Module`` form.

    Attributes:
        fn: ``phi(h, p)`` elementwise (``p``: leaky_relu's negative slope, elu's alpha, softplus' beta with torch's
            threshold 20; ignored by the others). The reference's ``phi'`` is autograd on this very function, so it
            is independent of the kernels' closed forms.
        default_param: torch's default ``p``.
        module_type: the ``nn.Module`` class computing it.
        make: ``p -> nn.Module`` computing ``phi(., p)``.
        param_of: ``module -> p`` for an instance of ``module_type`` that computes this activation, else None
            (e.g. a softplus with another threshold, or the other GELU approximation).
    """

    fn: Callable[[torch.Tensor, float], torch.Tensor]
    default_param: float
    module_type: type[nn.Module]
    make: Callable[[float], nn.Module]
    param_of: Callable[[nn.Module], float | None]


def _no_param(module_type: type[nn.Module], fn: Callable[[torch.Tensor], torch.Tensor], **kwargs: Any) -> Activation:
    """A parameterless activation ``module_type(**kwargs)``: matches instances whose attributes equal ``kwargs``."""
    return Activation(
        fn=lambda h, p: fn(h),
        default_param=0.0,
        module_type=module_type,
        make=lambda p: module_type(**kwargs),
        param_of=lambda m: 0.0 if all(getattr(m, k) == v for k, v in kwargs.items()) else None,
    )


def _softplus_beta(module: nn.Module) -> float | None:
    """softplus' beta when the module uses torch's default threshold (the only one the kernels implement)."""
    return float(module.beta) if float(module.threshold) == 20.0 and module.beta > 0 else None


# The one table of activations (the fused Jacobian op, the reference, vaefast's networks and the MLP recogniser),
# in the order of ``vaefast::act::Kind``.
MLP_ACTIVATIONS: dict[str, Activation] = {
    "relu": _no_param(nn.ReLU, torch.relu),
    "leaky_relu": Activation(
        lambda h, p: F.leaky_relu(h, p), 0.01, nn.LeakyReLU, nn.LeakyReLU, lambda m: float(m.negative_slope)
    ),
    "elu": Activation(lambda h, p: F.elu(h, p), 1.0, nn.ELU, nn.ELU, lambda m: float(m.alpha)),
    "tanh": _no_param(nn.Tanh, torch.tanh),
    "sigmoid": _no_param(nn.Sigmoid, torch.sigmoid),
    "softplus": Activation(
        lambda h, p: F.softplus(h, beta=p, threshold=20.0), 1.0, nn.Softplus, lambda p: nn.Softplus(p), _softplus_beta
    ),
    "gelu": _no_param(nn.GELU, F.gelu, approximate="none"),
    "gelu_tanh": _no_param(nn.GELU, lambda h: F.gelu(h, approximate="tanh"), approximate="tanh"),
    "silu": _no_param(nn.SiLU, F.silu),
}


def activation_module(name: str, param: float | None = None) -> nn.Module:
    """The ``nn.Module`` computing activation ``name``.

    Args:
        name: a key of :data:`MLP_ACTIVATIONS`.
        param: its parameter ``p`` (None: torch's default).

    Returns:
        A module computing ``phi(h, p)``.

    Raises:
        ValueError: an unknown name.
    """
    if name not in MLP_ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(MLP_ACTIVATIONS)}, got {name!r}")
    act = MLP_ACTIVATIONS[name]
    return act.make(act.default_param if param is None else float(param))


def activation_of(module: nn.Module) -> tuple[str, float] | None:
    """The table entry a module computes (exact types only: a subclass may change the function).

    Args:
        module: any module.

    Returns:
        ``(name, p)`` when ``module`` is one of :data:`MLP_ACTIVATIONS`, else None.
    """
    for name, act in MLP_ACTIVATIONS.items():
        if type(module) is act.module_type:
            param = act.param_of(module)
            if param is not None:
                return name, param
    return None


def mlp_forward(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], activation: str, activation_param: float
) -> torch.Tensor:
    """The MLP ``mu = W_L phi(... phi(W_1 x + b_1) ...) + b_L``.

    Args:
        x: ``[B, D]``.
        weights, biases: ``W_l`` ``[H_l, H_{l-1}]`` and ``b_l`` ``[H_l]``.
        activation: a name of :data:`MLP_ACTIVATIONS`.
        activation_param: its parameter.

    Returns:
        ``mu`` ``[B, H_L]``.
    """
    phi = MLP_ACTIVATIONS[activation].fn
    a = x
    for layer, (w, b) in enumerate(zip(weights, biases, strict=True)):
        a = a @ w.T + b
        if layer < len(weights) - 1:
            a = phi(a, activation_param)
    return a


def mlp_jacobian(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], activation: str, activation_param: float
) -> torch.Tensor:
    """Explicit per-point Jacobian ``J[b] = W_L diag(phi'(h_{L-1}[b])) ... diag(phi'(h_1[b])) W_1`` -> [B, d, D].

    The chain rule in reverse order (``d`` rows per point, cheap when ``d`` is small): start from ``W_L`` and
    multiply by ``diag(phi'(h_l)) W_l`` layer by layer, with ``phi'`` taken elementwise by autograd on the
    activation itself.

    Args:
        x, weights, biases, activation, activation_param: as in :func:`mlp_forward`.

    Returns:
        ``J`` ``[B, H_L, D]``.
    """
    phi = MLP_ACTIVATIONS[activation].fn
    pre_activations = []
    a = x
    for w, b in zip(weights[:-1], biases[:-1], strict=True):
        h = a @ w.T + b
        pre_activations.append(h)
        a = phi(h, activation_param)
    jac = weights[-1].expand(x.shape[0], *weights[-1].shape)
    for w, h in zip(reversed(weights[:-1]), reversed(pre_activations), strict=True):
        _, vjp = torch.func.vjp(lambda t: phi(t, activation_param), h)
        (dphi,) = vjp(torch.ones_like(h))
        jac = (jac * dphi.unsqueeze(1)) @ w
    return jac


def mlp_jacobian_frobenius(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    activation: str,
    activation_param: float,
) -> torch.Tensor:
    """``||d mu / d x||_F`` per point from the explicit Jacobian of :func:`mlp_jacobian`.

    Args:
        x, weights, biases, activation, activation_param: as in :func:`mlp_forward`.

    Returns:
        ``[B]``.
    """
    return mlp_jacobian(x, weights, biases, activation, activation_param).flatten(1).norm(dim=1)
