"""vaefast.reparam_sample: bit-identity with the pure-PyTorch reference and across splits, N(0, 1) quality
of eps (scipy KS test, correlations), autograd, opcheck, torch.compile and input checks.

Tests with a ``device`` argument run on every device (tests/conftest.py): the op on that device against the
reference on CPU, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

import vaefast
from vaefast import ops, reference

COMPILED = vaefast.has_compiled_ops()
needs_ops = pytest.mark.skipif(not COMPILED, reason="vaefast._C not built")


def _inputs(B: int, d: int, dtype: torch.dtype, seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(B, d, generator=g, dtype=torch.float64).to(dtype)
    logvar = (3 * torch.randn(B, d, generator=g, dtype=torch.float64)).to(dtype)
    return mu.to(device), logvar.to(device)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def test_philox_known_answers():
    """Random123's published Philox4x32-10 test vectors."""
    z = torch.zeros(1, dtype=torch.int64)
    f = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    assert [int(v) for v in reference.philox4x32_10((z, z, z, z), 0, 0)] == [
        0x6627E8D5,
        0xE169C58D,
        0xBC57AC4C,
        0x9B00DBD8,
    ]
    assert [int(v) for v in reference.philox4x32_10((f, f, f, f), 0xFFFFFFFF, 0xFFFFFFFF)] == [
        0x408F276D,
        0x41C83B0E,
        0xA20BC7C6,
        0x6D5451FD,
    ]


def test_exp_det_matches_exp():
    x = torch.linspace(-80, 80, 20001, dtype=torch.float64)
    rel64 = ((reference.exp_det(x) - torch.exp(x)) / torch.exp(x)).abs().max().item()
    assert rel64 < 1e-15
    xf = x.float()
    rel32 = ((reference.exp_det(xf).double() - torch.exp(xf.double())) / torch.exp(xf.double())).abs().max().item()
    assert rel32 < 4e-7


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("trial", range(3))
def test_op_equals_reference_bitwise(dtype, trial, device):
    rng = np.random.default_rng(100 + trial)
    B, S, d = int(rng.integers(1, 9)), int(rng.integers(1, 70)), int(rng.integers(1, 14))
    seed, offset, sample_offset = int(rng.integers(0, 2**63)), int(rng.integers(0, 2**40)), int(rng.integers(0, 9))
    mu, logvar = _inputs(B, d, dtype, trial)
    z = torch.ops.vaefast.reparam_sample(mu.to(device), logvar.to(device), S, seed, offset, sample_offset)
    z_ref = reference.reparam_sample(mu, logvar, S, seed, offset, sample_offset)
    assert z.shape == (B, S, d) and z.dtype == dtype and z.device.type == device
    assert torch.equal(_bits(z.cpu()), _bits(z_ref))


@needs_ops
def test_unit_gaussian_gives_eps_exactly(device):
    """mu = 0, logvar = 0: sigma is exactly 1, so z is eps bit for bit (also across the 2^32 point boundary)."""
    B, S, d = 5, 40, 11
    zeros = torch.zeros(B, d, device=device)
    z = ops.reparam_sample(zeros, zeros, S, seed=2**40 + 3, offset=2**32 - 2)
    eps = reference.reparam_eps(B, S, d, seed=2**40 + 3, offset=2**32 - 2)
    assert torch.equal(_bits(z.cpu()), _bits(eps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_invariance_points_and_samples(dtype, device):
    mu, logvar = _inputs(11, 6, dtype, 7, device)
    full = ops.reparam_sample(mu, logvar, 30, seed=5, offset=100)
    pts = torch.cat(
        [ops.reparam_sample(mu[a:b], logvar[a:b], 30, seed=5, offset=100 + a) for a, b in [(0, 4), (4, 5), (5, 11)]]
    )
    assert torch.equal(_bits(full), _bits(pts))
    smp = torch.cat(
        [
            ops.reparam_sample(mu, logvar, b - a, seed=5, offset=100, sample_offset=a)
            for a, b in [(0, 7), (7, 8), (8, 30)]
        ],
        dim=1,
    )
    assert torch.equal(_bits(full), _bits(smp))
    other_seed = ops.reparam_sample(mu, logvar, 30, seed=6, offset=100)
    assert not torch.equal(full, other_seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_point_ids_key_each_row_by_its_id(dtype, device):
    """Rows keyed by arbitrary ids (any order, repeats, past 2^32) draw the numbers of those ids: the op equals the
    reference and the same rows drawn one by one with ``offset = id``."""
    mu, logvar = _inputs(6, 7, dtype, 9, device)
    ids = torch.tensor([3, 2**33 + 1, 3, 0, 17, 2], device=device)
    z = ops.reparam_sample(mu, logvar, 13, seed=11, offset=5, sample_offset=2, point_ids=ids)
    z_ref = reference.reparam_sample(mu.cpu(), logvar.cpu(), 13, 11, 5, 2, ids.cpu())
    assert torch.equal(_bits(z.cpu()), _bits(z_ref))
    one_by_one = torch.cat(
        [ops.reparam_sample(mu[i : i + 1], logvar[i : i + 1], 13, seed=11, offset=5 + int(ids[i]), sample_offset=2)
         for i in range(6)]
    )  # fmt: skip
    assert torch.equal(_bits(z), _bits(one_by_one))
    zeros = torch.zeros(6, 7, dtype=dtype, device=device)
    eps = ops.reparam_sample(zeros, zeros, 13, seed=11, offset=5, point_ids=ids)
    assert torch.equal(eps[0], eps[2]) and not torch.equal(eps[0], eps[3])  # a repeated id repeats its numbers
    default = ops.reparam_sample(mu, logvar, 13, seed=11, offset=5, point_ids=torch.arange(6))
    assert torch.equal(default, ops.reparam_sample(mu, logvar, 13, seed=11, offset=5))


@pytest.mark.parametrize(
    ("ids", "exc", "match"),
    [
        (torch.tensor([0.0, 1.0]), TypeError, "point_ids"),
        (torch.tensor([0, 1, 2]), ValueError, "point_ids"),
        (torch.tensor([0, -1]), ValueError, "point_ids"),
        ([0, 1], TypeError, "point_ids"),
    ],
)
def test_bad_point_ids(ids, exc, match):
    with pytest.raises(exc, match=match):
        ops.reparam_sample(torch.zeros(2, 3), torch.zeros(2, 3), 4, point_ids=ids)


def test_reference_path_split_invariance():
    mu, logvar = _inputs(6, 5, torch.float32, 3)
    full = reference.reparam_sample(mu, logvar, 9, 1, 0, 0)
    parts = torch.cat([reference.reparam_sample(mu[i : i + 1], logvar[i : i + 1], 9, 1, i, 0) for i in range(6)])
    assert torch.equal(full, parts)


def test_eps_is_standard_normal():
    """KS test against N(0, 1), and near-zero correlation across samples, latent dims and points."""
    B, S, d = 40, 500, 8
    mu, logvar = torch.zeros(B, d), torch.zeros(B, d)
    eps = ops.reparam_sample(mu, logvar, S, seed=11).double()
    flat = eps.reshape(-1).numpy()
    assert scipy.stats.kstest(flat, "norm").pvalue > 1e-3
    assert abs(flat.mean()) < 5 / np.sqrt(flat.size) and abs(flat.var() - 1) < 0.02
    bound = 5 / np.sqrt(B * S)  # ~5 standard errors of a correlation of independent normals
    x = eps.reshape(B * S, d).numpy()
    corr_dims = np.corrcoef(x, rowvar=False)[np.triu_indices(d, 1)]
    assert np.abs(corr_dims).max() < bound * 1.2  # within-block (4q..4q+3) and across-block latent pairs
    consecutive_samples = np.corrcoef(eps[:, :-1].reshape(-1), eps[:, 1:].reshape(-1))[0, 1]
    consecutive_points = np.corrcoef(eps[:-1].reshape(-1), eps[1:].reshape(-1))[0, 1]
    assert abs(consecutive_samples) < bound and abs(consecutive_points) < bound
    # the two Box-Muller outputs of one pair are uncorrelated also in their squares (radius shared)
    sq = x[:, 0] ** 2 - 1, x[:, 1] ** 2 - 1
    assert abs(np.corrcoef(*sq)[0, 1]) < 0.05


def test_moments_of_z():
    mu = torch.tensor([[1.0, -2.0, 0.5]])
    logvar = torch.tensor([[0.0, 2.0, -3.0]])
    z = ops.reparam_sample(mu, logvar, 20000, seed=3).double()[0]
    sigma = torch.exp(logvar[0].double() / 2)
    assert torch.allclose(z.mean(0), mu[0].double(), atol=5 * sigma.max().item() / np.sqrt(20000))
    assert torch.allclose(z.std(0), sigma, rtol=0.03)


def test_gradcheck_float64(device):
    mu, logvar = _inputs(3, 5, torch.float64, 1, device)
    mu.requires_grad_(True)
    logvar.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m, v: ops.reparam_sample(m, v, 4, seed=9, offset=2), (mu, logvar))
    assert torch.autograd.gradcheck(lambda m, v: reference.reparam_sample(m, v, 4, 9, 2, 0), (mu, logvar))
    ids = torch.tensor([7, 0, 7], device=device)
    assert torch.autograd.gradcheck(lambda m, v: ops.reparam_sample(m, v, 4, seed=9, point_ids=ids), (mu, logvar))


def test_gradient_formula(device):
    mu, logvar = _inputs(2, 3, torch.float64, 4, device)
    mu.requires_grad_(True)
    logvar.requires_grad_(True)
    z = ops.reparam_sample(mu, logvar, 6, seed=1)
    w = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    (z * w).sum().backward()
    eps = reference.reparam_eps(2, 6, 3, seed=1).double().to(device)
    sigma = torch.exp(logvar.detach() / 2)
    torch.testing.assert_close(mu.grad, w.sum(1))
    torch.testing.assert_close(logvar.grad, 0.5 * (w * sigma.unsqueeze(1) * eps).sum(1))


@needs_ops
def test_opcheck(device):
    mu, logvar = _inputs(3, 6, torch.float64, 2, device)
    mu.requires_grad_(True)
    logvar.requires_grad_(True)
    torch.library.opcheck(torch.ops.vaefast.reparam_sample.default, (mu, logvar, 5, 1, 0, 0))
    ids = torch.tensor([4, 4, 1], device=device)
    torch.library.opcheck(torch.ops.vaefast.reparam_sample.default, (mu, logvar, 5, 1, 2, 0, ids))
    # float32 without grad: schema and fake kernel only (the full check above covers autograd and AOT)
    args32 = (mu.detach().float(), logvar.detach().float(), 2, 3, 7, 1)
    torch.library.opcheck(
        torch.ops.vaefast.reparam_sample.default, args32, test_utils=("test_schema", "test_faketensor")
    )


@needs_ops
def test_torch_compile_fake_kernel(device):
    mu, logvar = _inputs(4, 5, torch.float32, 3, device)

    def f(m, v):
        return torch.ops.vaefast.reparam_sample(m, v, 8, 2, 0, 0).square().mean(1)

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(mu, logvar), f(mu, logvar))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"mu": "x"}, TypeError, "mu"),
        ({"mu": torch.zeros(3)}, ValueError, "mu"),
        ({"logvar": torch.zeros(2, 4)}, ValueError, "logvar"),
        ({"logvar": torch.zeros(2, 3, dtype=torch.float64)}, TypeError, "logvar"),
        ({"mu": torch.zeros(2, 3, dtype=torch.int64)}, TypeError, "mu"),
        ({"mu": torch.tensor([[0.0, float("nan"), 0.0]] * 2)}, ValueError, "mu"),
        ({"logvar": torch.tensor([[0.0, float("inf"), 0.0]] * 2)}, ValueError, "logvar"),
        ({"mu": torch.zeros(0, 3), "logvar": torch.zeros(0, 3)}, ValueError, "mu"),
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_samples": 2.0}, TypeError, "num_samples"),
        ({"seed": -1}, ValueError, "seed"),
        ({"offset": -1}, ValueError, "offset"),
        ({"sample_offset": 2**32}, ValueError, "sample_offset"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    args = {"mu": torch.zeros(2, 3), "logvar": torch.zeros(2, 3), "num_samples": 4}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.reparam_sample(**args)


def test_non_contiguous_inputs(device):
    base_mu, base_lv = _inputs(6, 8, torch.float32, 5, device)
    mu, logvar = base_mu[::2, ::2], base_lv[::2, ::2]
    assert not mu.is_contiguous()
    assert torch.equal(
        ops.reparam_sample(mu, logvar, 3, seed=4), ops.reparam_sample(mu.contiguous(), logvar.contiguous(), 3, seed=4)
    )
