"""Encoder Jacobians ``J_mu(x) = d mu / d x`` per point: Frobenius norm (exact or Hutchinson), spectral norm, J itself.

Three ways to ``||J||_F``:

- fused: the compiled op :func:`vaefast.ops.mlp_jacobian_frobenius` when ``fn`` is an ``nn.Sequential`` MLP
  ((optional ``nn.Flatten``,) ``nn.Linear``, activation, ..., ``nn.Linear`` with one supported activation type);
- exact: batched vector-Jacobian products with ``torch.func`` (``vmap`` over the ``d`` unit cotangents), any ``fn``;
- Hutchinson: ``||J||_F^2 = E_v ||v^T J||^2`` for probes with ``E[v v^T] = I`` (Rademacher or Gaussian), one VJP per
  probe; unbiased for ``||J||_F^2`` and reported with its standard error. The probes come from
  :func:`vaefast.rng.normals` (stream ``"hutchinson"``) keyed by the global point id ``point_offset + b``, so a
  point's estimate does not depend on the batch or chunk it is in.

An ``nn.Module`` ``fn`` runs in eval mode (dropout off, BatchNorm on its running statistics; every submodule's own
training flag is restored afterwards), so a mean encoder left in training mode gives the trained model's Jacobian; a
plain function must treat points independently itself. Results carry no autograd graph and the parameters'
``requires_grad`` flags are left alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vaefast import reference, rng
from vaefast._checks import check_positive_int, check_seed, check_tensor, eval_mode
from vaefast.ops import mlp_jacobian_frobenius
from vaefast.reference import activation_of

__all__ = ["MLPSpec", "encoder_jacobian", "jacobian_frobenius", "jacobian_spectral", "mlp_spec"]

METHODS = ("auto", "exact", "fused", "hutchinson")
PROBES = ("rademacher", "gaussian")
DEFAULT_NUM_PROBES = 64
# elements of Jacobian-sized work buffers per chunk (about 128 MB in float64)
_CHUNK_ELEMENTS = 1 << 24


# --- recognising an MLP ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MLPSpec:
    """An ``nn.Sequential`` MLP ``W_L phi(... phi(W_1 x + b_1) ...) + b_L`` read as the fused op's arguments.

    Attributes:
        flatten: the MLP starts with ``nn.Flatten()`` (inputs ``[B, ...]`` are flattened to ``[B, D]``).
        weights: ``W_1 ... W_L`` (the modules' parameters, not copies).
        biases: ``b_1 ... b_L`` (zeros where a layer has none).
        activation: the name of ``phi`` (one type throughout).
        activation_param: its parameter (negative slope, alpha, beta; 0 where it has none).
    """

    flatten: bool
    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    activation: str
    activation_param: float


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def mlp_spec(fn: object) -> MLPSpec | None:
    """Read ``fn`` as an MLP the fused Jacobian op handles.

    Accepted: ``nn.Sequential([nn.Flatten()], nn.Linear, act, nn.Linear, ..., act, nn.Linear)`` with one activation
    type and parameter throughout; ``nn.Identity`` and eval-mode ``nn.Dropout`` are skipped; no forward hooks.

    Args:
        fn: any object.

    Returns:
        Its :class:`MLPSpec`, or None when ``fn`` is not such an MLP.
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
    kinds = {activation_of(m) for m in acts}
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


def _check_fn_inputs(fn: object, x: object) -> torch.Tensor:
    """A callable ``fn`` and a finite float batch ``x[B, ...]`` (a plain function has no model protocol to check)."""
    if not callable(fn):
        raise TypeError(f"fn must be callable (a module or function x -> mu), got {type(fn).__name__}")
    x = check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have a leading batch dimension [B, ...], got shape {tuple(x.shape)}")
    return x


def _probes(num_probes: int, d: int, point_ids: torch.Tensor, seed: int, kind: str, device) -> torch.Tensor:
    """Probe vectors ``v[p, b, :]``, ``[P, B, d]`` float64, keyed by (seed, global point id, probe index).

    With ``g = rng.normals(point_ids, P, d, seed, "hutchinson")``: Gaussian probes ``v = g``, Rademacher probes
    ``v = sign(g)`` (+1 where ``g >= 0``); both have ``E[v v^T] = I``. A point's probes depend only on its id, never
    on the batch size or chunking.
    """
    g = rng.normals(point_ids, num_probes, d, seed, "hutchinson", dtype=torch.float64, device=device)
    if kind == "rademacher":
        g = torch.where(g >= 0, 1.0, -1.0).to(torch.float64)
    return g.transpose(0, 1)


def _hutchinson(
    fn: Callable,
    x: torch.Tensor,
    num_probes: int,
    seed: int,
    probe: str,
    chunk_size: int | None,
    point_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point the mean and standard error of ``||v^T J||^2`` over ``num_probes`` probes (float64); point ``b``
    draws its probes with id ``point_offset + b``."""
    d = _output_dim(fn, x)
    num_points, dim = x.shape[0], x[0].numel()
    probe_block = max(1, min(num_probes, _CHUNK_ELEMENTS // max(1, dim)))
    step = _chunk(num_points, probe_block, dim, chunk_size)
    mean = torch.empty(num_points, dtype=torch.float64, device=x.device)
    stderr = torch.full((num_points,), math.nan, dtype=torch.float64, device=x.device)
    for start in range(0, num_points, step):
        xb = x[start : start + step]
        ids = torch.arange(point_offset + start, point_offset + start + xb.shape[0])
        probes = _probes(num_probes, d, ids, seed, probe, x.device)
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


# --- public API ----------------------------------------------------------------------------------


def encoder_jacobian(fn: Callable, x: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """The encoder Jacobian at each point.

    MLPs recognised by :func:`mlp_spec` use the explicit chain rule; anything else ``d`` batched VJPs per chunk.
    An ``nn.Module`` ``fn`` runs in eval mode (modes restored afterwards).

    Args:
        fn: the mean encoder ``x -> mu(x)`` (``[B, ...] -> [B, d]``).
        x: points ``[B, ...]``.
        chunk_size: points per chunk of VJPs (default: about 128 MB of work buffers).

    Returns:
        ``J[b, i, j] = d mu_i / d x_j`` at ``x_b``, ``[B, d, D]`` (input flattened), detached.
    """
    x = _check_fn_inputs(fn, x)
    with torch.no_grad(), eval_mode(fn):
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


def _frobenius_exact(fn: Callable, x: torch.Tensor, method: str, squared: bool, chunk_size: int | None) -> torch.Tensor:
    """``||J||_F`` (or its square) per point by the fused op (a recognised MLP, methods "auto"/"fused") or by
    batched VJPs."""
    spec = mlp_spec(fn) if method in ("auto", "fused") else None
    xf = _fused_input(spec, x) if spec is not None else None
    if xf is not None:
        norm = mlp_jacobian_frobenius(xf, spec.weights, spec.biases, spec.activation, spec.activation_param)
        return norm.square() if squared else norm
    if method == "fused":
        why = "not an nn.Sequential MLP of Linear and one supported activation" if spec is None else "x mismatch"
        raise ValueError(f"method='fused' needs an MLP fn matching x's dtype/device/shape ({why})")
    d = _output_dim(fn, x)
    value = x.new_empty(x.shape[0])
    for start, jac in _jacobian_chunks(fn, x, d, chunk_size):
        sq = jac.flatten(1).pow(2).sum(1)
        value[start : start + jac.shape[0]] = sq if squared else sq.sqrt()
    return value


def _check_frobenius_args(method: str, probe: str, num_probes: int | None, seed: int, point_offset: int) -> None:
    """Validate the options of :func:`jacobian_frobenius` (errors name the argument)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    check_seed("seed", seed)
    check_seed("point_offset", point_offset)
    if num_probes is not None:
        check_positive_int("num_probes", num_probes)
        if method != "hutchinson":
            raise ValueError(f"num_probes only applies to method='hutchinson', got method={method!r}")


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
    point_offset: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Frobenius norm ``||J_mu(x)||_F = sqrt(sum_ij (d mu_i / d x_j)^2)`` per point.

    An ``nn.Module`` ``fn`` runs in eval mode (modes restored afterwards).

    Args:
        fn: the mean encoder ``x -> mu(x)``.
        x: points ``[B, ...]``.
        method: "auto" (fused op for a recognised MLP, else "exact"), "exact" (``torch.func`` batched VJPs, any
            ``fn``), "fused" (the compiled op; error if ``fn`` is not a recognised MLP), "hutchinson"
            (``||J||_F^2 ~ mean_p ||v_p^T J||^2`` over probes with ``E[v v^T] = I``: unbiased for ``||J||_F^2``;
            the norm estimate is the square root of that mean).
        num_probes: Hutchinson probes per point (default 64).
        seed: keys the Hutchinson probes (stream ``"hutchinson"`` of :func:`vaefast.rng.normals`).
        return_stderr: also return the standard error.
        squared: return ``||J||_F^2`` instead of the norm.
        probe: "rademacher" (``sign(g)``) or "gaussian" (``g``), ``g ~ N(0, I_d)``.
        chunk_size: points per chunk of VJPs.
        point_offset: point ``b`` draws its probes with the global id ``point_offset + b``, so a point's estimate
            does not depend on the batch it is in (ignored by the exact methods).

    Returns:
        ``[B]`` in x's dtype, detached; with ``return_stderr`` ``(value, stderr)``: the Hutchinson standard error
        ``std_p / sqrt(P)`` of the squared norm (when ``squared``; else ``se / (2 ||J||)`` by the delta method),
        zeros for the exact methods.
    """
    x = _check_fn_inputs(fn, x)
    _check_frobenius_args(method, probe, num_probes, seed, point_offset)
    with torch.no_grad(), eval_mode(fn):
        if method != "hutchinson":
            value = _frobenius_exact(fn, x, method, squared, chunk_size)
            return (value, torch.zeros_like(value)) if return_stderr else value
        sq, se = _hutchinson(fn, x, num_probes or DEFAULT_NUM_PROBES, seed, probe, chunk_size, point_offset)
        value = sq if squared else sq.clamp_min(0).sqrt()
        if not squared:
            se = se / (2 * value)
        value, se = value.to(x.dtype), se.to(x.dtype)
        return (value, se) if return_stderr else value


def _check_row_scale(row_scale: object, x: torch.Tensor) -> torch.Tensor | None:
    """``row_scale`` as a finite float ``[B, d]`` tensor on x's device, or None."""
    if row_scale is None:
        return None
    row_scale = check_tensor("row_scale", row_scale, ndim=2)
    if row_scale.shape[0] != x.shape[0] or row_scale.device != x.device:
        raise ValueError(
            f"row_scale must be [B={x.shape[0]}, d] on {x.device}, got {tuple(row_scale.shape)} on {row_scale.device}"
        )
    return row_scale


def jacobian_spectral(
    fn: Callable, x: torch.Tensor, row_scale: torch.Tensor | None = None, chunk_size: int | None = None
) -> torch.Tensor:
    """The spectral norm ``||diag(s) J_mu(x)||_2`` (largest singular value) per point.

    Computed exactly from the explicit Jacobian as ``sqrt(lambda_max(A A^T))`` with ``A = diag(s) J`` (``d x d``
    eigenproblem when ``d <= D``, else ``A^T A``). An ``nn.Module`` ``fn`` runs in eval mode.

    Args:
        fn: the mean encoder ``x -> mu(x)``.
        x: points ``[B, ...]``.
        row_scale: ``s``, ``[B, d]`` (None: ``s = 1``); ``s = 1 / sigma(x)`` gives the whitened bound's norm.
        chunk_size: points per chunk.

    Returns:
        ``[B]`` in x's dtype, detached.
    """
    x = _check_fn_inputs(fn, x)
    row_scale = _check_row_scale(row_scale, x)
    with torch.no_grad(), eval_mode(fn):
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
