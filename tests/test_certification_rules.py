"""Property tests of the op rules of :mod:`vaefast.certification.rules`, each against autograd on the op itself.

For random weights, inputs and intervals (parameters of either sign):

- elementwise functions: the value range and the derivative range over an interval contain every value and every
  derivative that sampling and projected gradient ascent find there; ``sup |phi'|`` (plus the jump) bounds every
  difference quotient; the rule's function is the ATen op's;
- affine ops (Linear with and without bias, convolutions of every kind, transposed convolutions, pooling, batch
  norm, padding modes, reshapes, constant scales): the norm bound is at least the exact operator norm of the op's
  Jacobian (materialised by autograd), intervals contain every sampled output, and the interval Jacobian is the
  Jacobian;
- sort (GroupSort), max over a dimension, max pooling, add, cat: intervals contain sampled outputs, interval
  Jacobians contain sampled Jacobians, global constants bound sampled difference quotients.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vaefast.certification import CertificationRefused
from vaefast.certification.bounds import EncoderBounds
from vaefast.certification.calls import Call, Var
from vaefast.certification.rules import Affine, Context, build_rule
from vaefast.certification.trace import trace_function
from vaefast.models.lipschitz import GroupSort

torch.set_num_threads(1)
D64 = torch.float64

ELEMENTWISE = [
    ("relu", {}),
    ("leaky_relu", {"negative_slope": 0.2}),
    ("leaky_relu", {"negative_slope": -0.5}),
    ("leaky_relu", {"negative_slope": 1.7}),
    ("elu", {"alpha": 1.0, "scale": 1.0, "input_scale": 1.0}),
    ("elu", {"alpha": 3.0, "scale": 1.0, "input_scale": 1.0}),
    ("elu", {"alpha": -2.0, "scale": 0.7, "input_scale": 1.5}),
    ("selu", {}),
    ("celu", {"alpha": 0.5}),
    ("gelu", {"approximate": "none"}),
    ("gelu", {"approximate": "tanh"}),
    ("silu", {}),
    ("mish", {}),
    ("softplus", {"beta": 1.0, "threshold": 20.0}),
    ("softplus", {"beta": 2.0, "threshold": 1.0}),
    ("softplus", {"beta": 0.5, "threshold": 3.0}),
    ("tanh", {}),
    ("sigmoid", {}),
    ("hardtanh", {"min_val": -2.0, "max_val": 0.5}),
    ("clamp", {"min": 0.3}),
    ("abs", {}),
    ("exp", {}),
]


def _elementwise_rule(name: str, params: dict):
    op = getattr(torch.ops.aten, name).default
    ctx = Context(((64,),), (64,), torch.device("cpu"))
    return build_rule(Call(op, {"self": Var(0), **params}), ctx)


def _intervals(g: torch.Generator, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    centre = torch.randn(1, n, generator=g, dtype=D64) * 3
    width = torch.rand(1, n, generator=g, dtype=D64) * torch.tensor([0.0, 0.01, 0.5, 4.0], dtype=D64).repeat(16)
    return centre - width, centre + width


def _derivatives(rule, t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(rule.call(t).sum(), t)
    return g


def _ascend(rule, lo, hi, sign: float, on_derivative: bool) -> torch.Tensor:
    """Projected gradient ascent of ``sign * phi`` (or ``sign * phi'``) inside ``[lo, hi]``, from random starts."""
    t = (lo + (hi - lo) * torch.rand((16, *lo.shape[1:]), dtype=D64)).requires_grad_(True)
    opt = torch.optim.Adam([t], lr=0.05)
    for _ in range(60):
        with torch.enable_grad():
            value = _derivatives_graph(rule, t) if on_derivative else rule.call(t)
            if not value.requires_grad:  # a piecewise constant derivative: sampling saw every value
                break
            opt.zero_grad()
            (-(sign * value).sum()).backward()
        opt.step()
        with torch.no_grad():
            t.copy_(torch.maximum(torch.minimum(t, hi), lo))
    return _derivatives(rule, t) if on_derivative else rule.call(t).detach()


def _derivatives_graph(rule, t):
    (g,) = torch.autograd.grad(rule.call(t).sum(), t, create_graph=True)
    return g


@pytest.mark.parametrize(("name", "params"), ELEMENTWISE, ids=[f"{n}{sorted(p.values())}" for n, p in ELEMENTWISE])
def test_elementwise_ranges_contain_what_sampling_and_ascent_find(name, params):
    rule = _elementwise_rule(name, params)
    g = torch.Generator().manual_seed(hash(name) % 1000)
    lo, hi = _intervals(g)
    t = lo + (hi - lo) * torch.rand((400, 64), generator=g, dtype=D64)
    t = torch.cat([t, lo, hi])
    torch.testing.assert_close(rule.act.fn(t), rule.call(t), rtol=1e-12, atol=1e-12)
    out_lo, out_hi = rule.interval((lo, hi))
    d_lo, d_hi = rule.act.derivative_range(lo, hi)
    for sign in (1.0, -1.0):
        values = torch.cat([rule.call(t), _ascend(rule, lo, hi, sign, False)])
        assert bool((values >= out_lo).all() and (values <= out_hi).all())
        derivs = torch.cat([_derivatives(rule, t), _ascend(rule, lo, hi, sign, True)])
        assert bool((derivs >= d_lo).all() and (derivs <= d_hi).all())
    wide = torch.linspace(-30, 30, 20001, dtype=D64)[None]
    sup = rule.act.sup_derivative
    assert float(_derivatives(rule, wide).abs().max()) <= sup
    a, b = wide[:, :-1], wide[:, 1:]  # difference quotients across every kink and jump
    assert bool(((rule.call(b) - rule.call(a)).abs() <= sup * (b - a) + rule.act.jump + 1e-12).all())


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [("elu", {"alpha": 1.0, "scale": 1.0, "input_scale": -1.0}, "input_scale"),
     ("softplus", {"beta": -1.0, "threshold": 20.0}, "beta"), ("celu", {"alpha": -1.0}, "alpha")],
)  # fmt: skip
def test_parameters_without_a_sound_rule_are_refused_by_name(name, params, message):
    with pytest.raises(CertificationRefused, match=message):
        _elementwise_rule(name, params)
    exp = _elementwise_rule("exp", {})
    with pytest.raises(CertificationRefused, match="no global Lipschitz constant"):
        exp.lipschitz([(1.0, 0.0)])


class _Op(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _affine_cases(g: torch.Generator) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    def rnd(m: nn.Module) -> nn.Module:
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        return m.double().eval()

    bn = rnd(nn.BatchNorm2d(3))
    bn.running_mean.normal_(generator=g)
    bn.running_var.uniform_(0.1, 3, generator=g)
    return [
        ("linear", rnd(nn.Linear(7, 5)), (7,)),
        ("linear_nobias", rnd(nn.Linear(7, 9, bias=False)), (7,)),
        ("conv1d", rnd(nn.Conv1d(2, 3, 3, stride=2, padding=1)), (2, 9)),
        ("conv2d_dilated", rnd(nn.Conv2d(1, 1, 3, stride=2, dilation=2)), (1, 9, 9)),
        ("conv2d_groups", rnd(nn.Conv2d(4, 6, 3, padding=2, groups=2, dilation=2)), (4, 6, 6)),
        ("conv2d_reflect", rnd(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")), (2, 5, 5)),
        ("conv2d_replicate", rnd(nn.Conv2d(2, 3, 3, stride=2, padding=2, padding_mode="replicate")), (2, 6, 6)),
        ("conv2d_circular", rnd(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular")), (1, 5, 5)),
        ("conv2d_same", rnd(nn.Conv2d(2, 2, 4, padding="same", dilation=2)), (2, 7, 7)),
        ("conv3d", rnd(nn.Conv3d(1, 2, 2, stride=(1, 2, 1), padding=1)), (1, 3, 4, 4)),
        ("conv_transpose1d", rnd(nn.ConvTranspose1d(2, 3, 4, stride=2, padding=1)), (2, 5)),
        (
            "conv_transpose2d",
            rnd(nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2)),
            (4, 3, 3),
        ),  # fmt: skip
        ("avg_pool2d", nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True), (2, 6, 6)),
        ("adaptive_avg_pool2d", nn.AdaptiveAvgPool2d((2, 3)), (1, 5, 7)),
        ("batch_norm", bn, (3, 4, 4)),
        ("flatten_unflatten", nn.Sequential(nn.Flatten(), nn.Unflatten(1, (4, 6))), (2, 3, 4)),
        ("permute_reshape", _Op(lambda x: x.permute(0, 2, 1).reshape(x.shape[0], -1)), (3, 4)),
        ("scale_tensor", _Op(lambda x: x * torch.linspace(-2, 3, 6, dtype=D64) - 1.5), (6,)),
        ("standardise", _Op(lambda x: (x - 0.5) / 0.02), (5,)),
        ("pad_reflect", _Op(lambda x: nn.functional.pad(x, (2, 1, 1, 2), mode="reflect")), (2, 4, 4)),
        ("mean_sum", _Op(lambda x: torch.cat([x.mean(dim=2), x.sum(dim=(1, 2), keepdim=True)[:, 0]], 1)), (3, 4)),
        ("expand", _Op(lambda x: x[:, :, None].expand(-1, -1, 3).flatten(1)), (4,)),
    ]


def _jacobian(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.func.jacrev(lambda t: module(t[None])[0])(x[0]).reshape(-1, x[0].numel())


def test_affine_rules_bound_the_exact_norm_and_propagate_exactly():
    """Every affine op: the norm bound >= the exact norm; graph constant >= exact; intervals contain samples; the
    interval Jacobian is the op's Jacobian (radius 0)."""
    g = torch.Generator().manual_seed(0)
    for name, module, shape in _affine_cases(g):
        x = torch.randn(3, *shape, generator=g, dtype=D64)
        graph = trace_function(module, module, x, name)
        exact = float(torch.linalg.matrix_norm(_jacobian(module, x).detach(), ord=2))
        bounds = EncoderBounds(graph)
        constant = bounds.global_output(graph.outputs[0])[0]
        assert constant >= exact * (1 - 1e-9), (name, constant, exact)
        for node in graph.nodes[1:]:
            if isinstance(node.rule, Affine) and len(graph.nodes) == 2:
                assert node.rule.norm() >= exact * (1 - 1e-9), name
        lo = x[:1] - torch.rand((1, *shape), generator=g, dtype=D64)
        hi = x[:1] + torch.rand((1, *shape), generator=g, dtype=D64)
        sample = lo + (hi - lo) * torch.rand((200, *shape), generator=g, dtype=D64)
        out_lo, out_hi = _graph_interval(graph, lo, hi)
        with torch.no_grad():
            out = module(sample)
        assert bool((out >= out_lo - 1e-9).all() and (out <= out_hi + 1e-9).all()), name
        jac = _interval_jacobian(graph, lo, hi)
        torch.testing.assert_close(jac[0][0].reshape(jac[0].shape[1], -1), _jacobian(module, x[:1]), rtol=1e-10,
                                   atol=1e-10)  # fmt: skip
        assert float(jac[1].abs().max()) <= 1e-12, name


def _graph_interval(graph, lo, hi):
    bounds = [(lo, hi)]
    for node in graph.nodes[1:]:
        bounds.append(node.rule.interval(*[bounds[i] for i in node.inputs]))
    return bounds[graph.outputs[0]]


def _interval_jacobian(graph, lo, hi):
    from vaefast.certification.bounds import backward

    bounds = [(lo, hi)]
    for node in graph.nodes[1:]:
        bounds.append(node.rule.interval(*[bounds[i] for i in node.inputs]))
    out = graph.nodes[graph.outputs[0]]
    n = math.prod(out.shape)
    eye = torch.eye(n, dtype=D64).reshape(1, n, *out.shape)
    return backward(graph, {out.index: (eye, torch.zeros_like(eye))}, bounds)[0]


SELECTIONS = [
    ("groupsort2", GroupSort(2), (8,)),
    (
        "groupsort4_desc",
        _Op(lambda x: x.reshape(x.shape[0], 2, 4).sort(dim=-1, descending=True).values.flatten(1)),
        (8,),
    ),  # fmt: skip
    ("max_dim", _Op(lambda x: x.reshape(x.shape[0], 3, 3).max(dim=2).values), (9,)),
    ("amin_keepdim", _Op(lambda x: x.amin(dim=1, keepdim=True) + x), (5,)),
    ("residual_cat", _Op(lambda x: torch.cat([torch.relu(x) + x, torch.tanh(x)], dim=1)), (4,)),
]


@pytest.mark.parametrize(("name", "module", "shape"), SELECTIONS, ids=[s[0] for s in SELECTIONS])
def test_selection_rules_contain_sampled_values_and_jacobians(name, module, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *shape, generator=g, dtype=D64)
    graph = trace_function(module, module, x, name)
    constant = EncoderBounds(graph).global_output(graph.outputs[0])[0]
    for width in (0.0, 0.05, 0.6):
        lo, hi = x[:1] - width, x[:1] + width
        sample = torch.cat([x[:1], lo + 2 * width * torch.rand((300, *shape), generator=g, dtype=D64)])
        out_lo, out_hi = _graph_interval(graph, lo, hi)
        out = module(sample)
        assert bool((out >= out_lo - 1e-12).all() and (out <= out_hi + 1e-12).all())
        jc, jr = _interval_jacobian(graph, lo, hi)
        for s in sample[:40]:
            jac = torch.func.jacrev(lambda t: module(t[None])[0])(s).reshape(jc.shape[1:])
            assert bool(((jac - jc[0]).abs() <= jr[0] + 1e-12).all()), name
    a, b = sample[:-1], sample[1:]
    quotient = (module(a) - module(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert float(quotient.max()) <= constant * (1 + 1e-12)


def test_max_pool_has_a_global_rule_and_a_carry():
    pool = nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1), nn.Flatten())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 2, 6, 6, generator=g, dtype=D64)
    graph = trace_function(pool, pool, x, "pool")
    constant = EncoderBounds(graph).global_output(graph.outputs[0])[0]
    quotient = (pool(x[:-1]) - pool(x[1:])).norm(dim=1) / (x[:-1] - x[1:]).flatten(1).norm(dim=1)
    assert float(quotient.max()) <= constant <= 2.0 + 1e-6  # each input lies in at most 4 windows
    lo, hi = _graph_interval(graph, x[:1] - 0.3, x[:1] + 0.3)
    assert bool(((pool(x[:1] + 0.6 * torch.rand(50, 2, 6, 6, dtype=D64) - 0.3) - lo) >= -1e-12).all())
    assert not graph.nodes[1].rule.has_backward  # the local bound of a max-pooling encoder uses the carry alone


def test_ops_acting_across_the_batch_or_without_rules_are_refused_by_name():
    x = torch.randn(4, 6, dtype=D64)
    cases = [
        (_Op(lambda t: t - t.mean(dim=0)), "batch dimension"),
        (_Op(lambda t: t * t), "multiplies or divides two inputs"),
        (_Op(lambda t: t / (1 + t.abs())), "divides"),
        (nn.LayerNorm(6).double(), "aten.layer_norm.default normalises each point"),
        (_Op(lambda t: t.softmax(dim=1)), "softmax"),
        (_Op(lambda t: t[torch.argsort(t[:, 0])]), "argsort.default at .* does not compute a floating tensor"),
    ]
    for module, message in cases:
        with pytest.raises(CertificationRefused, match=message) as info:
            trace_function(module, module, x, "f")
        assert "\n" not in str(info.value)


def test_column_scaled_norms_bound_the_exact_norm_closely():
    from vaefast.certification.norms import column_scaled_norms

    g = torch.Generator().manual_seed(3)
    for out_f, in_f in ((7, 30), (40, 12), (64, 64)):
        w = torch.randn(out_f, in_f, generator=g, dtype=D64)
        scale = torch.rand(9, in_f, generator=g, dtype=D64) * (torch.rand(9, in_f, generator=g, dtype=D64) > 0.3)
        scale[0] = 0
        bound = column_scaled_norms(w.T @ w, scale)
        exact = torch.linalg.matrix_norm(w[None] * scale[:, None, :], ord=2)
        assert bool((bound >= exact).all()) and bool((bound <= exact * 1.05 + 1e-12).all())


class _Mixed(nn.Module):
    """Every kind of rule on one path: conv, batch norm, max pooling, GroupSort, residual add, concatenation."""

    def __init__(self, pool: bool):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(2)
        self.pool = nn.MaxPool2d(2) if pool else nn.AvgPool2d(2)
        self.fc, self.skip = nn.Linear(8, 6), nn.Linear(16, 6)
        self.mu, self.logvar = nn.Linear(12, 3), nn.Linear(12, 3)

    def forward(self, x):
        h = self.pool(nn.functional.elu(self.bn(self.conv(x)), 2.0)).flatten(1)
        h = GroupSort(2)(torch.tanh(self.fc(h))) + 0.5 * self.skip(x.flatten(1))
        h = torch.cat([h, nn.functional.silu(h)], dim=1)
        return self.mu(h), 2 * torch.tanh(self.logvar(h) / 2)


@pytest.mark.parametrize("pool", [False, True], ids=["avgpool", "maxpool"])
def test_local_constants_bound_the_jacobian_on_the_ball(pool):
    """The local constants (carry, interval Jacobian at every cut, global) bound ``||diag(w) J_mu(x')||_2`` and
    ``||J_log_sigma(x')||_2`` at sampled points of the ball and where gradient ascent on those norms ends."""
    from vaefast.certification import EncoderCertifier
    from vaefast.models import as_vae

    torch.manual_seed(5)
    enc = _Mixed(pool).double().eval()
    with torch.no_grad():
        enc.bn.running_mean.normal_()
        enc.bn.running_var.uniform_(0.5, 2)
    model = as_vae(enc, nn.Sequential(nn.Linear(3, 16), nn.Unflatten(1, (1, 4, 4))).double(), likelihood="gaussian",
                   decoder_output="mean")  # fmt: skip
    x = torch.rand(2, 1, 4, 4, dtype=D64)
    certifier = EncoderCertifier.for_model(model, x)
    values = certifier.graph.run(x)
    w = torch.exp(-0.5 * model.encode(x)[1]).detach()
    radius = torch.tensor([[0.0, 0.02, 0.2]] * 2, dtype=D64)
    lw, _, ls, _ = certifier.bounds.local(values, w, radius)

    def norms(t, b):
        jm = torch.func.jacrev(lambda s: model.encode(s[None])[0][0])(t).reshape(3, -1)
        jl = torch.func.jacrev(lambda s: 0.5 * model.encode(s[None])[1][0])(t).reshape(3, -1)
        return torch.linalg.matrix_norm(w[b][:, None] * jm, ord=2), torch.linalg.matrix_norm(jl, ord=2)

    g = torch.Generator().manual_seed(6)
    for b in range(2):
        for m, rad in enumerate(radius[b].tolist()):
            found = [norms(x[b], b)]
            for k in range(2):
                d = torch.randn(x[b].shape, generator=g, dtype=D64)
                t = (x[b] + rad * torch.rand(1, generator=g, dtype=D64) * d / d.norm()).requires_grad_(True)
                for _ in range(15 if rad > 0 else 0):
                    (grad,) = torch.autograd.grad(norms(t, b)[k], t)
                    with torch.no_grad():
                        t += 0.2 * rad * grad / grad.norm().clamp_min(1e-12)
                        t.copy_(x[b] + (t - x[b]) * (rad / (t - x[b]).norm().clamp_min(1e-300)).clamp(max=1))
                found.append(norms(t.detach(), b))
            assert max(float(f[0]) for f in found) <= float(lw[b, m]) * (1 + 1e-9), (b, rad)
            assert max(float(f[1]) for f in found) <= float(ls[b, m]) * (1 + 1e-9), (b, rad)
