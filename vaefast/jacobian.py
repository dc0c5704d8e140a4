"""Encoder Jacobians ``J_mu(x) = d mu / d x`` per point: Frobenius and spectral norms (exact or randomized with
stated confidence limits), and J itself.

Exact ways to the norms:

- fused: the compiled op :func:`vaefast.ops.mlp_jacobian_frobenius` gives ``||J||_F`` when ``fn`` is an
  ``nn.Sequential`` MLP ((optional ``nn.Flatten``,) ``nn.Linear``, activation, ..., ``nn.Linear`` with one supported
  activation type); its explicit J (chain rule) gives the spectral norms;
- exact: the explicit J from vector-Jacobian products with the ``d`` unit cotangents, any ``fn``; every norm of a
  point comes from one J.

Randomized (:func:`jacobian_norms` with ``method="randomized"``, chosen by ``"auto"`` when ``d`` exceeds
:data:`AUTO_EXACT_MAX_DIM`), from vector-Jacobian products (``J^T c``, backward passes) and Jacobian-vector products
(``J u``: double backward through the recorded backward pass, else forward mode; every ``J u`` is checked by the
adjoint identity ``<J u, c> = ||J^T c||^2``) only; the limits are :mod:`vaefast.matrix_bounds`:

- spectral norms: ``k`` Lanczos steps on ``A = J J^T`` (and on ``A_s = diag(s) J J^T diag(s)`` for the whitened norm)
  from a random start; the largest Ritz value ``theta`` is a sure lower bound of ``||J||_2^2`` and ``theta / (1 -
  eps)`` an upper confidence limit (Kuczyński–Woźniakowski);
- Frobenius norm: ``||J||_F^2 = tr(A) = tr(Q^T A Q) + tr(P A P)`` with ``Q`` the Lanczos basis (its part is exact,
  ``sum_j ||J^T q_j||^2``) and ``P = I - Q Q^T``; the residual by Gaussian probes ``||J^T P v||^2`` (Hutchinson,
  deflated as in Hutch++), with Chernoff confidence limits whose worst-case spectrum is capped by the Lanczos upper
  limit of ``lambda_max(A)``.

Probes and Lanczos starts come from :func:`vaefast.rng.normals` (streams ``"hutchinson"`` and ``"lanczos"``) keyed by
the global point id ``point_offset + b``, so a point's numbers do not depend on the batch or chunk it is in. VJPs run
as batches of replicated rows and every batch size comes from the memory budget ``max_memory``
(:mod:`vaefast._memory`).

An ``nn.Module`` ``fn`` runs in eval mode (dropout off, BatchNorm on its running statistics; every submodule's own
training flag is restored afterwards), so a mean encoder left in training mode gives the trained model's Jacobian; a
plain function must treat points independently itself. Results carry no autograd graph and the parameters'
``requires_grad`` flags are left alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vaefast import reference, rng
from vaefast._checks import check_positive_int, check_probability, check_seed, check_tensor, eval_mode
from vaefast._chunks import spans
from vaefast._memory import activation_bytes, check_max_memory, rows_that_fit
from vaefast._results import ResultMixin
from vaefast.matrix_bounds import lanczos_upper, trace_limits
from vaefast.ops import mlp_jacobian_frobenius
from vaefast.reference import activation_of

__all__ = [
    "AUTO_EXACT_MAX_DIM",
    "JacobianNorms",
    "check_jacobian_memory",
    "MLPSpec",
    "encoder_jacobian",
    "jacobian_frobenius",
    "jacobian_norms",
    "jacobian_spectral",
    "mlp_spec",
]

METHODS = ("auto", "exact", "fused", "hutchinson")
NORM_METHODS = ("auto", "exact", "randomized")
PROBES = ("rademacher", "gaussian")
DEFAULT_NUM_PROBES = 64  # of jacobian_frobenius(method="hutchinson")
# jacobian_norms(method="randomized"): Gaussian probes of the deflated trace and Lanczos steps per point
RANDOMIZED_NUM_PROBES = 32
RANDOMIZED_LANCZOS_STEPS = 20
# "auto" is exact up to this latent size: d VJP rows cost about what the randomized path's k (VJP + JVP) pairs per
# operator and its probes cost at the defaults
AUTO_EXACT_MAX_DIM = 128


# --- recognising an MLP ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
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


# --- the general path: batched VJPs on replicated rows ----------------------------------------------


def _output_dim(fn: Callable, x: torch.Tensor) -> int:
    with torch.no_grad():
        out = fn(x[:1])
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"fn must map x[B, ...] to a tensor mu[B, d] (pass the mean encoder), got {got} for B=1")
    return int(out.shape[1])


def _points_per_chunk(num_points: int, bytes_per_point: int, budget: int, chunk_size: int | None, what: str) -> int:
    """Points per chunk: ``chunk_size`` when given, else as many as the budget holds (a point that cannot fit is a
    :class:`vaefast._memory.MemoryBudgetError`)."""
    if chunk_size is not None:
        return check_positive_int("chunk_size", chunk_size)
    return min(num_points, rows_that_fit(bytes_per_point, budget, what))


# Working set of one row, in multiples of activation_bytes (which counts module outputs only, not the intermediates
# of functional ops inside modules): measured on diffusers' AutoencoderKL (3x64x64), a VJP row peaks at about 2.5x
# and a row of the randomized path (forward graph kept, the backward recorded for double backward) at about 4x.
VJP_ROW_FACTOR = 3
RANDOMIZED_ROW_FACTOR = 5


def _vjp_row_limit(fn: Callable, x: torch.Tensor, budget: int) -> int:
    """Rows of one batched VJP call (a forward and a backward pass of that many inputs) that fit ``budget`` bytes:
    ``VJP_ROW_FACTOR * activation_bytes(fn, x[:1])`` plus the input-sized gradient per row."""
    row = VJP_ROW_FACTOR * activation_bytes(fn, x[:1]) + 2 * x[0].numel() * x.element_size()
    return rows_that_fit(row, budget, "one row of the encoder's Jacobian (a forward and a backward pass)")


def _vjp_rows(fn: Callable, xb: torch.Tensor, cotangents: torch.Tensor, max_rows: int) -> torch.Tensor:
    """``[P, b, D]``: row ``p`` holds ``cotangents[p, i] @ J(x_i)`` for every point ``i`` of the chunk.

    The ``P * b`` (probe, point) pairs run as rows of one batch, ``fn(x_i)`` replicated per probe, at most
    ``max_rows`` rows per forward and backward pass (no ``vmap``: any module that supports autograd works, and a
    convolutional encoder runs as plain batched convolutions).
    """
    num, b, d = cotangents.shape
    flat = cotangents.reshape(num * b, d)
    out = xb.new_empty((num * b, xb[0].numel()))
    for r0, r1 in spans(num * b, max_rows):
        rows = xb[torch.arange(r0, r1, device=xb.device) % b].detach().requires_grad_(True)
        with torch.enable_grad():
            y = fn(rows)
            if not isinstance(y, torch.Tensor) or y.shape != (r1 - r0, d):
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"fn returned {got} for a batch of {r1 - r0} rows, expected ({r1 - r0}, {d})")
            grad = None
            if y.requires_grad:
                (grad,) = torch.autograd.grad(y, rows, flat[r0:r1].to(y.dtype), allow_unused=True)
        out[r0:r1] = 0 if grad is None else grad.detach().flatten(1)
    return out.reshape(num, b, -1)


def _explicit_jacobians(
    fn: Callable, x: torch.Tensor, chunk_size: int | None, budget: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, J[b, d, D])`` over chunks of points: the chain rule for an MLP :func:`mlp_spec` recognises,
    else VJPs with the ``d`` unit cotangents; chunks hold as many points as ``budget`` bytes allow."""
    spec = mlp_spec(fn)
    xf = _fused_input(spec, x) if spec is not None else None
    d, dim = _output_dim(fn, x), x[0].numel()
    step = _points_per_chunk(x.shape[0], 3 * d * dim * 8, budget, chunk_size, "one point's explicit Jacobian")
    if xf is not None:
        ws, bs = [w.detach() for w in spec.weights], [b.detach() for b in spec.biases]
        for start in range(0, x.shape[0], step):
            yield (
                start,
                reference.mlp_jacobian(xf[start : start + step], ws, bs, spec.activation, spec.activation_param),
            )
        return
    max_rows = _vjp_row_limit(fn, x, budget)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], step):
        xb = x[start : start + step]
        yield start, _vjp_rows(fn, xb, eye.unsqueeze(1).expand(d, xb.shape[0], d), max_rows).transpose(0, 1)


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
    fn: Callable, x: torch.Tensor, num_probes: int, seed: int, probe: str, chunk_size: int | None,
    point_offset: int, budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per point the mean and standard error of ``||v^T J||^2`` over ``num_probes`` probes (float64); point ``b``
    draws its probes with id ``point_offset + b``."""
    d = _output_dim(fn, x)
    num_points, dim = x.shape[0], x[0].numel()
    max_rows = _vjp_row_limit(fn, x, budget)
    step = _points_per_chunk(num_points, num_probes * dim * 8, budget, chunk_size, "one point's Hutchinson probes")
    mean = torch.empty(num_points, dtype=torch.float64, device=x.device)
    stderr = torch.full((num_points,), math.nan, dtype=torch.float64, device=x.device)
    for start in range(0, num_points, step):
        xb = x[start : start + step]
        ids = torch.arange(point_offset + start, point_offset + start + xb.shape[0])
        probes = _probes(num_probes, d, ids, seed, probe, x.device)
        sq = _vjp_rows(fn, xb, probes, max_rows).double().pow(2).sum(-1)
        mean[start : start + xb.shape[0]] = sq.mean(0)
        if num_probes > 1:
            stderr[start : start + xb.shape[0]] = sq.std(0) / math.sqrt(num_probes)
    return mean, stderr


# --- public API: J, ||J||_F, ||J||_2 -----------------------------------------------------------------


def encoder_jacobian(
    fn: Callable, x: torch.Tensor, chunk_size: int | None = None, *, max_memory: int | None = None
) -> torch.Tensor:
    """The encoder Jacobian at each point.

    MLPs recognised by :func:`mlp_spec` use the explicit chain rule; anything else ``d`` VJPs per point (batches of
    replicated rows). An ``nn.Module`` ``fn`` runs in eval mode (modes restored afterwards).

    Args:
        fn: the mean encoder ``x -> mu(x)`` (``[B, ...] -> [B, d]``).
        x: points ``[B, ...]``.
        chunk_size: points per chunk (default: as many as ``max_memory`` holds).
        max_memory: the memory budget in bytes (None: :func:`vaefast._memory.default_max_memory`).

    Returns:
        ``J[b, i, j] = d mu_i / d x_j`` at ``x_b``, ``[B, d, D]`` (input flattened), detached.
    """
    x = _check_fn_inputs(fn, x)
    budget = check_max_memory(max_memory, x.device)
    with torch.no_grad(), eval_mode(fn):
        d = _output_dim(fn, x)
        out = x.new_empty((x.shape[0], d, x[0].numel()))
        for start, jac in _explicit_jacobians(fn, x, chunk_size, budget):
            out[start : start + jac.shape[0]] = jac
        return out


def _frobenius_exact(
    fn: Callable, x: torch.Tensor, method: str, squared: bool, chunk_size: int | None, budget: int
) -> torch.Tensor:
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
    value = x.new_empty(x.shape[0])
    for start, jac in _explicit_jacobians(fn, x, chunk_size, budget):
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
    max_memory: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Frobenius norm ``||J_mu(x)||_F = sqrt(sum_ij (d mu_i / d x_j)^2)`` per point.

    An ``nn.Module`` ``fn`` runs in eval mode (modes restored afterwards). For confidence limits and the spectral
    norms in one pass see :func:`jacobian_norms`.

    Args:
        fn: the mean encoder ``x -> mu(x)``.
        x: points ``[B, ...]``.
        method: "auto" (fused op for a recognised MLP, else "exact"), "exact" (VJPs with the unit cotangents, any
            ``fn``), "fused" (the compiled op; error if ``fn`` is not a recognised MLP), "hutchinson"
            (``||J||_F^2 ~ mean_p ||v_p^T J||^2`` over probes with ``E[v v^T] = I``: unbiased for ``||J||_F^2``;
            the norm estimate is the square root of that mean).
        num_probes: Hutchinson probes per point (default 64).
        seed: keys the Hutchinson probes (stream ``"hutchinson"`` of :func:`vaefast.rng.normals`).
        return_stderr: also return the standard error.
        squared: return ``||J||_F^2`` instead of the norm.
        probe: "rademacher" (``sign(g)``) or "gaussian" (``g``), ``g ~ N(0, I_d)``.
        chunk_size: points per chunk (default: as many as ``max_memory`` holds).
        point_offset: point ``b`` draws its probes with the global id ``point_offset + b``, so a point's estimate
            does not depend on the batch it is in (ignored by the exact methods).
        max_memory: the memory budget in bytes (None: :func:`vaefast._memory.default_max_memory`).

    Returns:
        ``[B]`` in x's dtype, detached; with ``return_stderr`` ``(value, stderr)``: the Hutchinson standard error
        ``std_p / sqrt(P)`` of the squared norm (when ``squared``; else ``se / (2 ||J||)`` by the delta method),
        zeros for the exact methods.
    """
    x = _check_fn_inputs(fn, x)
    _check_frobenius_args(method, probe, num_probes, seed, point_offset)
    budget = check_max_memory(max_memory, x.device)
    with torch.no_grad(), eval_mode(fn):
        if method != "hutchinson":
            value = _frobenius_exact(fn, x, method, squared, chunk_size, budget)
            return (value, torch.zeros_like(value)) if return_stderr else value
        num = num_probes or DEFAULT_NUM_PROBES
        sq, se = _hutchinson(fn, x, num, seed, probe, chunk_size, point_offset, budget)
        value = sq if squared else sq.clamp_min(0).sqrt()
        if not squared:
            se = se / (2 * value)
        value, se = value.to(x.dtype), se.to(x.dtype)
        return (value, se) if return_stderr else value


def _check_row_scale(row_scale: object, x: torch.Tensor, d: int) -> torch.Tensor | None:
    """``row_scale`` as a finite float ``[B, d]`` tensor on x's device, or None."""
    if row_scale is None:
        return None
    row_scale = check_tensor("row_scale", row_scale, ndim=2)
    if tuple(row_scale.shape) != (x.shape[0], d) or row_scale.device != x.device:
        raise ValueError(
            f"row_scale must be [B={x.shape[0]}, d={d}] on {x.device}, got {tuple(row_scale.shape)} on "
            f"{row_scale.device}"
        )
    return row_scale


def _top_singular(jac: torch.Tensor) -> torch.Tensor:
    """``||J_b||_2`` per point of ``J[b, d, D]``: ``sqrt(lambda_max)`` of the smaller Gram matrix (float64)."""
    jac = jac.double()
    gram = jac @ jac.transpose(1, 2) if jac.shape[1] <= jac.shape[2] else jac.transpose(1, 2) @ jac
    return torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt()


def jacobian_spectral(
    fn: Callable,
    x: torch.Tensor,
    row_scale: torch.Tensor | None = None,
    chunk_size: int | None = None,
    *,
    max_memory: int | None = None,
) -> torch.Tensor:
    """The spectral norm ``||diag(s) J_mu(x)||_2`` (largest singular value) per point, exactly.

    Computed from the explicit Jacobian as ``sqrt(lambda_max(A A^T))`` with ``A = diag(s) J`` (``d x d``
    eigenproblem when ``d <= D``, else ``A^T A``). An ``nn.Module`` ``fn`` runs in eval mode. For large ``d`` see
    :func:`jacobian_norms` (randomized, with an upper confidence limit).

    Args:
        fn: the mean encoder ``x -> mu(x)``.
        x: points ``[B, ...]``.
        row_scale: ``s``, ``[B, d]`` (None: ``s = 1``); ``s = 1 / sigma(x)`` gives the whitened bound's norm.
        chunk_size: points per chunk (default: as many as ``max_memory`` holds).
        max_memory: the memory budget in bytes (None: :func:`vaefast._memory.default_max_memory`).

    Returns:
        ``[B]`` in x's dtype, detached.
    """
    x = _check_fn_inputs(fn, x)
    budget = check_max_memory(max_memory, x.device)
    with torch.no_grad(), eval_mode(fn):
        row_scale = _check_row_scale(row_scale, x, _output_dim(fn, x))
        out = x.new_empty(x.shape[0])
        for start, jac in _explicit_jacobians(fn, x, chunk_size, budget):
            if row_scale is not None:
                jac = row_scale[start : start + jac.shape[0]].to(jac.dtype).unsqueeze(-1) * jac
            out[start : start + jac.shape[0]] = _top_singular(jac).to(x.dtype)
        return out


# --- the norms with their confidence limits (exact or randomized) -------------------------------------


@dataclasses.dataclass
class JacobianNorms(ResultMixin):
    """``||J||_F``, ``||J||_2`` and ``||diag(s) J||_2`` of ``B`` points, each with what is known of it.

    Exact methods give exact values and limits equal to them; the randomized method gives estimates and limits that
    hold, all of a point's at once, with probability ``>= confidence`` (over its probes and Lanczos starts).

    Attributes:
        frobenius: ``[B]`` ``||J||_F``: exact, or the square root of the unbiased (deflated Hutchinson) estimate of
            ``||J||_F^2``.
        frobenius_lower, frobenius_upper: ``[B]`` confidence limits of ``||J||_F``.
        spectral: ``[B]`` ``||J||_2``: exact, or the largest Rayleigh quotient seen (Lanczos Ritz value, probes): a
            sure lower bound.
        spectral_upper: ``[B]`` the upper limit of ``||J||_2`` (never above ``frobenius_upper``).
        whitened_spectral, whitened_spectral_upper: ``[B]`` the same for ``||diag(s) J||_2`` (NaN without ``s``).
        method: "fused" (compiled op for ``||J||_F``, chain rule for J), "exact" or "randomized".
        confidence: the probability that every limit of a point holds (1.0 for the exact methods).
        num_probes, lanczos_steps: the randomized settings (0 for the exact methods; ``lanczos_steps`` is 0 when
            ``fn`` supports neither forward-mode AD nor double backward: the spectral limits are then
            ``frobenius_upper`` and ``max(s) frobenius_upper``).
        point_index: ``[B]`` the global point ids keying the random numbers.
    """

    frobenius: torch.Tensor
    frobenius_lower: torch.Tensor
    frobenius_upper: torch.Tensor
    spectral: torch.Tensor
    spectral_upper: torch.Tensor
    whitened_spectral: torch.Tensor
    whitened_spectral_upper: torch.Tensor
    method: str
    confidence: float
    num_probes: int
    lanczos_steps: int
    point_index: torch.Tensor


def _exact_norms(fn: Callable, x: torch.Tensor, row_scale: torch.Tensor | None, step: int, budget: int) -> dict:
    """Every norm from one explicit J per point, ``step`` points at a time (``||J||_F`` by the fused op for a
    recognised MLP)."""
    spec = mlp_spec(fn)
    xf = _fused_input(spec, x) if spec is not None else None
    spectral = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    whitened = torch.full_like(spectral, math.nan)
    if xf is None:
        fro = torch.empty_like(spectral)
    else:
        fro = mlp_jacobian_frobenius(xf, spec.weights, spec.biases, spec.activation, spec.activation_param).double()
    for start, jac in _explicit_jacobians(fn, x, step, budget):
        sl, jac = slice(start, start + jac.shape[0]), jac.double()
        if xf is None:
            fro[sl] = jac.flatten(1).norm(dim=1)
        spectral[sl] = _top_singular(jac)
        if row_scale is not None:
            whitened[sl] = _top_singular(row_scale[sl].double().unsqueeze(-1) * jac)
    return {
        "frobenius": fro, "frobenius_lower": fro, "frobenius_upper": fro, "spectral": spectral,
        "spectral_upper": spectral, "whitened_spectral": whitened, "whitened_spectral_upper": whitened,
        "method": "fused" if xf is not None else "exact",
    }  # fmt: skip


class _NoForwardProducts(Exception):
    """``fn`` supports neither forward-mode AD nor double backward (no ``J u``)."""


class _Products:
    """``J^T c`` and ``J u`` at fixed rows ``xx`` of inputs, from one forward pass kept for every product.

    ``J^T c``: a backward pass. ``J u``: the backward pass ``g(v) = J^T v`` is recorded once as a graph linear in
    ``v`` and ``J u = d<g(v), u>/dv`` is one more backward pass through it (double backward; on CPU about twice as
    fast as forward mode); where an op has no double-backward rule, forward mode (``torch.func.jvp``). Vectors are
    float64 on the model's device: ``[R, d]`` on the latent side, ``[R, D]`` on the input side.
    """

    def __init__(self, fn: Callable, xx: torch.Tensor) -> None:
        self.fn, self.shape = fn, xx.shape
        self.mode: str | None = "double-backward"  # then "forward", then None (no J u)
        self.xx = xx.detach().requires_grad_(True)
        with torch.enable_grad():
            self.y = fn(self.xx)
        if not isinstance(self.y, torch.Tensor) or self.y.dim() != 2 or self.y.shape[0] != xx.shape[0]:
            raise ValueError(f"fn must map x[B, ...] to a tensor mu[B, d], got {type(self.y).__name__}")
        self.v: torch.Tensor | None = None
        self.g: torch.Tensor | None = None

    def _zeros(self, size: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(self.shape[0], size)

    def vjp(self, cot: torch.Tensor) -> torch.Tensor:
        if not self.y.requires_grad:
            return self._zeros(math.prod(self.shape[1:]), cot)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.y, self.xx, cot.to(self.y.dtype), retain_graph=True, allow_unused=True)
        return self._zeros(math.prod(self.shape[1:]), cot) if g is None else g.flatten(1).double()

    def _double_backward(self, tangent: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            if self.g is None:
                self.v = torch.zeros_like(self.y, requires_grad=True)
                (self.g,) = torch.autograd.grad(self.y, self.xx, self.v, create_graph=True, retain_graph=True)
            if not self.g.requires_grad:  # the graph of the backward pass is cut somewhere: no J u from it
                raise RuntimeError("the backward pass is not differentiable")
            (ju,) = torch.autograd.grad(self.g, self.v, tangent, retain_graph=True, allow_unused=True)
        if ju is None:
            raise RuntimeError("the backward pass does not depend on its cotangent")
        return ju

    def jvp(self, u: torch.Tensor, cot: torch.Tensor) -> torch.Tensor:
        """``J u`` for ``u = J^T cot`` (as in Lanczos), checked by the adjoint identity ``<J u, cot> = ||u||^2``.

        A mode whose products fail the identity (an op whose backward is not differentiable, or a custom function
        without a forward-mode rule, gives wrong or no ``J u``) is dropped for the next; with none left
        :class:`_NoForwardProducts`.
        """
        if not self.y.requires_grad:
            return self._zeros(self.y.shape[1], u)
        tangent = u.reshape(self.shape).to(self.xx.dtype)
        tol = max(1e-4, 50 * torch.finfo(self.xx.dtype).eps)
        while self.mode is not None:
            try:
                if self.mode == "double-backward":
                    ju = self._double_backward(tangent).double()
                else:
                    ju = torch.func.jvp(self.fn, (self.xx.detach(),), (tangent,))[1].double()
                err = ((ju * cot).sum(1) - u.pow(2).sum(1)).abs()
                if bool((err <= tol * ju.norm(dim=1) * cot.norm(dim=1) + 1e-300).all()):
                    return ju
            except (NotImplementedError, RuntimeError):
                pass
            self.mode = "forward" if self.mode == "double-backward" else None
        raise _NoForwardProducts("fn supports neither double backward nor forward-mode AD")


def _lanczos(prod: _Products, scale: torch.Tensor, start: torch.Tensor, steps: int) -> tuple[torch.Tensor, ...]:
    """Lanczos with full reorthogonalization on ``A_r = diag(scale_r) J J^T diag(scale_r)`` for every row ``r``.

    Returns:
        ``(ritz [R], diag [R], basis [R, k, d], done [R])``: the largest Ritz value ``lambda_max(Q^T A Q)``,
        ``tr(Q^T A Q) = sum_j ||J^T diag(scale) q_j||^2``, the orthonormal basis (zero columns after a breakdown)
        and the Krylov dimension reached.
    """
    rows, d = start.shape
    basis = start.new_zeros(rows, steps, d)
    images = torch.zeros_like(basis)
    diag = start.new_zeros(rows)
    done = torch.zeros(rows, dtype=torch.int64, device=start.device)
    q = start / start.norm(dim=1, keepdim=True).clamp_min(1e-300)
    for j in range(steps):
        live = q.abs().amax(dim=1) > 0
        done += live
        basis[:, j] = q
        g = prod.vjp(scale * q)
        diag += g.pow(2).sum(1)
        images[:, j] = scale * prod.jvp(g, scale * q)
        w = images[:, j]
        for _ in range(2):  # "twice is enough" (Kahan–Parlett)
            w = w - torch.einsum("rk,rkd->rd", torch.einsum("rkd,rd->rk", basis[:, : j + 1], w), basis[:, : j + 1])
        beta = w.norm(dim=1)
        ok = live & (beta > 1e-10 * images[:, j].norm(dim=1))
        if not bool(ok.any()):
            break
        q = torch.where(ok.unsqueeze(1), w / beta.clamp_min(1e-300).unsqueeze(1), torch.zeros_like(w))
    gram = basis @ images.transpose(1, 2)
    ritz = torch.linalg.eigvalsh(0.5 * (gram + gram.transpose(1, 2)))[:, -1].clamp_min(0)
    return ritz, diag, basis, done


def _residual_probes(
    prod: _Products, basis: torch.Tensor, probes: torch.Tensor, copies: int
) -> tuple[torch.Tensor, ...]:
    """``s = sum_p ||J^T P v_p||^2`` and ``max_p ||J^T P v_p||^2 / ||P v_p||^2`` per point, ``P = I - Q Q^T``.

    Args:
        prod: products at ``copies`` stacked copies of the ``b`` points (rows ``c * b + i``).
        basis: ``Q`` of the ``b`` points ``[b, k, d]``.
        probes: ``v`` ``[b, m, d]`` standard normal.
        copies: probes evaluated per VJP call and point.
    """
    b, m, _ = probes.shape
    residual = probes - torch.einsum("bmk,bkd->bmd", torch.einsum("bkd,bmd->bmk", basis, probes), basis)
    total, rayleigh = probes.new_zeros(b), probes.new_zeros(b)
    for p0, p1 in spans(m, copies):
        cot = residual[:, p0:p1].transpose(0, 1).reshape((p1 - p0) * b, -1)
        cot = torch.cat([cot, cot.new_zeros((copies - (p1 - p0)) * b, cot.shape[1])])
        sq = prod.vjp(cot).pow(2).sum(1)[: (p1 - p0) * b].reshape(p1 - p0, b)
        total += sq.sum(0)
        norms = residual[:, p0:p1].pow(2).sum(-1).transpose(0, 1).clamp_min(1e-300)
        rayleigh = torch.maximum(rayleigh, (sq / norms).amax(0))
    return total, rayleigh


@dataclasses.dataclass(frozen=True)
class _Randomized:
    """Settings of the randomized norms: probes ``m``, Lanczos steps ``k`` and the failure probability ``alpha``."""

    num_probes: int
    steps: int
    alpha: float
    seed: int


def _limits(sums: dict, whitened: bool, d: int, cfg: _Randomized, steps_run: int) -> dict:
    """The estimates and limits of every point from the Lanczos and probe sums (module docstring).

    The failure probability ``alpha`` is split equally over the events used: the Lanczos limits (one per operator)
    and the two tails of the residual trace.
    """
    events = 2 + (steps_run > 0) * (1 + whitened)
    a = cfg.alpha / events
    m, out = cfg.num_probes, {k: [] for k in ("fro", "fro_lo", "fro_hi", "spec", "spec_hi", "white", "white_hi")}
    for i in range(sums["trace"].shape[0]):
        ritz, done = float(sums["ritz"][i]), int(sums["done"][i])
        cap = lanczos_upper(ritz, d, done, a) if steps_run else math.inf
        lo, hi = trace_limits(float(sums["trace"][i]), m, a, a, cap=cap, n=max(d - done, 1))
        diag = float(sums["diag"][i])
        fro_hi = math.sqrt(diag + hi)
        out["fro"].append(math.sqrt(diag + float(sums["trace"][i]) / m))
        out["fro_lo"].append(math.sqrt(diag + lo))
        out["fro_hi"].append(fro_hi)
        out["spec"].append(math.sqrt(max(ritz, float(sums["rayleigh"][i]))))
        out["spec_hi"].append(min(math.sqrt(cap), fro_hi))
        if whitened:
            w_ritz, w_done = float(sums["w_ritz"][i]), int(sums["w_done"][i])
            w_cap = lanczos_upper(w_ritz, d, w_done, a) if steps_run else math.inf
            out["white"].append(math.sqrt(w_ritz))
            out["white_hi"].append(min(math.sqrt(w_cap), float(sums["scale_max"][i]) * out["spec_hi"][-1]))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def _randomized_sums(
    fn: Callable, xb: torch.Tensor, scale: torch.Tensor | None, ids: torch.Tensor, cfg: _Randomized
) -> dict:
    """Lanczos (plain and, with ``scale``, whitened, stacked as rows of one batch) and the residual probes of one
    chunk of points; raises :class:`_NoForwardProducts` when ``fn`` has no ``J u``."""
    b = xb.shape[0]
    copies = 2 if scale is not None else 1
    with sdpa_kernel([SDPBackend.MATH]):  # every attention op has forward-mode and double-backward rules there
        prod = _Products(fn, torch.cat([xb] * copies))
        d = prod.y.shape[1]
        starts = rng.normals(ids, 2, d, cfg.seed, "lanczos", dtype=torch.float64, device=xb.device)
        ones = torch.ones(b, d, dtype=torch.float64, device=xb.device)
        row_scale = ones if scale is None else torch.cat([ones, scale.double()])
        start = starts[:, 0] if scale is None else torch.cat([starts[:, 0], starts[:, 1]])
        if cfg.steps:
            ritz, diag, basis, done = _lanczos(prod, row_scale, start, min(cfg.steps, d))
        else:
            ritz, diag = start.new_zeros(b * copies), start.new_zeros(b * copies)
            basis, done = start.new_zeros(b * copies, 0, d), torch.zeros(b * copies, dtype=torch.int64)
        probes = rng.normals(ids, cfg.num_probes, d, cfg.seed, "hutchinson", dtype=torch.float64, device=xb.device)
        trace, rayleigh = _residual_probes(prod, basis[:b], probes, copies)
    sums = {"ritz": ritz[:b], "diag": diag[:b], "done": done[:b], "trace": trace, "rayleigh": rayleigh}
    if scale is not None:
        sums.update(w_ritz=ritz[b:], w_done=done[b:], scale_max=scale.double().amax(dim=1))
    return {k: v.cpu() for k, v in sums.items()}


def _randomized_point_bytes(fn: Callable, x: torch.Tensor, d: int, whitened: bool, cfg: _Randomized) -> int:
    """The working set of one point in the randomized path: its rows (two with the whitened operator) of
    ``RANDOMIZED_ROW_FACTOR * activation_bytes`` plus input- and latent-sized float64 vectors."""
    row = RANDOMIZED_ROW_FACTOR * activation_bytes(fn, x[:1]) + 4 * x[0].numel() * 8
    return (1 + whitened) * (row + (2 * cfg.steps + cfg.num_probes) * d * 8)


def _randomized_norms(
    fn: Callable, x: torch.Tensor, row_scale: torch.Tensor | None, cfg: _Randomized, point_offset: int, step: int
) -> dict:
    """The randomized estimates and limits of every point, ``step`` points at a time."""
    d = _output_dim(fn, x)
    chunks = []
    for start in range(0, x.shape[0], step):
        xb = x[start : start + step]
        ids = torch.arange(point_offset + start, point_offset + start + xb.shape[0])
        scale = None if row_scale is None else row_scale[start : start + step]
        try:
            chunks.append(_randomized_sums(fn, xb, scale, ids, cfg))
        except _NoForwardProducts:  # no J u: spectral limits from the Frobenius limit instead, for every chunk
            return _randomized_norms(fn, x, row_scale, dataclasses.replace(cfg, steps=0), point_offset, step)
    sums = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    lim = _limits(sums, row_scale is not None, d, cfg, cfg.steps)
    nan = torch.full_like(lim["fro"], math.nan)
    return {
        "frobenius": lim["fro"], "frobenius_lower": lim["fro_lo"], "frobenius_upper": lim["fro_hi"],
        "spectral": lim["spec"], "spectral_upper": lim["spec_hi"],
        "whitened_spectral": lim["white"] if row_scale is not None else nan,
        "whitened_spectral_upper": lim["white_hi"] if row_scale is not None else nan,
        "method": "randomized", "lanczos_steps": cfg.steps,
    }  # fmt: skip


def _norm_method(method: str, fn: Callable, x: torch.Tensor, d: int) -> str:
    """ "exact" or "randomized" for ``method`` ("auto": exact for a recognised MLP or ``d <= AUTO_EXACT_MAX_DIM``)."""
    if method not in NORM_METHODS:
        raise ValueError(f"method must be one of {NORM_METHODS}, got {method!r}")
    if method != "auto":
        return method
    spec = mlp_spec(fn)
    if (spec is not None and _fused_input(spec, x) is not None) or d <= AUTO_EXACT_MAX_DIM:
        return "exact"
    return "randomized"


def _plan(fn: Callable, x: torch.Tensor, d: int, method: str, whitened: bool, cfg: _Randomized, budget: int):
    """``("exact" | "randomized", points per chunk)``; a point that does not fit ``budget`` is a
    :class:`vaefast._memory.MemoryBudgetError` (raised before any work)."""
    kind = _norm_method(method, fn, x, d)
    if kind == "exact":
        spec = mlp_spec(fn)
        if spec is None or _fused_input(spec, x) is None:
            _vjp_row_limit(fn, x, budget)
        per_point = 3 * d * x[0].numel() * 8
        return kind, _points_per_chunk(x.shape[0], per_point, budget, None, "one point's explicit Jacobian")
    per_point = _randomized_point_bytes(fn, x, d, whitened, cfg)
    return kind, _points_per_chunk(x.shape[0], per_point, budget, None, "one point's randomized Jacobian norms")


def _settings(confidence: float, num_probes: int | None, lanczos_steps: int | None, seed: int) -> _Randomized:
    confidence = check_probability("confidence", confidence)
    probes = RANDOMIZED_NUM_PROBES if num_probes is None else check_positive_int("num_probes", num_probes)
    steps = RANDOMIZED_LANCZOS_STEPS if lanczos_steps is None else check_positive_int("lanczos_steps", lanczos_steps)
    return _Randomized(probes, steps, 1.0 - confidence, check_seed("seed", seed))


def check_jacobian_memory(
    fn: Callable, x: torch.Tensor, *, method: str = "auto", whitened: bool = True, max_memory: int | None = None
) -> str:
    """Check, before any work, that :func:`jacobian_norms` fits one point into ``max_memory`` (one forward pass of
    one row measures it).

    Args:
        fn: the mean encoder.
        x: the points.
        method: as :func:`jacobian_norms`.
        whitened: a ``row_scale`` will be given.
        max_memory: the budget in bytes (None: the device's default).

    Returns:
        The method :func:`jacobian_norms` will use ("exact" or "randomized").

    Raises:
        MemoryBudgetError: not even one point fits (a ``ValueError`` naming ``max_memory``).
    """
    x = _check_fn_inputs(fn, x)
    budget = check_max_memory(max_memory, x.device)
    with torch.no_grad(), eval_mode(fn):
        return _plan(fn, x, _output_dim(fn, x), method, whitened, _settings(0.95, None, None, 0), budget)[0]


def jacobian_norms(
    fn: Callable,
    x: torch.Tensor,
    row_scale: torch.Tensor | None = None,
    *,
    method: str = "auto",
    confidence: float = 0.95,
    num_probes: int | None = None,
    lanczos_steps: int | None = None,
    seed: int = 0,
    point_offset: int = 0,
    max_memory: int | None = None,
) -> JacobianNorms:
    """``||J_mu(x)||_F``, ``||J_mu(x)||_2`` and ``||diag(s) J_mu(x)||_2`` per point, with confidence limits.

    "exact" builds J once per point (the fused op gives ``||J||_F`` of a recognised MLP). "randomized" needs
    ``m + 2k`` VJPs and ``k`` JVPs per point and operator instead of ``d`` VJPs (module docstring): the Lanczos
    upper limit ``sqrt(theta / (1 - eps))`` of each spectral norm, and Chernoff limits of ``||J||_F^2`` around the
    unbiased deflated Hutchinson estimate ``tr(Q^T A Q) + s / m``. An ``nn.Module`` ``fn`` runs in eval mode;
    attention runs on PyTorch's math kernel in the randomized path (the one with forward-mode rules).

    Args:
        fn: the mean encoder ``x -> mu(x)``.
        x: points ``[B, ...]``.
        row_scale: ``s`` ``[B, d]`` for the whitened norm (``1 / sigma(x)``), or None.
        method: "auto" (exact for a recognised MLP or ``d <= AUTO_EXACT_MAX_DIM``, else randomized), "exact" or
            "randomized".
        confidence: the probability that all of a point's limits hold (randomized).
        num_probes: Gaussian probes of the residual trace per point (default 32).
        lanczos_steps: Lanczos steps per operator and point (default 20; ``>= d`` is exact).
        seed: keys the probes (stream ``"hutchinson"``) and the Lanczos starts (stream ``"lanczos"``).
        point_offset: point ``b`` draws its numbers with the global id ``point_offset + b``.
        max_memory: the memory budget in bytes (None: :func:`vaefast._memory.default_max_memory`); the batches of
            points and VJP rows are derived from it.

    Returns:
        A :class:`JacobianNorms` (float64 tensors on the CPU).
    """
    x = _check_fn_inputs(fn, x)
    cfg, point_offset = _settings(confidence, num_probes, lanczos_steps, seed), check_seed("point_offset", point_offset)
    budget = check_max_memory(max_memory, x.device)
    with torch.no_grad(), eval_mode(fn):
        d = _output_dim(fn, x)
        row_scale = _check_row_scale(row_scale, x, d)
        kind, step = _plan(fn, x, d, method, row_scale is not None, cfg, budget)
        if kind == "exact":
            out, conf, probes, steps = _exact_norms(fn, x, row_scale, step, budget), 1.0, 0, 0
        else:
            out, conf, probes = _randomized_norms(fn, x, row_scale, cfg, point_offset, step), confidence, cfg.num_probes
            steps = out.pop("lanczos_steps")
    tensors = {k: v.detach().cpu().double() for k, v in out.items() if isinstance(v, torch.Tensor)}
    return JacobianNorms(
        **tensors, method=out["method"], confidence=conf, num_probes=probes, lanczos_steps=steps,
        point_index=torch.arange(point_offset, point_offset + x.shape[0], dtype=torch.int64),
    )  # fmt: skip
