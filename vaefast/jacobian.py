"""Encoder Jacobians ``J_mu(x) = d mu / d x`` per point: Frobenius norm (exact or Hutchinson), spectral norm, J itself.

Three ways to ``||J||_F``:

- fused: the compiled op :func:`vaefast.ops.mlp_jacobian_frobenius` when ``fn`` is an ``nn.Sequential`` MLP
  ((optional ``nn.Flatten``,) ``nn.Linear``, activation, ..., ``nn.Linear`` with one supported activation type);
- exact: batched vector-Jacobian products with ``torch.func`` (``vmap`` over the ``d`` unit cotangents), any ``fn``;
- Hutchinson: ``||J||_F^2 = E_v ||v^T J||^2`` for probes with ``E[v v^T] = I`` (Rademacher or Gaussian), one VJP per
  probe; unbiased for ``||J||_F^2`` and reported with its standard error.

An ``nn.Module`` ``fn`` runs in eval mode (dropout off, BatchNorm on its running statistics; every submodule's own
training flag is restored afterwards), so a mean encoder left in training mode gives the trained model's Jacobian; a
plain function must treat points independently itself. Results carry no autograd graph and the parameters'
``requires_grad`` flags are left alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from vaefast import reference
from vaefast._checks import check_positive_int, check_seed, check_tensor, eval_mode
from vaefast.ops import mlp_jacobian_frobenius

__all__ = ["MLPSpec", "encoder_jacobian", "jacobian_frobenius", "jacobian_spectral", "mlp_spec"]

METHODS = ("auto", "exact", "fused", "hutchinson")
PROBES = ("rademacher", "gaussian")
DEFAULT_NUM_PROBES = 64
# elements of Jacobian-sized work buffers per chunk (about 128 MB in float64)
_CHUNK_ELEMENTS = 1 << 24


# --- recognising an MLP ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MLPSpec:
    """An ``nn.Sequential`` MLP read as the fused op's arguments."""

    flatten: bool
    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    activation: str
    activation_param: float


def _activation_of(module: nn.Module) -> tuple[str, float] | None:
    """(name, parameter) of a supported activation module, else None (exact types only: no subclasses)."""
    kind = type(module)
    if kind is nn.ReLU:
        return "relu", 0.0
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    if kind is nn.ELU:
        return "elu", float(module.alpha)
    if kind is nn.Tanh:
        return "tanh", 0.0
    if kind is nn.Sigmoid:
        return "sigmoid", 0.0
    if kind is nn.Softplus:
        return ("softplus", float(module.beta)) if float(module.threshold) == 20.0 and module.beta > 0 else None
    if kind is nn.GELU:
        return {"none": ("gelu", 0.0), "tanh": ("gelu_tanh", 0.0)}.get(module.approximate)
    if kind is nn.SiLU:
        return "silu", 0.0
    return None


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def mlp_spec(fn: object) -> MLPSpec | None:
    """The weights/biases/activation of ``fn`` when it is an MLP the fused op handles, else ``None``.

    Accepted: ``nn.Sequential([nn.Flatten()], nn.Linear, act, nn.Linear, ..., act, nn.Linear)`` with one activation
    type and parameter throughout; ``nn.Identity`` and eval-mode ``nn.Dropout`` are skipped; no forward hooks.
    """
    if type(fn) is not nn.Sequential or _has_hooks(fn):
        return None
    layers = [m for m in fn if not (type(m) is nn.Identity or (isinstance(m, nn.Dropout) and not m.training))]
    if any(_has_hooks(m) for m in layers):
        return None
    flatten = False
    if layers and type(layers[0]) is nn.Flatten:
        if (layers[0].start_dim, layers[0].end_dim) != (1, -1):
            return None
        flatten, layers = True, layers[1:]
    if len(layers) % 2 == 0:
        return None
    linears, acts = layers[0::2], layers[1::2]
    if any(type(m) is not nn.Linear for m in linears):
        return None
    kinds = {_activation_of(m) for m in acts}
    if None in kinds or len(kinds) > 1:
        return None
    activation, param = kinds.pop() if kinds else ("relu", 0.0)
    weights = [m.weight for m in linears]
    biases = [m.bias if m.bias is not None else torch.zeros_like(m.weight[:, 0]) for m in linears]
    return MLPSpec(flatten, weights, biases, activation, param)


def _fused_input(spec: MLPSpec, x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as the fused op's [B, D] input, or None when dtype/device/shape do not fit the MLP."""
    w = spec.weights[0]
    if x.dtype != w.dtype or x.device != w.device or x.dtype not in (torch.float32, torch.float64):
        return None
    if spec.flatten:
        x = x.flatten(1) if x.dim() >= 2 else x
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        return None
    return x


# --- the general path: batched VJPs -----------------------------------------------------------------


def _output_dim(fn: Callable, x: torch.Tensor) -> int:
    with torch.no_grad():
        out = fn(x[:1])
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"fn must map x[B, ...] to a tensor mu[B, d] (pass the mean encoder), got {got} for B=1")
    return int(out.shape[1])


def _chunk(num_points: int, rows: int, cols: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return check_positive_int("chunk_size", chunk_size)
    return max(1, min(num_points, _CHUNK_ELEMENTS // max(1, rows * cols)))


def _vjp_rows(fn: Callable, xb: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
    """``[P, b, D]``: row ``p`` holds ``cotangents[p, i] @ J(x_i)`` for every point ``i`` of the chunk."""
    out, vjp_fn = torch.func.vjp(fn, xb)
    if out.shape != cotangents.shape[1:]:
        raise ValueError(f"fn returned shape {tuple(out.shape)} for a chunk of {xb.shape[0]} points")
    (rows,) = torch.vmap(vjp_fn)(cotangents.to(out.dtype))
    return rows.flatten(2)


def _jacobian_chunks(fn: Callable, x: torch.Tensor, d: int, chunk_size: int | None):
    """Yield ``(start, J[b, d, D])`` over chunks of points, by ``d`` batched VJPs with the unit cotangents."""
    num_points, dim = x.shape[0], x[0].numel()
    step = _chunk(num_points, d, dim, chunk_size)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    for start in range(0, num_points, step):
        xb = x[start : start + step]
        cot = eye.unsqueeze(1).expand(d, xb.shape[0], d)
        yield start, _vjp_rows(fn, xb, cot).transpose(0, 1)


def _check_inputs(fn: object, x: object) -> torch.Tensor:
    if not callable(fn):
        raise TypeError(f"fn must be callable (a module or function x -> mu), got {type(fn).__name__}")
    x = check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have a leading batch dimension [B, ...], got shape {tuple(x.shape)}")
    return x


# --- public API ----------------------------------------------------------------------------------

_F = TypeVar("_F", bound=Callable[..., Any])


def _in_eval_mode(func: _F) -> _F:
    """Decorator: call ``func(fn, ...)`` with ``fn`` in eval mode when it is an ``nn.Module`` (modes restored)."""

    @functools.wraps(func)
    def wrapper(fn: Callable, *args: Any, **kwargs: Any) -> Any:
        with eval_mode(fn):
            return func(fn, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@_in_eval_mode
def encoder_jacobian(fn: Callable, x: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """``J[b, i, j] = d mu_i / d x_j`` at each point -> [B, d, D] (input flattened), detached.

    MLPs recognised by :func:`mlp_spec` use the explicit chain rule; anything else ``d`` batched VJPs per chunk.
    """
    x = _check_inputs(fn, x)
    with torch.no_grad():
        spec = mlp_spec(fn)
        xf = _fused_input(spec, x) if spec is not None else None
        if xf is not None:
            ws = [w.detach() for w in spec.weights]
            bs = [b.detach() for b in spec.biases]
            return reference.mlp_jacobian(xf, ws, bs, spec.activation, spec.activation_param)
        d = _output_dim(fn, x)
        out = x.new_empty((x.shape[0], d, x[0].numel()))
        for start, jac in _jacobian_chunks(fn, x, d, chunk_size):
            out[start : start + jac.shape[0]] = jac
        return out


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (value ^ (value >> 31)) & 0x7FFFFFFFFFFFFFFF


def _probes(num_probes: int, d: int, start: int, count: int, seed: int, kind: str) -> torch.Tensor:
    """Probe vectors ``[P, count, d]`` (float64, CPU) for points ``start..start+count-1``.

    Point ``i`` draws from its own generator seeded by a hash of ``(seed, i)``: same seed, same probes, whatever
    the batch size or chunking.
    """
    out = torch.empty((count, num_probes, d), dtype=torch.float64)
    for k in range(count):
        gen = torch.Generator().manual_seed(_splitmix64(_splitmix64(seed) ^ (start + k)))
        if kind == "rademacher":
            out[k] = torch.randint(0, 2, (num_probes, d), generator=gen, dtype=torch.float64).mul_(2).sub_(1)
        else:
            out[k] = torch.randn((num_probes, d), generator=gen, dtype=torch.float64)
    return out.transpose(0, 1)


def _hutchinson(
    fn: Callable, x: torch.Tensor, num_probes: int, seed: int, probe: str, chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point the mean and standard error of ``||v^T J||^2`` over ``num_probes`` probes (float64)."""
    d = _output_dim(fn, x)
    num_points, dim = x.shape[0], x[0].numel()
    probe_block = max(1, min(num_probes, _CHUNK_ELEMENTS // max(1, dim)))
    step = _chunk(num_points, probe_block, dim, chunk_size)
    mean = torch.empty(num_points, dtype=torch.float64, device=x.device)
    stderr = torch.full((num_points,), math.nan, dtype=torch.float64, device=x.device)
    for start in range(0, num_points, step):
        xb = x[start : start + step]
        probes = _probes(num_probes, d, start, xb.shape[0], seed, probe).to(x.device)
        sq = torch.cat(
            [
                _vjp_rows(fn, xb, probes[p : p + probe_block]).double().pow(2).sum(-1)
                for p in range(0, num_probes, probe_block)
            ]
        )
        mean[start : start + xb.shape[0]] = sq.mean(0)
        if num_probes > 1:
            stderr[start : start + xb.shape[0]] = sq.std(0) / math.sqrt(num_probes)
    return mean, stderr


@_in_eval_mode
def jacobian_frobenius(
    fn: Callable,
    x: torch.Tensor,
    method: str = "auto",
    num_probes: int | None = None,
    seed: int = 0,
    return_stderr: bool = False,
    *,
    squared: bool = False,
    probe: str = "rademacher",
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``||J_mu(x)||_F`` per point -> [B] (``||J||_F^2`` with ``squared=True``), detached, in x's dtype.

    ``method``: "auto" (fused op for a recognised MLP, else "exact"), "exact" (``torch.func`` batched VJPs, any
    ``fn``), "fused" (the compiled op; error if ``fn`` is not a recognised MLP), "hutchinson"
    (``mean_p ||v_p^T J||^2`` over ``num_probes`` probes, default 64, Rademacher or Gaussian ``probe``, seeded
    per point). Hutchinson is unbiased for ``||J||_F^2``; its norm estimate is the square root of that mean.
    With ``return_stderr`` returns ``(value, stderr)``: the Hutchinson standard error (of the squared norm when
    ``squared``, else by the delta method ``se / (2 ||J||)``), zeros for the exact methods.
    """
    x = _check_inputs(fn, x)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    seed = check_seed("seed", seed)
    if num_probes is not None:
        check_positive_int("num_probes", num_probes)
        if method != "hutchinson":
            raise ValueError(f"num_probes only applies to method='hutchinson', got method={method!r}")
    with torch.no_grad():
        if method == "hutchinson":
            sq, se = _hutchinson(fn, x, num_probes or DEFAULT_NUM_PROBES, seed, probe, chunk_size)
            value = sq if squared else sq.clamp_min(0).sqrt()
            if not squared:
                se = se / (2 * value)
            value, se = value.to(x.dtype), se.to(x.dtype)
            return (value, se) if return_stderr else value
        spec = mlp_spec(fn) if method in ("auto", "fused") else None
        xf = _fused_input(spec, x) if spec is not None else None
        if xf is not None:
            norm = mlp_jacobian_frobenius(xf, spec.weights, spec.biases, spec.activation, spec.activation_param)
            value = norm.square() if squared else norm
        elif method == "fused":
            why = "not an nn.Sequential MLP of Linear and one supported activation" if spec is None else "x mismatch"
            raise ValueError(f"method='fused' needs an MLP fn matching x's dtype/device/shape ({why})")
        else:
            d = _output_dim(fn, x)
            value = x.new_empty(x.shape[0])
            for start, jac in _jacobian_chunks(fn, x, d, chunk_size):
                sq = jac.flatten(1).pow(2).sum(1)
                value[start : start + jac.shape[0]] = sq if squared else sq.sqrt()
        return (value, torch.zeros_like(value)) if return_stderr else value


@_in_eval_mode
def jacobian_spectral(
    fn: Callable, x: torch.Tensor, row_scale: torch.Tensor | None = None, chunk_size: int | None = None
) -> torch.Tensor:
    """``||diag(row_scale) J_mu(x)||_2`` per point -> [B] (the largest singular value; ``row_scale`` [B, d]).

    Computed exactly from the explicit Jacobian as ``sqrt(lambda_max(A A^T))`` with ``A = diag(s) J`` (``d x d``
    eigenproblem, ``d <= D``; else ``A^T A``). ``row_scale = 1 / sigma(x)`` gives the whitened bound's norm.
    """
    x = _check_inputs(fn, x)
    if row_scale is not None:
        row_scale = check_tensor("row_scale", row_scale, ndim=2)
        if row_scale.shape[0] != x.shape[0] or row_scale.device != x.device:
            raise ValueError(
                f"row_scale must be [B={x.shape[0]}, d] on {x.device}, got {tuple(row_scale.shape)} "
                f"on {row_scale.device}"
            )
    with torch.no_grad():
        d = _output_dim(fn, x)
        if row_scale is not None and row_scale.shape[1] != d:
            raise ValueError(f"row_scale must be [B, d={d}], got shape {tuple(row_scale.shape)}")
        step = _chunk(x.shape[0], d, x[0].numel(), chunk_size)
        out = x.new_empty(x.shape[0])
        for start in range(0, x.shape[0], step):
            jac = encoder_jacobian(fn, x[start : start + step])
            if row_scale is not None:
                jac = row_scale[start : start + step].to(jac.dtype).unsqueeze(-1) * jac
            gram = jac @ jac.transpose(1, 2) if jac.shape[1] <= jac.shape[2] else jac.transpose(1, 2) @ jac
            top = torch.linalg.eigvalsh(gram)[:, -1]
            out[start : start + jac.shape[0]] = top.clamp_min(0).sqrt()
        return out
