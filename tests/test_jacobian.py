"""Encoder Jacobians: the fused MLP op, the torch.func exact path, Hutchinson, spectral norms.

Oracle: ``torch.func.vmap(torch.func.jacrev(f))`` on the module/function itself (independent of vaefast's code).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vaefast import has_compiled_ops
from vaefast import reference as ref
from vaefast.jacobian import encoder_jacobian, jacobian_frobenius, jacobian_spectral, mlp_spec
from vaefast.ops import mlp_activation_param, mlp_jacobian_frobenius

needs_op = pytest.mark.skipif(not has_compiled_ops(), reason="compiled ops not built")

ACTIVATIONS = list(ref.MLP_ACTIVATIONS)
PARAMS = {"leaky_relu": 0.2, "elu": 0.6, "softplus": 1.7}  # non-default parameters
# (D, H_1, ..., d): 1, 2 and 3 layers; H_1 < D (Gram path chosen) and H_1 > D (direct product)
SHAPES = [(7, 3), (9, 5, 3), (6, 11, 4), (10, 6, 8, 3), (5, 9, 7, 4)]


def _mlp(shape, dtype, seed, scale=1.3):
    gen = torch.Generator().manual_seed(seed)
    weights = [
        torch.randn(o, i, generator=gen, dtype=torch.float64).mul(scale / i**0.5).to(dtype)
        for i, o in zip(shape[:-1], shape[1:], strict=True)
    ]
    biases = [torch.randn(o, generator=gen, dtype=torch.float64).to(dtype) for o in shape[1:]]
    x = torch.randn(8, shape[0], generator=gen, dtype=torch.float64).mul(2).to(dtype)
    return x, weights, biases


def _jacrev_norm(f, x):
    """||J||_F per point with torch.func on a per-point function (float64 oracle)."""
    jac = torch.func.vmap(torch.func.jacrev(lambda t: f(t.unsqueeze(0)).squeeze(0)))(x)
    return jac.flatten(1).norm(dim=1), jac.flatten(2)


def _op(x, weights, biases, act, param, first_gram, device="cpu"):
    """The compiled op on ``device`` when built, else the pure-PyTorch reference (which has no Gram path); the
    result comes back to the CPU."""
    x, weights, biases = x.to(device), [w.to(device) for w in weights], [b.to(device) for b in biases]
    first_gram = None if first_gram is None else first_gram.to(device)
    if has_compiled_ops():
        return torch.ops.vaefast.mlp_jacobian_frobenius(x, weights, biases, act, param, first_gram).cpu()
    return ref.mlp_jacobian_frobenius(x, weights, biases, act, param).cpu()


def _oracle(x, weights, biases, act, param):
    x, weights, biases = x.double(), [w.double() for w in weights], [b.double() for b in biases]
    return _jacrev_norm(lambda t: ref.mlp_forward(t, weights, biases, act, param), x)[0]


# --- the fused op ----------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_op_matches_jacrev_float64(act, shape, device):
    param = mlp_activation_param(act, PARAMS.get(act))
    x, weights, biases = _mlp(shape, torch.float64, seed=len(shape) * 100 + shape[1])
    expected = _oracle(x, weights, biases, act, param)
    gram = weights[0] @ weights[0].T
    for first_gram in (None, gram):  # direct product / op's own choice, and the Gram path
        out = _op(x, weights, biases, act, param, first_gram, device)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(mlp_jacobian_frobenius(x, weights, biases, act, param), expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_op_float32(act, device):
    param = mlp_activation_param(act, PARAMS.get(act))
    x, weights, biases = _mlp((12, 16, 9, 4), torch.float32, seed=7)
    expected = _oracle(x, weights, biases, act, param)
    for first_gram in (None, weights[0] @ weights[0].T):
        out = _op(x, weights, biases, act, param, first_gram, device)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=0)


def test_public_op_matches_oracle_any_build():
    """The public entry (compiled op or reference fallback) for a wide-ish 3-layer net; half precision in float32."""
    x, weights, biases = _mlp((30, 20, 25, 5), torch.float64, seed=3)
    expected = _oracle(x, weights, biases, "gelu", 0.0)
    torch.testing.assert_close(mlp_jacobian_frobenius(x, weights, biases, "gelu"), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(
        ref.mlp_jacobian_frobenius(x, weights, biases, "gelu", 0.0), expected, rtol=1e-10, atol=0
    )
    half = mlp_jacobian_frobenius(x.bfloat16(), [w.bfloat16() for w in weights], [b.bfloat16() for b in biases], "gelu")
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), expected, rtol=5e-2, atol=0)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_op_blocked_triangular_gram(act, device):
    """H1 = 300: the first layer's triangular Gram product runs in 3 column blocks (128, 128, 44)."""
    x, weights, biases = _mlp((400, 300, 20, 3), torch.float64, seed=9)
    x = x[:3]
    expected = _oracle(x, weights, biases, act, 0.0)
    for first_gram in (None, weights[0] @ weights[0].T):
        out = _op(x, weights, biases, act, 0.0, first_gram, device)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=0)


def test_op_edge_cases(device):
    # a pure linear map: ||J||_F = ||W||_F everywhere
    x, weights, biases = _mlp((6, 4), torch.float64, seed=1)
    out = _op(x, weights, biases, "relu", 0.0, None, device)
    torch.testing.assert_close(out, weights[0].norm().expand(x.shape[0]), rtol=1e-12, atol=0)
    # pre-activations exactly 0 (ReLU'(0) = 0, LeakyReLU'(0) = slope, as torch) and softplus beyond threshold 20
    x, weights, biases = _mlp((5, 6, 3), torch.float64, seed=2)
    x[0] = 0
    biases[0][:3] = 0
    x[1] = 40.0
    for act, param in [("relu", 0.0), ("leaky_relu", 0.1), ("elu", 1.0), ("softplus", 2.0)]:
        out = _op(x, weights, biases, act, param, None, device)
        torch.testing.assert_close(out, _oracle(x, weights, biases, act, param), rtol=1e-10, atol=0)
    # non-contiguous inputs
    x, weights, biases = _mlp((9, 5, 3), torch.float64, seed=4)
    xt = x.T.contiguous().T
    wt = [w.T.contiguous().T for w in weights]
    out = _op(xt, wt, biases, "tanh", 0.0, None, device)
    torch.testing.assert_close(out, _oracle(x, weights, biases, "tanh", 0.0), rtol=1e-10, atol=0)


@needs_op
def test_gram_cache_sees_inplace_updates():
    model = nn.Sequential(nn.Linear(12, 5), nn.SiLU(), nn.Linear(5, 3)).double()
    x = torch.randn(4, 12, dtype=torch.float64)
    before = jacobian_frobenius(model, x)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    after = jacobian_frobenius(model, x)
    torch.testing.assert_close(after, jacobian_frobenius(model, x, method="exact"), rtol=1e-10, atol=0)
    assert not torch.allclose(before, after)


@needs_op
def test_opcheck(device):
    x, weights, biases = _mlp((10, 6, 7, 3), torch.float64, seed=5)
    x, weights, biases = x.to(device), [w.to(device) for w in weights], [b.to(device) for b in biases]
    gram = weights[0] @ weights[0].T
    for first_gram in (None, gram):
        torch.library.opcheck(
            torch.ops.vaefast.mlp_jacobian_frobenius, (x, weights, biases, "sigmoid", 0.0, first_gram)
        )


def test_op_bad_inputs():
    x, weights, biases = _mlp((9, 5, 3), torch.float64, seed=6)
    with pytest.raises(ValueError, match="x must have 2"):
        mlp_jacobian_frobenius(x[0], weights, biases, "relu")
    with pytest.raises(TypeError, match="x must have dtype"):
        mlp_jacobian_frobenius(x.long(), weights, biases, "relu")
    with pytest.raises(ValueError, match="x contains NaN"):
        mlp_jacobian_frobenius(x.clone().fill_(float("nan")), weights, biases, "relu")
    w_bad = weights[1].clone()
    mlp_jacobian_frobenius(x, [weights[0], w_bad], biases, "relu")  # checked finite once, remembered
    w_bad[0, 0] = float("nan")  # an in-place change invalidates what was remembered
    with pytest.raises(ValueError, match=r"weights\[1\] contains NaN"):
        mlp_jacobian_frobenius(x, [weights[0], w_bad], biases, "relu")
    with pytest.raises(ValueError, match=r"biases\[0\] contains NaN"):
        mlp_jacobian_frobenius(x, weights, [biases[0] * float("inf"), biases[1]], "relu")
    with pytest.raises(ValueError, match="x is empty"):
        mlp_jacobian_frobenius(x[:0], weights, biases, "relu")
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        mlp_jacobian_frobenius(x, [weights[0], weights[1][:, :4]], biases, "relu")
    with pytest.raises(ValueError, match="biases"):
        mlp_jacobian_frobenius(x, weights, biases[:1], "relu")
    with pytest.raises(ValueError, match=r"biases\[0\]"):
        mlp_jacobian_frobenius(x, weights, [biases[0][:2], biases[1]], "relu")
    with pytest.raises(TypeError, match=r"weights\[0\] has dtype"):
        mlp_jacobian_frobenius(x, [weights[0].float(), weights[1]], biases, "relu")
    with pytest.raises(TypeError, match="weights must be"):
        mlp_jacobian_frobenius(x, [], [], "relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        mlp_jacobian_frobenius(x, weights, biases, "swish")
    with pytest.raises(ValueError, match="softplus beta"):
        mlp_jacobian_frobenius(x, weights, biases, "softplus", 0.0)
    with pytest.raises(TypeError, match="activation_param"):
        mlp_jacobian_frobenius(x, weights, biases, "elu", "1")
    if has_compiled_ops():  # the C++ checks too (a direct call bypasses the Python ones)
        with pytest.raises(ValueError, match="activation must be one of"):
            torch.ops.vaefast.mlp_jacobian_frobenius(x, weights, biases, "swish", 0.0, None)
        with pytest.raises(ValueError, match="first_gram"):
            torch.ops.vaefast.mlp_jacobian_frobenius(x, weights, biases, "relu", 0.0, weights[0])


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_cuda_matches_cpu(act):
    param = mlp_activation_param(act, PARAMS.get(act))
    x, weights, biases = _mlp((20, 12, 9, 4), torch.float64, seed=8)
    cpu = mlp_jacobian_frobenius(x, weights, biases, act, param)
    gpu = mlp_jacobian_frobenius(x.cuda(), [w.cuda() for w in weights], [b.cuda() for b in biases], act, param)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-10, atol=0)


# --- jacobian_frobenius / encoder_jacobian / jacobian_spectral on modules --------------------------


def _conv_encoder():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ELU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()


def _module_oracle(module, x):
    return _jacrev_norm(module, x)


@pytest.mark.parametrize(
    "module",
    [
        nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Softplus(beta=2.0), nn.Linear(7, 3)),
        nn.Sequential(nn.Linear(12, 6), nn.GELU(approximate="tanh"), nn.Linear(6, 5), nn.GELU("tanh"), nn.Linear(5, 2)),
        nn.Sequential(nn.Linear(12, 4)),
    ],
    ids=["flatten-softplus", "gelu_tanh-3", "linear"],
)
def test_jacobian_frobenius_mlp_module(module):
    module = module.double()
    assert mlp_spec(module) is not None
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    if type(module[0]) is not nn.Flatten:
        x = x.flatten(1)
    expected, jac = _module_oracle(module, x)
    for method in ("auto", "exact", "fused"):
        torch.testing.assert_close(jacobian_frobenius(module, x, method=method), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(jacobian_frobenius(module, x, squared=True), expected**2, rtol=1e-10, atol=0)
    torch.testing.assert_close(encoder_jacobian(module, x), jac, rtol=1e-10, atol=1e-14)


def test_mlp_spec_rejects_what_the_op_cannot_do():
    assert mlp_spec(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2))) is None
    assert mlp_spec(nn.Sequential(nn.Linear(4, 3), nn.ReLU())) is None
    assert mlp_spec(nn.Sequential(nn.Linear(4, 3), nn.Softplus(threshold=5.0), nn.Linear(3, 2))) is None
    assert mlp_spec(nn.Linear(4, 3)) is None
    spec = mlp_spec(nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False), nn.LeakyReLU(0.3), nn.Linear(3, 2)))
    assert spec.flatten and spec.activation == "leaky_relu" and spec.activation_param == pytest.approx(0.3)
    assert torch.equal(spec.biases[0], torch.zeros(3))


def test_jacobian_frobenius_general_module_and_chunking():
    model = _conv_encoder()
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    expected, jac = _module_oracle(model, x)
    for method in ("auto", "exact"):
        torch.testing.assert_close(jacobian_frobenius(model, x, method=method), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(jacobian_frobenius(model, x, chunk_size=2), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(encoder_jacobian(model, x, chunk_size=3), jac, rtol=1e-10, atol=1e-14)
    value, stderr = jacobian_frobenius(model, x, return_stderr=True)
    assert torch.equal(stderr, torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="fused"):
        jacobian_frobenius(model, x, method="fused")
    # a plain function works too
    torch.testing.assert_close(jacobian_frobenius(lambda t: model(t) * 2, x), 2 * expected, rtol=1e-10, atol=0)


def test_no_graph_and_requires_grad_untouched():
    model = _conv_encoder()
    model[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    mlp = nn.Sequential(nn.Linear(36, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    outs = [
        jacobian_frobenius(model, x),
        jacobian_frobenius(model, x, method="hutchinson", num_probes=4),
        jacobian_spectral(model, x),
        encoder_jacobian(model, x),
        jacobian_frobenius(mlp, x.flatten(1)),
    ]
    assert not any(o.requires_grad for o in outs)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters()) and x.grad is None


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_unbiased(probe):
    model = _conv_encoder()
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    exact_sq = _module_oracle(model, x)[0] ** 2
    est, se = jacobian_frobenius(
        model, x, method="hutchinson", num_probes=3000, seed=11, probe=probe, return_stderr=True, squared=True
    )
    assert bool((se > 0).all())
    z = (est - exact_sq) / se
    assert bool((z.abs() < 4.5).all()), z
    # the norm form: sqrt of the same mean, delta-method stderr
    norm, norm_se = jacobian_frobenius(
        model, x, method="hutchinson", num_probes=3000, seed=11, probe=probe, return_stderr=True
    )
    torch.testing.assert_close(norm, est.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(norm_se, se / (2 * est.sqrt()), rtol=1e-12, atol=0)


def test_hutchinson_deterministic_and_chunk_invariant():
    model = _conv_encoder()
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    a = jacobian_frobenius(model, x, method="hutchinson", num_probes=6, seed=3)
    b = jacobian_frobenius(model, x, method="hutchinson", num_probes=6, seed=3, chunk_size=2)
    c = jacobian_frobenius(model, x, method="hutchinson", num_probes=6, seed=4)
    tail = jacobian_frobenius(model, x[2:], method="hutchinson", num_probes=6, seed=3)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    assert not torch.allclose(a, c)
    # probes are keyed by the global point id point_offset + b: any sub-batch with its offset reproduces its rows
    head = jacobian_frobenius(model, x[:3], method="hutchinson", num_probes=6, seed=3)
    torch.testing.assert_close(head, a[:3], rtol=1e-13, atol=0)
    assert tail.shape == (3,) and not torch.allclose(tail, a[2:])
    shifted = jacobian_frobenius(model, x[2:], method="hutchinson", num_probes=6, seed=3, point_offset=2)
    torch.testing.assert_close(shifted, a[2:], rtol=1e-13, atol=0)


def test_jacobian_spectral():
    model = _conv_encoder()
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    jac = _module_oracle(model, x)[1]
    torch.testing.assert_close(jacobian_spectral(model, x), torch.linalg.matrix_norm(jac, ord=2), rtol=1e-10, atol=0)
    scale = torch.rand(6, 3, dtype=torch.float64) + 0.1
    expected = torch.linalg.matrix_norm(scale.unsqueeze(-1) * jac, ord=2)
    torch.testing.assert_close(jacobian_spectral(model, x, row_scale=scale), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(jacobian_spectral(model, x, row_scale=scale, chunk_size=4), expected, rtol=1e-10, atol=0)
    # more outputs than inputs (the A^T A branch), an MLP (explicit chain rule)
    wide = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 7)).double()
    xw = torch.randn(4, 3, dtype=torch.float64)
    jw = _module_oracle(wide, xw)[1]
    torch.testing.assert_close(jacobian_spectral(wide, xw), torch.linalg.matrix_norm(jw, ord=2), rtol=1e-10, atol=0)
    # spectral <= Frobenius
    assert bool((jacobian_spectral(model, x) <= jacobian_frobenius(model, x) * (1 + 1e-12)).all())


def test_jacobian_api_bad_inputs():
    model = _conv_encoder()
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(TypeError, match="fn must be callable"):
        jacobian_frobenius(3, x)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        jacobian_frobenius(model, x.numpy())
    with pytest.raises(ValueError, match="x must have a leading batch"):
        jacobian_frobenius(model, torch.randn(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="x contains NaN"):
        jacobian_frobenius(model, x * float("nan"))
    with pytest.raises(ValueError, match="method must be one of"):
        jacobian_frobenius(model, x, method="svd")
    with pytest.raises(ValueError, match="num_probes only applies"):
        jacobian_frobenius(model, x, num_probes=10)
    with pytest.raises(ValueError, match="num_probes must be"):
        jacobian_frobenius(model, x, method="hutchinson", num_probes=0)
    with pytest.raises(ValueError, match="probe must be one of"):
        jacobian_frobenius(model, x, method="hutchinson", probe="sobol")
    with pytest.raises(ValueError, match="seed must be"):
        jacobian_frobenius(model, x, method="hutchinson", seed=-1)
    with pytest.raises(ValueError, match="point_offset must be"):
        jacobian_frobenius(model, x, method="hutchinson", point_offset=-1)
    with pytest.raises(ValueError, match="fn must map"):
        jacobian_frobenius(lambda t: (model(t), model(t)), x)
    with pytest.raises(ValueError, match="row_scale must be"):
        jacobian_spectral(model, x, row_scale=torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="row_scale must be"):
        jacobian_spectral(model, x, row_scale=torch.ones(3, 3, dtype=torch.float64))
