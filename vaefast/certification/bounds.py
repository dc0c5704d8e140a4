"""Lipschitz constants of a traced encoder's whitened mean map ``x -> diag(w) mu(x)`` and of ``x -> log sigma(x) =
logvar(x) / 2``, globally or over the ball ``||x' - x|| <= R``.

**Global** (:meth:`EncoderBounds.global_mean`, :meth:`EncoderBounds.global_log_sigma`). Every node gets ``(L, E)``
with ``||v(x') - v(x)|| <= L ||x' - x|| + E`` from its inputs' by its rule (:mod:`.rules`); a chain of affine ops is
also bounded by the exact float64 norm of its materialised matrix when that is small (``min`` of the two). The
output head is read backwards from the output: scalar multiples and elementwise functions commute with the diagonal
whitening ``diag(w)`` (they contribute ``|c|`` and ``sup |phi'|``), then the affine ops before them form a block
``A`` whose Jacobian ``J_A`` is materialised once, so that per point ``L_w = factor ||diag(w) J_A||_2 L(cut)``
(``cut`` the node the block reads): the whitening applies whatever the head is made of, and exactly where the head
ends in an affine map. The bound is ``min`` of that and ``max(w) L(mu)``.

**Local** (:meth:`EncoderBounds.local`). Over the ball of radius R around x:

1. intervals of every node: exact for nodes affine in x (``v(x) +- R ||row_i(d v / d x)||_2``, the row norms
   computed once per model by pushing the identity basis through the affine ops), then each rule's interval map;
2. a diagonal carry forwards (:meth:`vaefast.certification.rules.Rule.carry`): every node's Jacobian is
   ``diag(a) M`` with ``|a| <= e`` (derivative bounds of the elementwise ops on their intervals) and ``||M|| <= L``
   (norms such as ``||W diag(e)||`` taken with the carried diagonal); at each head
   ``||diag(w') J_A diag(e_cut)||_2 L_cut``, ``w'`` the whitening times the commuting ops' local derivative bounds;
3. an interval Jacobian backwards from the outputs (seeds ``diag(w)`` at mu and ``I / 2`` at logvar) in centre-radius
   form through every rule (exact transposes for affine ops, the derivative ranges of elementwise ones, selections
   for sort / max); at every cut vertex v (all paths from the outputs to x pass through it) it encloses
   ``d out / d v`` on the ball, so ``sup ||J||_2 <= ||J_top(v) diag(e_v)||_int L_v`` with
   ``||.||_int = min(||C||_2 + ||R||_2, || |C| + R ||_2)`` (mean value theorem: the functions are piecewise smooth,
   the ranges cover both sides of every kink); at x itself this is the plain interval-Jacobian bound;
4. the local constant is the ``min`` of all of these and the global one (the interval Jacobian only where its work
   per ball, rows times the nodes' sizes, is at most ``INTERVAL_JACOBIAN_WORK``). A ball in which a function with a jump
   (softplus' threshold) may jump falls back to the global constants with their jump term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vaefast._memory import default_max_memory, rows_that_fit
from vaefast.certification.calls import CertificationRefused
from vaefast.certification.norms import MATERIALISE_LIMIT, row_scaled_norms, spectral_norm
from vaefast.certification.rules import Affine, Bounds, Concat, ConstantLike, Elementwise, Jac, Rule, Sum
from vaefast.certification.trace import Graph

__all__ = ["EncoderBounds", "Head", "backward", "lipschitz_constant"]

REGION_LIMIT = 2**21  # entries of a region's matrix materialised for its exact norm
REGION_SIDE = 512  # and its smaller side
INTERVAL_JACOBIAN_WORK = 2**19  # rows x node sizes per ball of the backward interval Jacobian (else the carry alone)
ISOMETRIES = ("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "permute", "transpose")


def _packet(rule: Rule) -> str:
    return rule.call.op.overloadpacket.__name__


def _refusal(graph: Graph, index: int, exc: CertificationRefused) -> CertificationRefused:
    return CertificationRefused(f"certify: {exc} ({graph.nodes[index].location})")


def backward(
    graph: Graph, seeds: dict[int, Jac], bounds: list[Bounds | None] | None, stop: int = 0, on_cut=None
) -> dict[int, Jac]:
    """Interval Jacobians ``d out / d v`` of every node ``v`` reached, backwards from ``seeds`` (node -> rows).

    Args:
        graph: the graph.
        seeds: ``{node: (centre, radius)}`` ``[N, rows, *shape]``.
        bounds: every node's interval (needed by nonlinear rules), or None for affine parts only.
        stop: the node where propagation ends (its Jacobian is returned, not propagated).
        on_cut: called as ``on_cut(node, jac)`` at every node all of the seeds' paths to x pass through (a cut
            vertex: then ``d out / d x = jac . d node / d x``), x included.

    Returns:
        ``{node: (centre, radius)}`` of the nodes where propagation ended (``stop``, and x).
    """
    acc = dict(seeds)
    for node in reversed(graph.nodes[stop + 1 :]):
        jac = acc.pop(node.index, None)
        if jac is None:
            continue
        if on_cut is not None and not acc:
            on_cut(node.index, jac)
        parts = node.rule.backward(jac, [bounds[i] for i in node.inputs] if bounds is not None else [])
        for i, part in zip(node.inputs, parts, strict=True):
            if part is not None:
                old = acc.get(i)
                acc[i] = part if old is None else (old[0] + part[0], old[1] + part[1])
    if on_cut is not None and list(acc) == [0]:
        on_cut(0, acc[0])
    return acc


@dataclass
class Head:
    """An output read backwards (module docstring): ``out = (commuting ops) o (affine block) o cut``.

    Attributes:
        factor: product of the commuting ops' constants (``|c|``, ``sup |phi'|``).
        commuting: those ops (scalar multiples and elementwise functions between the block and the output).
        top: the block's last node (the output itself when nothing commutes).
        cut: the node the block reads.
        jacobian: ``d top / d cut`` ``[numel(top), numel(cut)]`` (None: too large to materialise).
    """

    factor: float
    top: int
    cut: int
    jacobian: torch.Tensor | None
    commuting: tuple[int, ...] = ()


def _head(graph: Graph, out: int) -> Head:
    factor, i, commuting = 1.0, out, []
    while i != 0:  # the commuting ops at the top: scalars and elementwise functions
        rule = graph.nodes[i].rule
        if isinstance(rule, Affine) and rule.scalar is not None:
            factor *= abs(rule.scalar)
        elif isinstance(rule, Elementwise):
            factor *= rule.act.sup_derivative
        else:
            break
        commuting.append(i)
        i = graph.nodes[i].inputs[0]
    cut, _ = _region(graph, i)
    if cut is None:  # the affine block reads several nonlinear nodes: whiten the top itself
        cut = i
    return Head(factor, i, cut, _region_jacobian(graph, i, cut), tuple(commuting))


def _region(graph: Graph, top: int) -> tuple[int | None, list[int]]:
    """The affine ops (affine, sum, concat) that ``top`` is computed by from one node ``cut``: ``(cut, ops)``, or
    ``(None, ops)`` when they read several nonlinear nodes. ``top`` itself not affine: ``(top, [])``."""
    stack, seen, frontier, ops = [top], set(), set(), []
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        rule = graph.nodes[i].rule
        if i == 0 or not isinstance(rule, (Affine, Sum, Concat, ConstantLike)):
            frontier.add(i)
        elif not isinstance(rule, ConstantLike):
            ops.append(i)
            stack.extend(graph.nodes[i].inputs)
    if len(frontier) > 1:
        return None, ops
    return (frontier.pop() if frontier else 0), ops


def _region_jacobian(graph: Graph, top: int, cut: int) -> torch.Tensor | None:
    """``d top / d cut`` ``[numel(top), numel(cut)]`` through affine ops (None when too large)."""
    d, n = math.prod(graph.nodes[top].shape), math.prod(graph.nodes[cut].shape)
    if d * n > MATERIALISE_LIMIT:
        return None
    eye = torch.eye(d, dtype=torch.float64, device=graph.device).reshape(1, d, *graph.nodes[top].shape)
    jac = backward(graph, {top: (eye, torch.zeros_like(eye))}, None, stop=cut).get(cut)
    return torch.zeros(d, n, dtype=torch.float64, device=eye.device) if jac is None else jac[0].reshape(d, n)


def _region_norm(graph: Graph, index: int) -> tuple[int, float] | None:
    """``(cut, exact norm of d index / d cut)`` when node ``index`` ends a region of affine ops read from one node
    whose own bounds multiply (several ops that are not isometries, or a sum or concatenation), and its matrix is
    small (``REGION_LIMIT`` entries, smaller side at most ``REGION_SIDE``)."""
    users = graph.users[index]
    ends = index in graph.outputs or any(not isinstance(graph.nodes[u].rule, (Affine, Sum, Concat)) for u in users)
    if not ends:
        return None
    cut, ops = _region(graph, index)
    if cut is None or len(ops) - _isometries(graph, ops) < 2:
        return None
    m, n = math.prod(graph.nodes[index].shape), math.prod(graph.nodes[cut].shape)
    if m * n > REGION_LIMIT or min(m, n) > REGION_SIDE:
        return None
    jac = _region_jacobian(graph, index, cut)
    return None if jac is None else (cut, spectral_norm(jac))


def _isometries(graph: Graph, ops: list[int]) -> int:
    return sum(
        isinstance(graph.nodes[i].rule, Affine)
        and (_packet(graph.nodes[i].rule) in ISOMETRIES or graph.nodes[i].rule.scalar is not None)
        for i in ops
    )


class EncoderBounds:
    """Global and local constants of one traced encoder (module docstring); per-model work is cached."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.mu, self.logvar = (graph.outputs * 2)[:2]  # an encoder's (mu, logvar); any graph's first output twice
        self._constants: list[tuple[float, float]] | CertificationRefused | None = None
        self._heads: dict[int, Head] = {}
        self._row_norms: dict[int, torch.Tensor] | None = None

    # --- global ---------------------------------------------------------------------------------------------------
    def node_constants(self) -> list[tuple[float, float]]:
        """``(L, E)`` of every node (module docstring), computed once.

        Raises:
            CertificationRefused: an op without a global rule (named with where it sits).
        """
        if isinstance(self._constants, CertificationRefused):
            raise self._constants
        if self._constants is None:
            try:
                self._constants = self._propagate()
            except CertificationRefused as exc:
                self._constants = exc
                raise
        return self._constants

    def _propagate(self) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = [(1.0, 0.0)]
        for node in self.graph.nodes[1:]:
            try:
                lv, e = node.rule.lipschitz([out[i] for i in node.inputs])
            except CertificationRefused as exc:
                raise _refusal(self.graph, node.index, exc) from None
            if isinstance(node.rule, (Affine, Sum, Concat)):
                found = _region_norm(self.graph, node.index)
                if found is not None:
                    cut, exact = found
                    lv, e = min(lv, exact * out[cut][0]), min(e, exact * out[cut][1])
            out.append((lv, e))
        return out

    def head(self, out: int) -> Head:
        """The head of output node ``out`` (cached)."""
        if out not in self._heads:
            self._heads[out] = _head(self.graph, out)
        return self._heads[out]

    def global_mean(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_w, E_w)`` ``[B]`` of ``x -> diag(w_b) mu(x)`` per point.

        Args:
            w: ``[B, d]`` the whitening ``1 / sigma(x_b)``.

        Returns:
            Two float64 tensors ``[B]``.
        """
        constants = self.node_constants()
        w = w.double()
        top = w.max(dim=1).values
        lv, e = constants[self.mu]
        plain = top * lv
        head = self.head(self.mu)
        if head.jacobian is not None:
            lc = constants[head.cut][0]
            plain = torch.minimum(plain, head.factor * row_scaled_norms(head.jacobian, w) * lc)
        return plain, top * e

    def global_output(self, out: int) -> tuple[float, float]:
        """``(L, E)`` of output node ``out`` (the propagated constant, or the head's exact block norm if less)."""
        constants = self.node_constants()
        lv, e = constants[out]
        head = self.head(out)
        if head.jacobian is not None:
            lv = min(lv, head.factor * spectral_norm(head.jacobian) * constants[head.cut][0])
        return lv, e

    def global_log_sigma(self) -> tuple[float, float]:
        """``(L_s, E_s)`` of ``x -> log sigma(x) = logvar(x) / 2``."""
        lv, e = self.global_output(self.logvar)
        return lv / 2, e / 2

    # --- local ----------------------------------------------------------------------------------------------------
    def affine_nodes(self) -> set[int]:
        """The nodes that are affine functions of x (x itself, constants, affine ops of affine nodes)."""
        out = {0}
        for node in self.graph.nodes[1:]:
            rule = node.rule
            if isinstance(rule, ConstantLike) or (
                isinstance(rule, (Affine, Sum, Concat)) and all(i in out for i in node.inputs)
            ):
                out.add(node.index)
        return out

    def row_norms(self) -> dict[int, torch.Tensor]:
        """``||row_i(d v / d x)||_2`` of every affine node ``v`` read by a nonlinear op (computed once).

        Returns:
            ``{node: [*shape]}`` (float64).
        """
        if self._row_norms is None:
            self._row_norms = _row_norms(self.graph, self.affine_nodes())
        return self._row_norms

    def local(self, values: list[torch.Tensor], w: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Constants over the balls ``||x' - x_b|| <= radius[b, m]`` (module docstring).

        Args:
            values: every node's value at the points (:meth:`Graph.run`), ``[B, *shape]``.
            w: ``[B, d]`` the whitening ``1 / sigma(x_b)``.
            radius: ``[B, M]`` ball radii.

        Returns:
            ``(L_w, E_w, L_s, E_s)``, each ``[B, M]`` float64: ``||diag(w_b)(mu(x') - mu(x_b))|| <= L_w R + E_w``
            and ``||log sigma(x') - log sigma(x_b)|| <= L_s R + E_s`` on the ball.
        """
        b, m = radius.shape
        try:
            gw, ge = self.global_mean(w)
            gs, gse = self.global_log_sigma()
        except CertificationRefused:  # no global rule (exp, log): no fallback but infinity
            gw, ge, gs, gse = torch.full((b,), math.inf, dtype=torch.float64, device=w.device), 0.0, math.inf, 0.0
        gw, ge = gw.repeat_interleave(m), torch.as_tensor(ge, dtype=torch.float64).expand(b).repeat_interleave(m)
        flat = radius.reshape(-1).double()
        lw, ls, jumped = self._local_chunks(values, w.double().repeat_interleave(m, 0), flat, m)
        lw = torch.where(jumped, gw, torch.minimum(lw, gw))
        ls = torch.where(jumped, torch.full_like(ls, gs), ls.clamp_max(gs))
        ew = torch.where(jumped, ge.to(lw.device), torch.zeros_like(lw))
        es = torch.where(jumped, torch.full_like(ls, gse), torch.zeros_like(ls))
        return tuple(t.reshape(b, m) for t in (lw, ew, ls, es))

    def _local_chunks(self, values, w, radius, m) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nodes = self.graph.nodes
        rows = math.prod(nodes[self.mu].shape) + math.prod(nodes[self.logvar].shape)
        numels = [math.prod(n.shape) for n in nodes]
        per_ball = 8 * (4 * sum(numels) + 6 * rows * max(numels))
        size = rows_that_fit(per_ball, default_max_memory(radius.device), "the local bound of one ball")
        norms = self.row_norms()
        out = []
        for s in range(0, radius.shape[0], size):
            centre = {i: values[i].repeat_interleave(m, 0)[s : s + size] for i in norms}
            out.append(self._local_balls(centre, w[s : s + size], radius[s : s + size]))
        return tuple(torch.cat(parts) for parts in zip(*out, strict=True))

    def _local_balls(self, centre: dict[int, torch.Tensor], w: torch.Tensor, radius: torch.Tensor):
        bounds = self._ball_bounds(centre, radius)
        carry = self._carry(bounds, w)
        lw, ls = self._carried(carry, bounds, w)
        if self._interval_jacobian_affordable():
            iw, is_ = self._interval_jacobian(bounds, w, carry)
            lw, ls = torch.minimum(lw, iw), torch.minimum(ls, is_)
        lw, ls = torch.nan_to_num(lw, nan=math.inf), torch.nan_to_num(ls, nan=math.inf)
        return lw, ls, self._jumped(bounds, w.shape[0])

    def _interval_jacobian_affordable(self) -> bool:
        """Whether every rule has an interval Jacobian and its work per ball (rows x the nodes' sizes) is at most
        ``INTERVAL_JACOBIAN_WORK`` (wide convolutional encoders use the carry alone)."""
        nodes = self.graph.nodes
        rows = math.prod(nodes[self.mu].shape) + math.prod(nodes[self.logvar].shape)
        work = rows * sum(math.prod(node.shape) for node in nodes)
        return work <= INTERVAL_JACOBIAN_WORK and all(node.rule.has_backward for node in nodes[1:])

    def _interval_jacobian(self, bounds: list[Bounds | None], w: torch.Tensor, carry: list) -> tuple[torch.Tensor, ...]:
        """The interval-Jacobian bound of both outputs on the balls (module docstring, step 2), combined at every cut
        vertex v with the carry below it: ``sup ||J_top(v) diag(a_v) M_v|| <= ||J_top(v) diag(e_v)||_int L_v``."""
        nodes, (mu, lv) = self.graph.nodes, (self.mu, self.logvar)
        d_mu, d_lv = math.prod(nodes[mu].shape), math.prod(nodes[lv].shape)
        n, rows = w.shape[0], d_mu + d_lv
        scale = torch.cat([w, torch.full((n, d_lv), 0.5, dtype=w.dtype, device=w.device)], dim=1)
        full = torch.eye(rows, dtype=w.dtype, device=w.device)[None] * scale[:, :, None]  # diag(w), then I / 2
        seeds: dict[int, Jac] = {}
        for node, cols in ((mu, slice(0, d_mu)), (lv, slice(d_mu, rows))):
            jc = full[:, :, cols].reshape(n, rows, *nodes[node].shape)
            old = seeds.get(node)
            seeds[node] = (jc, torch.zeros_like(jc)) if old is None else (old[0] + jc, old[1])
        best = [torch.full((n,), math.inf, dtype=w.dtype, device=w.device) for _ in range(2)]

        def at_cut(index: int, jac: Jac) -> None:
            rule = self.graph.nodes[index].rule
            if carry[index] is None or (isinstance(rule, Affine) and (rule.copy or rule.scalar is not None)):
                return  # (the cut at a copy's or a scalar multiple's input is at least as tight)
            e, lv = carry[index]
            jc, jr = jac if e is None else (jac[0] * e.unsqueeze(1), jac[1] * e.unsqueeze(1))
            norms = _interval_norms(jc.flatten(2), jr.flatten(2), (d_mu, rows - d_mu))
            for k in range(2):
                best[k] = torch.minimum(best[k], norms[k] * lv)

        if not backward(self.graph, seeds, bounds, on_cut=at_cut):  # the outputs do not depend on x
            return torch.zeros_like(best[0]), torch.zeros_like(best[1])
        return best[0], best[1]

    def _carry(self, bounds: list[Bounds | None], w: torch.Tensor) -> list:
        """The diagonal carry ``(e, L)`` on the balls (:meth:`vaefast.certification.rules.Rule.carry`) of every node
        up to the heads' cuts (None after them: the heads use their own block Jacobian)."""
        n = w.shape[0]
        carry: list = [(None, torch.ones(n, dtype=w.dtype, device=w.device))]
        needed = self._below_cuts()
        for node in self.graph.nodes[1:]:
            if node.index not in needed:
                carry.append(None)
                continue
            carry.append(node.rule.carry([carry[i] for i in node.inputs], [bounds[i] for i in node.inputs]))
        return carry

    def _below_cuts(self) -> set[int]:
        """The heads' cuts and every node they are computed from."""
        stack, seen = [self.head(self.mu).cut, self.head(self.logvar).cut], set()
        while stack:
            i = stack.pop()
            if i not in seen:
                seen.add(i)
                stack.extend(self.graph.nodes[i].inputs)
        return seen

    def _carried(self, carry: list, bounds: list[Bounds | None], w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The carry bound of both outputs on the balls: ``||diag(w') J_A diag(e_cut)|| L_cut`` per head, ``w'`` the
        whitening times the commuting ops' local derivative bounds (module docstring)."""
        n = w.shape[0]
        out = []
        for node, scale in ((self.mu, w), (self.logvar, torch.full_like(w[:, :1], 0.5))):
            head = self.head(node)
            if head.jacobian is None:
                out.append(torch.full((n,), math.inf, dtype=w.dtype, device=w.device))
                continue
            scale = scale.expand(n, head.jacobian.shape[0])
            for i in head.commuting:
                rule = self.graph.nodes[i].rule
                if isinstance(rule, Elementwise):
                    lo, hi = rule.act.derivative_range(*bounds[self.graph.nodes[i].inputs[0]])
                    scale = scale * torch.maximum(lo.abs(), hi.abs()).flatten(1)
                else:
                    scale = scale * abs(rule.scalar)
            e, lv = carry[head.cut]
            scaled = scale[:, :, None] * head.jacobian[None]
            out.append(_spectral(scaled if e is None else scaled * e.flatten(1)[:, None, :]) * lv)
        return out[0], out[1]

    def _ball_bounds(self, centre: dict[int, torch.Tensor], radius: torch.Tensor) -> list[Bounds | None]:
        bounds: list[Bounds | None] = [None] * len(self.graph.nodes)
        affine, norms = self.affine_nodes(), self.row_norms()
        for node in self.graph.nodes:
            i = node.index
            if i in norms:
                r = radius.reshape(-1, *[1] * len(node.shape)) * norms[i]
                r = r + 1e-12 * (centre[i].abs() + r)
                bounds[i] = (centre[i] - r, centre[i] + r)
            elif i not in affine:
                bounds[i] = node.rule.interval(*[bounds[j] for j in node.inputs])
        return bounds

    def _jumped(self, bounds: list[Bounds | None], n: int) -> torch.Tensor:
        """Balls in which some function with a jump may jump."""
        out = torch.zeros(n, dtype=torch.bool, device=self.graph.device)
        for node in self.graph.nodes[1:]:
            if isinstance(node.rule, Elementwise) and node.rule.act.jump > 0:
                lo, hi = bounds[node.inputs[0]]
                for k in node.rule.act.kinks:
                    if k.values:
                        out |= ((lo <= k.at) & (k.at <= hi)).flatten(1).any(1)
        return out


def _interval_norms(jc: torch.Tensor, jr: torch.Tensor, blocks: tuple[int, ...]) -> list[torch.Tensor]:
    """Per block of rows of ``[N, rows, n]`` (sizes ``blocks``): an upper bound of ``||J||_2`` over
    ``|J - jc| <= jr``, ``min(||C|| + ||R||, || |C| + R ||)`` (module docstring); one batched eigensolve per block."""
    out, start = [], 0
    for size in blocks:
        c, r = jc[:, start : start + size], jr[:, start : start + size]
        start += size
        norms = _spectral(torch.cat([c, r, c.abs() + r])).reshape(3, -1)
        out.append(torch.minimum(norms[0] + norms[1], norms[2]))
    return out


def _spectral(m: torch.Tensor) -> torch.Tensor:
    """``||m_b||_2`` of a batch ``[N, rows, n]`` from the smaller Gram matrix (inflated for rounding)."""
    if m.shape[1] == 0 or m.shape[2] == 0:
        return torch.zeros(m.shape[0], dtype=m.dtype, device=m.device)
    gram = m @ m.transpose(1, 2) if m.shape[1] <= m.shape[2] else m.transpose(1, 2) @ m
    return torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt() * (1 + 1e-6)


def _row_norms(graph: Graph, affine: set[int]) -> dict[int, torch.Tensor]:
    """Row norms of ``d v / d x`` for the affine nodes read by nonlinear ones (identity basis pushed in chunks)."""
    needed = {i for i in affine if any(u not in affine for u in graph.users[i]) or i in graph.outputs}
    n_in = math.prod(graph.nodes[0].shape)
    device = graph.device
    per_row = 8 * sum(math.prod(graph.nodes[i].shape) for i in affine)
    size = rows_that_fit(per_row, default_max_memory(device), "one basis vector of the input")
    sums = {i: torch.zeros(graph.nodes[i].shape, dtype=torch.float64, device=device) for i in needed}
    order = sorted(affine)
    for s in range(0, n_in, size):
        c = min(size, n_in - s)
        basis = torch.zeros(c, n_in, dtype=torch.float64, device=device)
        basis[torch.arange(c, device=device), torch.arange(s, s + c, device=device)] = 1
        vals = {0: basis.reshape(c, *graph.nodes[0].shape)}
        for i in order[1:]:
            rule = graph.nodes[i].rule
            if isinstance(rule, ConstantLike):
                vals[i] = torch.zeros(c, *graph.nodes[i].shape, dtype=torch.float64, device=device)
                continue
            ins = [vals[j] for j in graph.nodes[i].inputs]
            vals[i] = rule.linear(ins[0]) if isinstance(rule, Affine) else rule.call(*ins)
        for i in needed:
            sums[i] += vals[i].pow(2).sum(0)
    return {i: v.sqrt() for i, v in sums.items()}


def lipschitz_constant(fn: object, owner: torch.nn.Module, example: torch.Tensor, output: int = 0) -> float:
    """A sound global l2 Lipschitz constant of any traced function (e.g. a decoder ``z -> g(z)``, an encoder head).

    Args:
        fn: ``x -> tensor`` or a tuple of tensors (traced with ``torch.export``).
        owner: the module whose parameters ``fn`` uses.
        example: example inputs ``[B, ...]``.
        output: which output.

    Returns:
        ``L`` with ``||fn(x') - fn(x)|| <= L ||x' - x||`` for all x, x' (plus the jump term, returned added when
        nonzero as ``inf``: a discontinuous function has no Lipschitz constant).

    Raises:
        CertificationRefused: an op without a global rule.
    """
    from vaefast.certification.trace import trace_function

    graph = trace_function(fn, owner, example, getattr(fn, "__qualname__", "the function"))
    lv, e = EncoderBounds(graph).global_output(graph.outputs[output])
    return lv if e == 0 else math.inf
