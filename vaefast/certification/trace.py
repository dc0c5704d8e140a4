"""The encoder as what it computes: ``model.encode`` traced by ``torch.export`` (non-strict, the batch dimension
dynamic) into a graph of ATen ops from x to ``(mu, logvar)``.

Names are never read: whatever the forward does (pre-processing arithmetic, any submodule names, residual adds,
concatenations, reshapes, a soft clamp of logvar, parametrized weights) is in the graph. Ops that do not depend on x
(parameters, their parametrizations) are evaluated once, in the model's dtype, and become constants (float64 for the
rules). Every op that depends on x gets its rule from :func:`vaefast.certification.rules.build_rule`; an op that
cannot be traced, has no rule, or acts across the batch dimension is a :class:`CertificationRefused` naming the op,
the module it sits in and its graph node. :meth:`Graph.check` confirms on given points that the graph reproduces
``model.encode`` to float tolerance.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx, nn
from torch.export import Dim

from vaefast._checks import eval_mode
from vaefast.certification.calls import Call, CertificationRefused, Sym, Var, has_placeholder
from vaefast.certification.rules import Context, Rule, build_rule

__all__ = ["Graph", "Node", "trace_encoder", "trace_function"]

_SKIPPED = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch.ops.aten._assert_async.msg,
    torch._C._set_grad_enabled,
}


@dataclass
class Node:
    """One op of the graph: its rule, the nodes it reads (that depend on x), its per-point shape, where it sits."""

    index: int
    rule: Rule | None  # None: the input x
    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    where: str  # the op and where it sits, e.g. "aten.conv2d.default at encoder.body.0 (Conv2d) (graph node 'conv2d')"
    location: str = ""  # where it sits alone


@dataclass
class Graph:
    """The traced function: ``nodes[0]`` is x, ``outputs`` the output nodes (``(mu, logvar)`` for an encoder),
    ``device`` where its constants live."""

    nodes: list[Node]
    outputs: tuple[int, ...]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    users: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.users = [[] for _ in self.nodes]
        for node in self.nodes:
            for i in node.inputs:
                self.users[i].append(node.index)

    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every node's value at the points ``x`` (float64).

        Args:
            x: ``[N, *input_shape]``.

        Returns:
            One tensor ``[N, *shape]`` per node.
        """
        values = [x.double()]
        for node in self.nodes[1:]:
            values.append(node.rule.forward(*[values[i] for i in node.inputs]))
        return values

    def check(self, x: torch.Tensor, reference: tuple[torch.Tensor, ...], what: str) -> list[torch.Tensor]:
        """The node values at ``x``, after confirming that the outputs reproduce ``reference`` to float tolerance
        (``|a - b| <= sqrt(eps) (1 + |b|)``, eps of the reference's dtype).

        Raises:
            CertificationRefused: naming the output that differs and by how much.
        """
        values = self.run(x)
        for k, (i, ref) in enumerate(zip(self.outputs, reference, strict=True)):
            tol = math.sqrt(torch.finfo(ref.dtype).eps)
            gap = (values[i] - ref.double()).abs() - tol * (1 + ref.double().abs())
            if values[i].shape != ref.shape or bool((gap > 0).any()) or not bool(torch.isfinite(values[i]).all()):
                worst = float((values[i] - ref.double()).abs().max()) if values[i].shape == ref.shape else math.nan
                raise CertificationRefused(
                    f"certify: the traced graph does not reproduce {what} (output {k}: max deviation {worst:.3g}, "
                    f"tolerance {tol:.2g} relative): the forward is not the function that was traced"
                )
        return values


class _Wrapped(nn.Module):
    def __init__(self, fn: Any, owner: nn.Module) -> None:
        super().__init__()
        self.model, self.fn = owner, fn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.fn(x)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def trace_encoder(model: nn.Module, x: torch.Tensor) -> Graph:
    """``model.encode`` as a :class:`Graph` with outputs ``(mu, logvar)``.

    Args:
        model: a protocol model (an ``nn.Module``), traced in eval mode.
        x: example points ``[B, *input_shape]`` on the model's device, in its dtype.

    Returns:
        The graph.

    Raises:
        CertificationRefused: untraceable, an op without a rule, or not two outputs.
    """
    graph = trace_function(model.encode, model, x, "model.encode")
    if len(graph.outputs) != 2:
        raise CertificationRefused(f"certify: model.encode returns {len(graph.outputs)} tensors, not (mu, logvar)")
    return graph


def trace_function(fn: Any, owner: nn.Module, x: torch.Tensor, what: str) -> Graph:
    """Any function of a batch ``x -> tensor(s)`` computed by ``owner``'s parameters, as a :class:`Graph`.

    Args:
        fn: the function (e.g. ``model.encode``, ``model.decode``).
        owner: the module whose parameters it uses (put in eval mode while tracing).
        x: example inputs ``[B, ...]``.
        what: its name in messages.

    Returns:
        The graph (checked to reproduce ``fn(x)``).
    """
    example = x[:2] if x.shape[0] >= 2 else x.expand(2, *x.shape[1:]).clone()
    with torch.no_grad(), eval_mode(owner):
        try:
            program = torch.export.export(_Wrapped(fn, owner), (example,), dynamic_shapes=({0: Dim.DYNAMIC},),
                                          strict=False)  # fmt: skip
        except Exception as exc:  # noqa: BLE001  (any tracing failure is a refusal that names its cause)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CertificationRefused(
                f"certify: cannot trace {what} with torch.export ({type(exc).__name__}: {first[:300]})"
            ) from exc
        graph = _Builder(program.module(), x.device, what).build()
        graph.check(example, _Wrapped(fn, owner)(example), what)
    return graph


# --- building the graph -------------------------------------------------------------------------------------------
@dataclass
class _Multi:
    """An op with several outputs that depends on x, waiting for ``getitem``."""

    call: Call
    inputs: tuple[int, ...]
    fx_node: fx.Node


def _functional(op: torch._ops.OpOverload) -> torch._ops.OpOverload:
    name = op.overloadpacket.__name__
    if name.endswith("_") and not name.endswith("__"):
        return getattr(getattr(torch.ops.aten, name[:-1]), op._overloadname)
    return op


def _bind(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = {}
    for i, a in enumerate(op._schema.arguments):
        if i < len(args) and not a.kwarg_only:
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        elif a.has_default_value():
            bound[a.name] = a.default_value
    return bound


def _where(n: fx.Node, with_op: bool = True) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    path = ""
    if stack:
        path, kind = list(stack.values())[-1]
        path = path.removeprefix("model.").removeprefix("L['self'].model.")
        kind = getattr(kind, "__name__", str(kind).rsplit(".", 1)[-1].strip("'>"))
        path = "" if kind == "_Wrapped" else f"{path} ({kind})" if path else kind
    location = f"at {path or 'the top level'} (graph node {n.name!r})"
    return f"{n.target} {location}" if with_op else location


class _Builder:
    """Walks an exported graph module once (module docstring)."""

    def __init__(self, gm: fx.GraphModule, device: torch.device, what: str) -> None:
        self.gm, self.device, self.what = gm, device, what
        self.env: dict[str, Any] = {}
        self.nodes: list[Node] = []
        self.batch: sympy.Symbol | None = None
        self.outputs: tuple[int, ...] = ()

    def build(self) -> Graph:
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                self._input(n)
            elif n.op == "get_attr":
                self.env[n.name] = _attr(self.gm, n.target)
            elif n.op == "call_function" and n.target not in _SKIPPED:
                self._call(n)
            elif n.op == "output":
                self._output(n)
        return Graph(self.nodes, self.outputs, self.device)

    def _input(self, n: fx.Node) -> None:
        if self.nodes:
            raise CertificationRefused(f"certify: {self.what} takes more than one tensor input")
        val = n.meta["val"]
        self.batch = val.shape[0].node.expr
        self.nodes.append(Node(0, None, (), tuple(int(s) for s in val.shape[1:]), "the input x"))
        self.env[n.name] = _VarRef(0)

    def _output(self, n: fx.Node) -> None:
        refs = [self.env[a.name] if isinstance(a, fx.Node) else a for a in n.args[0]]
        if not all(isinstance(r, _VarRef) for r in refs):
            raise CertificationRefused(f"certify: an output of {self.what} does not depend on x per point")
        self.outputs = tuple(r.index for r in refs)

    def _call(self, n: fx.Node) -> None:
        if not n.users:  # unused (e.g. the indices of a sort): nothing to certify
            return
        if n.target is operator.getitem:
            return self._getitem(n)
        inputs: list[int] = []
        args = self._resolve(n.args, inputs)
        kwargs = self._resolve(n.kwargs, inputs)
        if not has_placeholder((args, kwargs), Var) and not has_placeholder((args, kwargs), Sym):
            self.env[n.name] = n.target(*args, **kwargs)  # a constant: parameters and what is computed from them
            return
        val = n.meta.get("val")
        if isinstance(val, (torch.SymInt, int)):
            self.env[n.name] = self._sym(val, n)
            return
        if not isinstance(n.target, torch._ops.OpOverload):
            raise CertificationRefused(f"certify: {_where(n)} is not an ATen op: no rule")
        op = _functional(n.target)
        call = Call(op, _bind(op, _as_float64(args), _as_float64(kwargs)))
        if isinstance(val, (tuple, list)):
            self.env[n.name] = _Multi(call, tuple(inputs), n)
            return
        self._node(call, tuple(inputs), n, val)

    def _getitem(self, n: fx.Node) -> None:
        source, k = self.env[n.args[0].name], n.args[1]
        if isinstance(source, _Multi):
            self._node(Call(source.call.op, source.call.args, k), source.inputs, n, n.meta.get("val"), source.fx_node)
        elif isinstance(source, (_VarRef, Sym)):
            raise CertificationRefused(f"certify: {_where(n)} indexes an input that depends on x: no rule")
        else:
            self.env[n.name] = source[k]

    def _resolve(self, value: Any, inputs: list[int]) -> Any:
        if isinstance(value, fx.Node):
            entry = self.env[value.name]
            if isinstance(entry, _VarRef):
                if entry.index not in inputs:
                    inputs.append(entry.index)
                return Var(inputs.index(entry.index))
            if isinstance(entry, _Multi):
                raise CertificationRefused(f"certify: {_where(value)} is used as a whole: no rule")
            return entry
        if isinstance(value, (list, tuple)):
            return type(value)(self._resolve(v, inputs) for v in value)
        if isinstance(value, dict):
            return {k: self._resolve(v, inputs) for k, v in value.items()}
        return value

    def _sym(self, val: torch.SymInt | int, n: fx.Node) -> Sym | int:
        if isinstance(val, int):
            return val
        expr = val.node.expr
        if expr.free_symbols - {self.batch}:
            raise CertificationRefused(f"certify: {_where(n)} has a size that depends on more than the batch")
        fn = sympy.lambdify(self.batch, expr)
        return Sym(lambda b: int(fn(b)), str(expr))

    def _node(self, call: Call, inputs: tuple[int, ...], n: fx.Node, val: Any, source: fx.Node | None = None) -> None:
        origin = n if source is None else source
        location = _where(origin, with_op=False)
        where = f"{origin.target}{'' if source is None else f'[{call.out_index}]'} {location}"
        if not isinstance(val, torch.Tensor) or not val.is_floating_point():
            raise CertificationRefused(f"certify: {where} does not compute a floating tensor from x: no rule")
        first = val.shape[0].node.expr if val.dim() and isinstance(val.shape[0], torch.SymInt) else None
        if str(first) != str(self.batch):
            raise CertificationRefused(f"certify: {where} changes the batch dimension (it would mix points): no rule")
        if not all(isinstance(s, int) for s in val.shape[1:]):
            raise CertificationRefused(f"certify: {where} has a per-point shape that depends on the batch")
        inputs = inputs or (0,)  # an op of the batch size alone (zeros(B, d)) reads it from x
        ctx = Context(tuple(self.nodes[i].shape for i in inputs), tuple(int(s) for s in val.shape[1:]), self.device)
        try:
            rule = build_rule(call, ctx)
        except CertificationRefused as exc:
            raise CertificationRefused(f"certify: {exc} ({location})") from None
        index = len(self.nodes)
        self.nodes.append(Node(index, rule, inputs, ctx.out_shape, where, location))
        self.env[n.name] = _VarRef(index)


@dataclass(frozen=True)
class _VarRef:
    index: int


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach() if isinstance(obj, torch.Tensor) else obj


def _as_float64(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.double()
    if isinstance(value, (list, tuple)):
        return type(value)(_as_float64(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_float64(v) for k, v in value.items()}
    return value
