"""The one table of op rules: for every ATen op of a traced encoder, how it maps

- a Lipschitz constant (l2 -> l2, for ``method="global"``): ``lipschitz``, with an additive jump term for
  functions with a jump (softplus' threshold; see :mod:`.activations`);
- an interval (elementwise bounds over the ball, for ``method="local"``): ``interval``;
- an interval Jacobian (``centre +- radius`` elementwise, for ``method="local"``): ``backward`` maps the bounds of
  ``d out / d x`` to those of ``d in / d x`` (reverse mode, rows = the output coordinates);
- a diagonal carry (for ``method="local"``): ``carry`` maps ``d in / d x = diag(a) M`` (``|a| <= e``,
  ``||M|| <= L``) forwards to the same form for the output.

Kinds of rule:

- :class:`Affine`: ``T v + c``. Constant ``||T||`` (a float64 bound of :mod:`.norms`); intervals in centre-radius
  form (``T c + c0 +- |T| r``); interval Jacobians by the transposes of ``T`` and ``|T|`` (exact).
- :class:`Elementwise`: ``phi`` applied to every entry (:mod:`.activations`): ``sup |phi'|``; ``phi([lo, hi])``;
  the product with ``phi'([lo, hi])``.
- :class:`Sum` (``a + alpha b``), :class:`Concat` (cat/stack): sums / root-sum-squares of the inputs' constants.
- :class:`SortValues` (sort along a dimension: GroupSort), :class:`Extreme` (max/min over dimensions): 1-Lipschitz,
  monotone in every input (so ``op(lo) <= op(v) <= op(hi)``); their Jacobian is a selection whose possible entries
  follow from which inputs can take which rank.
- :class:`MaxPool`: ``sqrt(c)``-Lipschitz with ``c`` the largest number of windows an input lies in; monotone; a
  carry (its Jacobian selects one input per window) but no interval Jacobian.
- :class:`ConstantLike` (``full_like`` ...): constant values, Jacobian 0.

Every rule acts on each point separately: an op that reduces, slices, sorts or concatenates along the batch
dimension is refused. An op without a rule is refused by :func:`build_rule` with its name; an op without a global
constant (``exp``, ``log``) is refused when ``method="global"`` is asked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vaefast.certification.activations import Activation, make_activation
from vaefast.certification.calls import Call, CertificationRefused, Sym, Var, has_placeholder
from vaefast.certification.norms import column_scaled_norms, conv_norm, schur_norm, spectral_norm

__all__ = ["Context", "Rule", "build_rule"]

ROUNDING = 1e-12  # relative widening of every affine interval (float64 rounding of the products)
EXACT_CARRY = 64  # widest dense layer whose ||W diag(e)|| the carry computes per ball (else Schur on |W| diag(e))
Bounds = tuple[torch.Tensor, torch.Tensor]  # (lo, hi) [N, *shape]
Carry = tuple[
    torch.Tensor, torch.Tensor
]  # (e [N, *shape] >= 0, L [N]): d v / d x (x') = diag(a) M, |a| <= e, ||M|| <= L
Jac = tuple[torch.Tensor, torch.Tensor]  # (centre, radius >= 0) [N, rows, *shape]
Linear = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Context:
    """What a rule needs to know beside its call: per-point shapes of the inputs that depend on x and of the
    output, and the float64 device."""

    in_shapes: tuple[tuple[int, ...], ...]
    out_shape: tuple[int, ...]
    device: torch.device


def _flat_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _vjp(fn: Linear, cot: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
    """``T^T cot`` for a linear ``fn`` (batched over cot's first dimension), by autograd."""
    z = torch.zeros((cot.shape[0], *in_shape), dtype=cot.dtype, device=cot.device, requires_grad=True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(fn(z), z, cot, allow_unused=True)
    return torch.zeros_like(z) if g is None else g


class Rule:
    """An op's rule (module docstring). ``call`` computes the op; ``name`` describes it."""

    call: Call
    name: str
    has_backward = True  # the interval Jacobian passes through it (else the local bound uses the carry alone)

    def forward(self, *values: torch.Tensor) -> torch.Tensor:
        """The op's value on points ``[N, *in_shape]``."""
        return self.call(*values)

    def lipschitz(self, inputs: list[tuple[float, float]]) -> tuple[float, float]:
        """``(L, E)`` of the output from those of the inputs: ``||out(x') - out(x)|| <= L ||x' - x|| + E``."""
        raise NotImplementedError

    def interval(self, *bounds: Bounds) -> Bounds:
        """Elementwise bounds of the output from those of the inputs."""
        raise NotImplementedError

    def backward(self, jac: Jac, bounds: list[Bounds]) -> list[Jac | None]:
        """Bounds of ``d input / d x`` rows' contributions from those of ``d output / d x`` (one per input)."""
        raise NotImplementedError

    def carry(self, inputs: list[Carry], bounds: list[Bounds]) -> Carry:
        """The diagonal carry (forward): from ``d in / d x = diag(a) M`` with ``|a| <= e``, ``||M|| <= L`` for every
        input, the same form for the output (a diagonal factor is carried to the next op, whose norm is then taken
        with it: ``||W diag(e)||`` instead of ``||W|| max(e)``). ``e = None`` stands for all ones."""
        raise NotImplementedError


class Affine(Rule):
    """``T v + c`` (module docstring). Kinds of ``T`` the carry uses: ``scalar`` (``T = scalar I``), ``diagonal``
    (``T = diag(t)``, ``|t|`` given), ``copy`` (every output copies one input or is 0: reshapes, selections, padding,
    ``T diag(a) = diag(T a) T``), ``matrix`` (a dense ``T``: ``||T diag(e)||`` from ``T^T T``); else Schur's test on
    ``|T| diag(e)``."""

    def __init__(self, call: Call, ctx: Context, linear: Linear, abs_linear: Linear | None = None, *,
                 norm: Callable[[], float] | None = None, scalar: float | None = None,
                 transpose: Linear | None = None, abs_transpose: Linear | None = None,
                 diagonal: torch.Tensor | None = None, copy: bool = False,
                 matrix: torch.Tensor | None = None) -> None:  # fmt: skip
        self.call, self.name, self.ctx = call, call.name, ctx
        self.linear, self.abs_linear = linear, abs_linear or linear
        self._norm_fn, self.scalar = norm, scalar
        self._transpose, self._abs_transpose = transpose, abs_transpose
        self.diagonal, self.copy, self.matrix = diagonal, copy, matrix  # kinds of T for the carry (class doc)
        self._norm: float | None = None
        self._gram: torch.Tensor | None = None
        self._column_sums: torch.Tensor | None = None

    def norm(self) -> float:
        """A sound upper bound of ``||T||_2`` (the op's own bound and Schur's test on ``|T|``, whichever is less)."""
        if self._norm is None:
            if self.scalar is not None:
                self._norm = abs(self.scalar)
            else:
                schur = schur_norm(self.abs_linear, self.ctx.in_shapes[0], torch.float64, self.ctx.device)
                self._norm = min(schur, self._norm_fn()) if self._norm_fn is not None else schur
        return self._norm

    def lipschitz(self, inputs: list[tuple[float, float]]) -> tuple[float, float]:
        n = self.norm()
        return n * inputs[0][0], n * inputs[0][1]

    def interval(self, *bounds: Bounds) -> Bounds:
        lo, hi = bounds[0]
        centre = self.call((lo + hi) / 2)
        radius = self.abs_linear((hi - lo) / 2)
        radius = radius + ROUNDING * (centre.abs() + radius)
        return centre - radius, centre + radius

    def transpose(self, cot: torch.Tensor, absolute: bool) -> torch.Tensor:
        """``T^T cot`` (``|T|^T cot`` when ``absolute``), cot ``[M, *out_shape]``."""
        if self.scalar is not None:
            return cot * (abs(self.scalar) if absolute else self.scalar)
        explicit = self._abs_transpose if absolute else self._transpose
        if explicit is not None:
            return explicit(cot)
        return _vjp(self.abs_linear if absolute else self.linear, cot, self.ctx.in_shapes[0])

    def backward(self, jac: Jac, bounds: list[Bounds]) -> list[Jac | None]:
        jc, jr = jac
        n, rows = jc.shape[:2]
        c = self.transpose(_flat_rows(jc), False)
        r = self.transpose(_flat_rows(jr), True)
        return [(c.reshape(n, rows, *c.shape[1:]), r.reshape(n, rows, *r.shape[1:]))]

    def carry(self, inputs: list[Carry], bounds: list[Bounds]) -> Carry:
        e, lv = inputs[0]
        if self.scalar is not None:
            return (None, lv * abs(self.scalar)) if e is None else (e * abs(self.scalar), lv)
        if self.diagonal is not None:
            return (self.diagonal.expand(lv.shape[0], *self.diagonal.shape) if e is None else e * self.diagonal), lv
        if e is None:  # ||T diag(1)|| = ||T||; a copy of ones is at most one
            return None, lv * self.norm()
        if self.copy:
            return self.abs_linear(e), lv * self.norm()
        flat = e.flatten(1)
        if self.matrix is not None and self.matrix.shape[1] <= EXACT_CARRY:
            if self._gram is None:
                self._gram = self.matrix.T @ self.matrix
            scaled = column_scaled_norms(self._gram, flat)
        else:
            if self._column_sums is None:
                ones = torch.ones(1, *self.ctx.out_shape, dtype=e.dtype, device=e.device)
                self._column_sums = _vjp(self.abs_linear, ones, self.ctx.in_shapes[0])
            rows = self.abs_linear(e).flatten(1).amax(1)
            cols = (e * self._column_sums).flatten(1).amax(1)
            scaled = torch.sqrt(rows * cols) * (1 + 1e-6)
        return None, lv * torch.minimum(scaled, self.norm() * flat.amax(1))


class Elementwise(Rule):
    """``phi`` entrywise (:class:`~vaefast.certification.activations.Activation`)."""

    def __init__(self, call: Call, ctx: Context, act: Activation) -> None:
        self.call, self.ctx, self.act = call, ctx, act
        self.name = f"{call.name} ({act.name})"

    def lipschitz(self, inputs: list[tuple[float, float]]) -> tuple[float, float]:
        sup = self.act.sup_derivative
        if not math.isfinite(sup):
            raise CertificationRefused(f"{self.name} has no global Lipschitz constant (use method='local')")
        jump = self.act.jump * math.sqrt(math.prod(self.ctx.out_shape))
        return sup * inputs[0][0], sup * inputs[0][1] + jump

    def interval(self, *bounds: Bounds) -> Bounds:
        return self.act.interval(*bounds[0])

    def backward(self, jac: Jac, bounds: list[Bounds]) -> list[Jac | None]:
        jc, jr = jac
        d_lo, d_hi = self.act.derivative_range(*bounds[0])
        dm, dr = ((d_lo + d_hi) / 2).unsqueeze(1), ((d_hi - d_lo) / 2).unsqueeze(1)
        return [(jc * dm, jc.abs() * dr + jr * (dm.abs() + dr))]

    def carry(self, inputs: list[Carry], bounds: list[Bounds]) -> Carry:
        d_lo, d_hi = self.act.derivative_range(*bounds[0])
        e, lv = inputs[0]
        bound = torch.maximum(d_lo.abs(), d_hi.abs())
        return (bound if e is None else e * bound), lv


class Sum(Rule):
    """``sum_i coef_i v_i`` of inputs that all depend on x (broadcast to the output's shape: an input repeated
    ``m_i`` times contributes ``sqrt(m_i)`` times its constant)."""

    def __init__(self, call: Call, ctx: Context, coefs: Sequence[float]) -> None:
        self.call, self.name, self.ctx, self.coefs = call, call.name, ctx, list(coefs)
        out = math.prod(ctx.out_shape)
        self.repeats = [math.sqrt(out / max(math.prod(s), 1)) for s in ctx.in_shapes]

    def lipschitz(self, inputs: list[tuple[float, float]]) -> tuple[float, float]:
        scale = [abs(c) * m for c, m in zip(self.coefs, self.repeats, strict=True)]
        return (sum(s * lv for s, (lv, _) in zip(scale, inputs, strict=True)),
                sum(s * e for s, (_, e) in zip(scale, inputs, strict=True)))  # fmt: skip

    def interval(self, *bounds: Bounds) -> Bounds:
        centre = sum(c * (lo + hi) / 2 for c, (lo, hi) in zip(self.coefs, bounds, strict=True))
        radius = sum(abs(c) * (hi - lo) / 2 for c, (lo, hi) in zip(self.coefs, bounds, strict=True))
        radius = radius + ROUNDING * (centre.abs() + radius)
        return centre - radius, centre + radius

    def backward(self, jac: Jac, bounds: list[Bounds]) -> list[Jac | None]:
        lead = tuple(jac[0].shape[:2])
        return [((c * jac[0]).sum_to_size(lead + s), (abs(c) * jac[1]).sum_to_size(lead + s))
                for c, s in zip(self.coefs, self.ctx.in_shapes, strict=True)]  # fmt: skip

    def carry(self, inputs: list[Carry], bounds: list[Bounds]) -> Carry:
        total = sum(abs(c) * m * (lv if e is None else e.flatten(1).amax(1) * lv)
                    for c, m, (e, lv) in zip(self.coefs, self.repeats, inputs, strict=True))  # fmt: skip
        return None, total


class Concat(Rule):
    """``cat`` / ``stack`` of inputs that depend on x along a dimension other than the batch."""

    def __init__(self, call: Call, ctx: Context) -> None:
        self.call, self.name, self.ctx = call, call.name, ctx

    def lipschitz(self, inputs: list[tuple[float, float]]) -> tuple[float, float]:
        return math.hypot(*[lv for lv, _ in inputs]), math.hypot(*[e for _, e in inputs])

    def interval(self, *bounds: Bounds) -> Bounds:
        return self.call(*[lo for lo, _ in bounds]), self.call(*[hi for _, hi in bounds])

    def backward(self, jac: Jac, bounds: list[Bounds]) -> list[Jac | None]:
        jc, jr = jac
        n, rows = jc.shape[:2]
        zeros = [torch.zeros((n * rows, *s), dtype=jc.dtype, device=jc.device, requires_grad=True)
                 for s in self.ctx.in_shapes]  # fmt: skip
        with torch.enable_grad():
            out = self.call(*zeros)
            gc = torch.autograd.grad(out, zeros, _flat_rows(jc), retain_graph=True)
            gr = torch.autograd.grad(out, zeros, _flat_rows(jr))
        return [
            (c.reshape(n, rows, *c.shape[1:]), r.reshape(n, rows, *r.shape[1:])) for c, r in zip(gc, gr, strict=True)
        ]

    def carry(self, inputs: list[Carry], bounds: list[Bounds]) -> Carry:
        norm = torch.stack([lv for _, lv in inputs]).pow(2).sum(0).sqrt()
        if all(e is None for e, _ in inputs):
            return None, norm
        n = inputs[0][1].shape[0]
        parts = [torch.ones(n, *s, dtype=lv.dtype, device=lv.device) if e is None else e
                 for (e, lv), s in zip(inputs, self.ctx.in_shapes, strict=True)]  # fmt: skip
        return self.call(*parts), norm


class SortValues(Rule):
    """The values of ``sort`` along ``dim`` (batched index): 1-Lipschitz, monotone in every input."""

    def __init__(self, call: Call, dim: int, descending: bool) -> None:
        self.call, self.name, self.dim, self.descending = call, call.name, dim, descending

    def lipschitz(self, inputs: list[tuple[float, float]]) -> tuple[float, float]:
        return inputs[0]

    def interval(self, *bounds: Bounds) -> Bounds:
        lo, hi = bounds[0]
        return self.call(lo), self.call(hi)

    def backward(self, jac: Jac, bounds: list[Bounds]) -> list[Jac | None]:
        lo, hi = (t.movedim(self.dim, -1) for t in bounds[0])
        g = lo.shape[-1]
        below = (hi[..., None, :] < lo[..., :, None]).sum(-1)  # [.., i]: inputs surely below input i
        above = (lo[..., None, :] > hi[..., :, None]).sum(-1)
        rank = torch.arange(g, device=lo.device)
        lowest, highest = below[..., None, :], (g - 1 - above)[..., None, :]  # [.., 1, i]
        possible = (lowest <= rank[:, None]) & (rank[:, None] <= highest)  # [.., j, i]
        fixed = possible & (lowest == highest)
        if self.descending:
            possible, fixed = possible.flip(-2), fixed.flip(-2)
        pc, pr = ((possible.double() + fixed.double()) / 2).unsqueeze(1), ((possible.double() - fixed.double()) / 2)
        pr = pr.unsqueeze(1)
        jc, jr = (t.movedim(self.dim + 1, -1).unsqueeze(-2) for t in jac)  # [N, rows, .., 1, j]
        c = (jc @ pc).squeeze(-2)
        r = (jc.abs() @ pr + jr @ (pc + pr)).squeeze(-2)
        return [(c.movedim(-1, self.dim + 1), r.movedim(-1, self.dim + 1))]

    def carry(self, inputs: list[Carry], bounds: list[Bounds]) -> Carry:
        e, lv = inputs[0]  # P diag(a) M = diag(P a) P M with P a permutation of each group: the group's largest e
        return (None if e is None else e.amax(self.dim, keepdim=True).expand_as(e)), lv


class Extreme(Rule):
    """``max``/``min`` over dimensions ``dims`` (batched indices): 1-Lipschitz (disjoint groups), monotone."""

    def __init__(self, call: Call, dims: tuple[int, ...], keepdim: bool, largest: bool) -> None:
        self.call, self.name, self.dims, self.keepdim, self.largest = call, call.name, dims, keepdim, largest

    def lipschitz(self, inputs: list[tuple[float, float]]) -> tuple[float, float]:
        return inputs[0]

    def interval(self, *bounds: Bounds) -> Bounds:
        lo, hi = bounds[0]
        return self.call(lo), self.call(hi)

    def backward(self, jac: Jac, bounds: list[Bounds]) -> list[Jac | None]:
        lo, hi = bounds[0]
        if self.largest:
            candidate = hi >= lo.amax(self.dims, keepdim=True)
        else:
            candidate = lo <= hi.amin(self.dims, keepdim=True)
        sure = candidate & (candidate.sum(self.dims, keepdim=True) == 1)
        pc = ((candidate.double() + sure.double()) / 2).unsqueeze(1)
        pr = ((candidate.double() - sure.double()) / 2).unsqueeze(1)
        jc, jr = jac
        if not self.keepdim:
            for d in sorted(self.dims):
                jc, jr = jc.unsqueeze(d + 1), jr.unsqueeze(d + 1)
        return [(jc * pc, jc.abs() * pr + jr * (pc + pr))]

    def carry(self, inputs: list[Carry], bounds: list[Bounds]) -> Carry:
        e, lv = inputs[0]  # a selection of distinct inputs: the selected e, norm <= 1
        return (None if e is None else self.call(e)), lv


class MaxPool(Rule):
    """Max pooling: ``sqrt(coverage)``-Lipschitz, monotone; its Jacobian selects one input per window (each input
    in at most ``coverage`` windows), so the carry is the pooled ``e`` and ``sqrt(coverage) L``; no interval
    Jacobian (the local bound uses the carry)."""

    has_backward = False

    def __init__(self, call: Call, coverage: int) -> None:
        self.call, self.name, self.coverage = call, call.name, coverage

    def lipschitz(self, inputs: list[tuple[float, float]]) -> tuple[float, float]:
        s = math.sqrt(self.coverage)
        return s * inputs[0][0], s * inputs[0][1]

    def interval(self, *bounds: Bounds) -> Bounds:
        lo, hi = bounds[0]
        return self.call(lo), self.call(hi)

    def carry(self, inputs: list[Carry], bounds: list[Bounds]) -> Carry:
        e, lv = inputs[0]
        return (None if e is None else self.call(e)), lv * math.sqrt(self.coverage)


class ConstantLike(Rule):
    """An op whose value does not depend on x (``full_like``, ``zeros`` ...): Jacobian 0."""

    def __init__(self, call: Call, ctx: Context, n_inputs: int) -> None:
        self.call, self.name, self.ctx, self.n_inputs = call, call.name, ctx, n_inputs

    def lipschitz(self, inputs: list[tuple[float, float]]) -> tuple[float, float]:
        return 0.0, 0.0

    def interval(self, *bounds: Bounds) -> Bounds:
        value = self.call(*[lo for lo, _ in bounds])
        return value, value

    def backward(self, jac: Jac, bounds: list[Bounds]) -> list[Jac | None]:
        return [None] * self.n_inputs

    def carry(self, inputs: list[Carry], bounds: list[Bounds]) -> Carry:
        return None, inputs[0][1] * 0


# --- the table ----------------------------------------------------------------------------------------------------
def _refuse(call: Call, why: str) -> CertificationRefused:
    return CertificationRefused(f"{call.name} {why}")


def _const(call: Call, name: str) -> object:
    value = call.args.get(name)
    if has_placeholder(value, Var):
        raise _refuse(call, f"multiplies two inputs that both depend on x (its {name!r} does): no sound rule")
    return value


def _only_input(call: Call, name: str) -> None:
    if call.var_names() != [name]:
        raise _refuse(call, f"with {call.var_names()} depending on x: no rule (only {name!r} may)")


def _batched_dims(call: Call, dims: object, rank: int) -> tuple[int, ...]:
    """Dimensions of an op on ``[N, *shape]`` (rank ``rank``), normalised; the batch dimension is refused."""
    out = tuple(int(d) % rank for d in ([dims] if isinstance(dims, int) else dims))
    if 0 in out or not out:
        raise _refuse(call, "acts across the batch dimension (it would mix points): no rule")
    return out


def _as_tuple(value: object, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def _linear(call: Call, ctx: Context) -> Rule:
    _only_input(call, "input")
    w = _const(call, "weight")
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise _refuse(call, "with a weight that is not a matrix: no rule")
    a = w.abs()
    return Affine(call, ctx, lambda v: F.linear(v, w), lambda v: F.linear(v, a), norm=lambda: spectral_norm(w),
                  transpose=lambda c: c @ w, abs_transpose=lambda c: c @ a, matrix=w)  # fmt: skip


def _matmul(call: Call, ctx: Context) -> Rule:
    first, second = ("mat1", "mat2") if "mat1" in call.args else ("self", "mat2" if "mat2" in call.args else "other")
    _only_input(call, first)
    w = _const(call, second)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise _refuse(call, "with a constant operand that is not a matrix: no rule")
    alpha = float(call.args.get("alpha", 1))
    wa, a = alpha * w, (alpha * w).abs()
    return Affine(call, ctx, lambda v: v @ wa, lambda v: v @ a, norm=lambda: spectral_norm(wa),
                  transpose=lambda c: c @ wa.T, abs_transpose=lambda c: c @ a.T, matrix=wa.T)  # fmt: skip


def _conv(call: Call, ctx: Context) -> Rule:
    _only_input(call, "input")
    w = _const(call, "weight")
    spatial = ctx.in_shapes[0][1:]
    n = len(spatial)
    transposed = bool(call.args.get("transposed", "transpose" in call.name))
    dilation, padding = _as_tuple(call.args.get("dilation", 1), n), call.args.get("padding", 0)
    kernel = w.shape[2:]
    if transposed:
        grid = [o + 2 * p for o, p in zip(ctx.out_shape[1:], _as_tuple(padding, n), strict=True)]
    elif isinstance(padding, str):
        extra = [dl * (k - 1) if padding == "same" else 0 for dl, k in zip(dilation, kernel, strict=True)]
        grid = [s + e for s, e in zip(spatial, extra, strict=True)]
    else:
        grid = [s + 2 * p for s, p in zip(spatial, _as_tuple(padding, n), strict=True)]
    groups = int(call.args.get("groups", 1))
    linear = call.with_args(bias=None)
    return Affine(call, ctx, linear, linear.with_args(weight=w.abs()),
                  norm=lambda: conv_norm(w, groups, dilation, grid))  # fmt: skip


def _batch_norm(call: Call, ctx: Context) -> Rule:
    _only_input(call, "input")
    if call.args.get("training", False):
        raise _refuse(call, "in training mode normalises by the batch's statistics (it mixes points): no rule")
    mean, var = _const(call, "running_mean"), _const(call, "running_var")
    if mean is None or var is None:
        raise _refuse(call, "without running statistics normalises by the batch (it mixes points): no rule")
    weight = _const(call, "weight")
    scale = (torch.ones_like(var) if weight is None else weight) / torch.sqrt(var + float(call.args["eps"]))
    view = scale.reshape(1, -1, *[1] * (len(ctx.in_shapes[0]) - 1))
    a = view.abs()
    return Affine(call, ctx, lambda v: v * view, lambda v: v * a, norm=lambda: float(a.max()),
                  transpose=lambda c: c * view, abs_transpose=lambda c: c * a, diagonal=a[0])  # fmt: skip


def _structural(call: Call, ctx: Context) -> Rule:
    """Reshapes, permutations and selections (0/1 matrices with one 1 per row at most): ``|T| = T``."""
    rank = len(ctx.in_shapes[0]) + 1
    op = call.op.overloadpacket.__name__
    if op == "permute" and int(call.args["dims"][0]) % rank != 0:
        raise _refuse(call, "moves the batch dimension: no rule")
    if op == "transpose":
        _batched_dims(call, [call.args["dim0"], call.args["dim1"]], rank)
    if op in ("select", "narrow", "split", "split_with_sizes", "chunk", "unbind"):
        _batched_dims(call, call.args.get("dim", 0), rank)
    if op == "slice" and int(call.args.get("dim", 0)) % rank == 0:
        start, end, step = call.args.get("start"), call.args.get("end"), call.args.get("step", 1)
        if start not in (None, 0) or step != 1 or not (end is None or isinstance(end, Sym) or end >= 2**62):
            raise _refuse(call, "selects points of the batch: no rule")
    return Affine(call, ctx, call, call, norm=(lambda: 1.0) if op != "expand" else None, copy=True)


class Identity(Affine):
    """Dtype casts, copies and dropout in eval mode: the identity in real arithmetic (no cast to the model's dtype)."""

    def forward(self, *values: torch.Tensor) -> torch.Tensor:
        return values[0]

    def interval(self, *bounds: Bounds) -> Bounds:
        return bounds[0]


def _identity(call: Call, ctx: Context) -> Rule:
    if call.op.overloadpacket.__name__ in ("dropout", "native_dropout") and call.args.get("train"):
        raise _refuse(call, "in training mode is random: no rule")
    return Identity(call, ctx, lambda v: v, scalar=1.0)


def _pool(call: Call, ctx: Context) -> Rule:
    _only_input(call, "self" if "self" in call.args else "input")
    return Affine(call, ctx, call, call)


def _pad(call: Call, ctx: Context) -> Rule:
    mode = call.args.get("mode", "constant") if "mode" in call.args else "constant"
    if call.op.overloadpacket.__name__ in ("reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
                                           "replication_pad1d", "replication_pad2d", "replication_pad3d"):  # fmt: skip
        mode = "copy"
    if mode != "constant":  # each padded entry copies one input entry: Schur's test is exact (sqrt of max copies)
        return Affine(call, ctx, call, call, copy=True)
    linear = call.with_args(value=0.0) if "value" in call.args else call
    return Affine(call, ctx, linear, linear, norm=lambda: 1.0, copy=True)


def _reduce(call: Call, ctx: Context) -> Rule:
    if call.args.get("dim") is None:
        raise _refuse(call, "over every dimension mixes the points of the batch: no rule")
    _batched_dims(call, call.args["dim"], len(ctx.in_shapes[0]) + 1)
    call = call.with_args(dtype=None) if "dtype" in call.args else call
    return Affine(call, ctx, call)


def _elementwise_scale(call: Call, ctx: Context, factor: object) -> Rule:
    """``v * factor`` with a constant ``factor`` (a number, or a tensor broadcast without expanding v)."""
    if isinstance(factor, torch.Tensor) and factor.numel() == 1:
        factor = float(factor)
    if not isinstance(factor, torch.Tensor):
        c = float(factor)
        return Affine(call, ctx, lambda v: v * c, scalar=c)
    if ctx.out_shape != ctx.in_shapes[0]:
        raise _refuse(call, "broadcasts its input that depends on x to a larger shape: no rule")
    f, a = factor.double(), factor.double().abs()
    per_point = a[0] if a.dim() == len(ctx.in_shapes[0]) + 1 and a.shape[0] == 1 else a
    diagonal = per_point.expand(ctx.in_shapes[0]) if per_point.dim() <= len(ctx.in_shapes[0]) else None
    return Affine(call, ctx, lambda v: v * f, lambda v: v * a, norm=lambda: float(a.max()),
                  transpose=lambda c: c * f, abs_transpose=lambda c: c * a, diagonal=diagonal)  # fmt: skip


def _arithmetic(call: Call, ctx: Context) -> Rule:
    """add / sub / rsub / mul / div / neg with a constant (an affine map) or of two inputs (a sum)."""
    op, names = call.op.overloadpacket.__name__, call.var_names()
    if op == "neg":
        return _elementwise_scale(call, ctx, -1.0)
    alpha = float(call.args.get("alpha", 1))
    signs = {"add": (1.0, alpha), "sub": (1.0, -alpha), "rsub": (-alpha, 1.0)}
    if op in signs:
        coefs = dict(zip(("self", "other"), signs[op], strict=True))
        if len(names) == 2:
            return Sum(call, ctx, [coefs[n] for n in names])
        if ctx.out_shape != ctx.in_shapes[0]:
            raise _refuse(call, "broadcasts its input that depends on x to a larger shape: no rule")
        return _elementwise_scale(call, ctx, coefs[names[0]])
    if len(names) == 2:
        raise _refuse(call, "multiplies or divides two inputs that both depend on x: no sound rule")
    if op == "div":
        if names != ["self"] or call.args.get("rounding_mode") is not None:
            raise _refuse(call, "divides by (or rounds) an input that depends on x: no sound rule")
        return _elementwise_scale(call, ctx, 1.0 / call.args["other"])
    return _elementwise_scale(call, ctx, call.args["other" if names == ["self"] else "self"])


def _concat(call: Call, ctx: Context) -> Rule:
    tensors = call.args["tensors"]
    if not all(isinstance(t, Var) for t in tensors):
        raise _refuse(call, "joins constants to inputs that depend on x: no rule")
    _batched_dims(call, call.args.get("dim", 0), len(ctx.out_shape) + (0 if "stack" in call.name else 1))
    return Concat(call, ctx)


def _sort(call: Call, ctx: Context) -> Rule:
    _only_input(call, "self")
    if call.out_index != 0:
        raise _refuse(call, "indices are integers that depend on x: no rule")
    (dim,) = _batched_dims(call, call.args.get("dim", -1), len(ctx.in_shapes[0]) + 1)
    return SortValues(call, dim, bool(call.args.get("descending", False)))


def _extreme(call: Call, ctx: Context) -> Rule:
    _only_input(call, "self")
    if call.out_index not in (None, 0):
        raise _refuse(call, "indices are integers that depend on x: no rule")
    op = call.op.overloadpacket.__name__
    if "dim" not in call.args:
        raise _refuse(call, "over every dimension mixes the points of the batch: no rule")
    dims = _batched_dims(call, call.args["dim"], len(ctx.in_shapes[0]) + 1)
    return Extreme(call, dims, bool(call.args.get("keepdim", False)), op in ("amax", "max"))


def _max_pool(call: Call, ctx: Context) -> Rule:
    _only_input(call, "self")
    if call.out_index not in (None, 0):
        raise _refuse(call, "indices are integers that depend on x: no rule")
    n = len(ctx.in_shapes[0]) - 1
    kernel = _as_tuple(call.args["kernel_size"], n)
    stride = _as_tuple(call.args.get("stride") or kernel, n)
    dilation = _as_tuple(call.args.get("dilation", 1), n)
    coverage = math.prod(
        min(k, math.ceil((d * (k - 1) + 1) / s)) for k, s, d in zip(kernel, stride, dilation, strict=True)
    )
    return MaxPool(call, coverage)


def _constant_like(call: Call, ctx: Context) -> Rule:
    """Ops whose value does not depend on x: ``full_like(v)`` reads only v's shape, ``c.expand_as(v)`` too."""
    if call.op.overloadpacket.__name__ == "expand_as" and has_placeholder(call.args["self"], Var):
        raise _refuse(call, "expands an input that depends on x to another's shape: no rule (use expand)")
    if isinstance(call.args.get("dtype"), torch.dtype) and call.args["dtype"].is_floating_point:
        call = call.with_args(dtype=torch.float64)
    return ConstantLike(call, ctx, len(ctx.in_shapes))


_ACTIVATION_PARAMS: dict[str, Callable[[dict], tuple[str, dict]]] = {
    "relu": lambda a: ("relu", {}),
    "leaky_relu": lambda a: ("leaky_relu", {"negative_slope": a["negative_slope"]}),
    "elu": lambda a: ("elu", {k: a[k] for k in ("alpha", "scale", "input_scale")}),
    "selu": lambda a: ("selu", {}),
    "celu": lambda a: ("celu", {"alpha": a["alpha"]}),
    "gelu": lambda a: ("gelu_tanh" if a.get("approximate") == "tanh" else "gelu", {}),
    "silu": lambda a: ("silu", {}),
    "mish": lambda a: ("mish", {}),
    "softplus": lambda a: ("softplus", {"beta": a["beta"], "threshold": a["threshold"]}),
    "tanh": lambda a: ("tanh", {}),
    "sigmoid": lambda a: ("sigmoid", {}),
    "hardtanh": lambda a: ("clamp", {"low": a["min_val"], "high": a["max_val"]}),
    "relu6": lambda a: ("clamp", {"low": 0.0, "high": 6.0}),
    "clamp": lambda a: ("clamp", {"low": a.get("min"), "high": a.get("max")}),
    "clamp_min": lambda a: ("clamp", {"low": a["min"]}),
    "clamp_max": lambda a: ("clamp", {"high": a["max"]}),
    "abs": lambda a: ("abs", {}),
    "exp": lambda a: ("exp", {}),
    "log": lambda a: ("log", {}),
}


def _activation(call: Call, ctx: Context) -> Rule:
    _only_input(call, "self")
    name, params = _ACTIVATION_PARAMS[call.op.overloadpacket.__name__](call.args)
    for key, value in params.items():
        if has_placeholder(value, Var) or (isinstance(value, torch.Tensor) and value.numel() != 1):
            raise _refuse(call, f"with a {key} that is not a constant number: no rule")
        params[key] = None if value is None else float(value)
    try:
        return Elementwise(call, ctx, make_activation(name, **params))
    except ValueError as exc:  # a parameter without a sound rule: refused by name
        raise _refuse(call, str(exc)) from exc


Builder = Callable[[Call, Context], Rule]
_GROUPS: list[tuple[Builder, tuple[str, ...]]] = [
    (_linear, ("linear",)),
    (_matmul, ("mm", "matmul", "addmm")),
    (_conv, ("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")),
    (_batch_norm, ("batch_norm", "_native_batch_norm_legit_no_training")),
    (
        _pool,
        (
            "avg_pool1d",
            "avg_pool2d",
            "avg_pool3d",
            "adaptive_avg_pool1d",
            "adaptive_avg_pool2d",
            "adaptive_avg_pool3d",
            "_adaptive_avg_pool2d",
            "_adaptive_avg_pool3d",
        ),
    ),  # fmt: skip
    (
        _pad,
        (
            "pad",
            "constant_pad_nd",
            "reflection_pad1d",
            "reflection_pad2d",
            "reflection_pad3d",
            "replication_pad1d",
            "replication_pad2d",
            "replication_pad3d",
            "_pad_circular",
        ),
    ),  # fmt: skip
    (
        _structural,
        (
            "view",
            "reshape",
            "_unsafe_view",
            "flatten",
            "unflatten",
            "squeeze",
            "unsqueeze",
            "permute",
            "transpose",
            "expand",
            "slice",
            "select",
            "narrow",
            "split",
            "split_with_sizes",
            "chunk",
            "unbind",
        ),
    ),  # fmt: skip
    (
        _identity,
        (
            "to",
            "_to_copy",
            "clone",
            "contiguous",
            "alias",
            "detach",
            "lift_fresh_copy",
            "dropout",
            "native_dropout",
            "feature_dropout",
            "alpha_dropout",
        ),
    ),  # fmt: skip
    (_reduce, ("sum", "mean")),
    (_arithmetic, ("add", "sub", "rsub", "mul", "div", "neg")),
    (_concat, ("cat", "stack")),
    (_sort, ("sort",)),
    (_extreme, ("amax", "amin", "max", "min")),
    (_max_pool, ("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices")),
    (
        _constant_like,
        (
            "full_like",
            "zeros_like",
            "ones_like",
            "new_zeros",
            "new_ones",
            "new_full",
            "zeros",
            "ones",
            "full",
            "expand_as",
        ),
    ),  # fmt: skip
    (_activation, tuple(_ACTIVATION_PARAMS)),
]
TABLE: dict[str, Builder] = {name: builder for builder, names in _GROUPS for name in names}
REFUSED: dict[str, str] = {
    **dict.fromkeys(
        ("layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "instance_norm"),
        "normalises each point by its own statistics: no sound rule (use BatchNorm in eval mode)",
    ),
    **dict.fromkeys(
        (
            "rand_like",
            "randn_like",
            "randint_like",
            "rand",
            "randn",
            "randint",
            "randperm",
            "bernoulli",
            "normal",
            "uniform",
            "multinomial",
            "empty_like",
            "empty",
            "empty_strided",
        ),
        "is random or uninitialised: no rule",
    ),  # fmt: skip
    **dict.fromkeys(
        ("softmax", "_softmax", "log_softmax", "_log_softmax", "pow", "sqrt", "rsqrt", "reciprocal"),
        "has no sound rule",
    ),  # fmt: skip
}


def build_rule(call: Call, ctx: Context) -> Rule:
    """The rule of one traced op.

    Args:
        call: the op with its constant arguments (inputs that depend on x as :class:`~.calls.Var`).
        ctx: shapes and device.

    Returns:
        The :class:`Rule`.

    Raises:
        CertificationRefused: the op has no sound rule (or uses x where its rule needs a constant, or acts across
            the batch); the message names the op and why.
    """
    name = call.op.overloadpacket.__name__
    if name in REFUSED:
        raise _refuse(call, REFUSED[name])
    if not call.var_names():  # a value of the batch size alone (zeros(B, d), expand of a parameter)
        return _constant_like(call, ctx)
    if name not in TABLE:
        raise _refuse(call, "has no sound rule (see vaefast/certification/rules.py for the supported ops)")
    builder = TABLE[name]
    if builder not in (_arithmetic, _concat, _constant_like, _matmul):
        _only_input(call, next(iter(call.args)))  # the rule reads its first argument; every other is a constant
    return builder(call, ctx)
