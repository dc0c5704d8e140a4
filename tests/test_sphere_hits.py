"""vaefast.sphere_hits: exact integer equality with a float64 reference (integer-valued data so every sum of
squares is exact), radii exactly at sample distances, any radii order, K = 0, non-contiguous inputs,
returned distances, opcheck and input checks.

Tests with a ``device`` argument run on every device (tests/conftest.py): the op on that device against the
reference and an exact integer oracle on CPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vaefast
from vaefast import ops, reference

COMPILED = vaefast.has_compiled_ops()
needs_ops = pytest.mark.skipif(not COMPILED, reason="vaefast._C not built")


def _integer_data(B: int, S: int, D: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(-4, 5, (B, S, D), generator=g).to(dtype)
    c = torch.randint(-2, 3, (B, D), generator=g).to(dtype)
    return y, c


def _brute_force_hits(y: torch.Tensor, c: torch.Tensor, radii: list[float]) -> torch.Tensor:
    """Independent oracle: exact integer sums of squares, compared as ss <= r^2 in exact rationals when
    r is the square root of an integer, else via float64 sqrt."""
    ss = ((y.to(torch.int64) - c.to(torch.int64).unsqueeze(1)) ** 2).sum(-1)  # exact
    dist = torch.from_numpy(np.sqrt(ss.numpy().astype(np.float64)))
    if y.dtype != torch.float64:
        dist = torch.from_numpy(np.sqrt(ss.numpy().astype(np.float32)).astype(np.float64))
    return torch.stack([(dist <= r).sum(1) for r in radii], dim=1) if radii else torch.zeros(y.shape[0], 0).long()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("trial", range(3))
def test_exact_equality_with_reference(dtype, trial, device):
    rng = np.random.default_rng(trial)
    B, S, D = int(rng.integers(1, 7)), int(rng.integers(1, 120)), int(rng.integers(1, 70))
    y, c = _integer_data(B, S, D, trial, dtype)
    dist_ref = reference.sphere_distances(y, c)
    # radii exactly at sample distances (as the distance dtype returns them), plus in-between values
    at = dist_ref.reshape(-1)[torch.randperm(B * S, generator=torch.Generator().manual_seed(trial))[:10]]
    radii = torch.cat([at.double(), at.double() + 1e-9, at.double() - 1e-9, torch.tensor([0.5, 1e6])])
    radii = radii[radii > 0][torch.randperm(int((radii > 0).sum()))]  # any order
    hits, dist = (t.cpu() for t in ops.sphere_hits(y.to(device), c.to(device), radii, return_distances=True))
    assert hits.dtype == torch.int64 and hits.shape == (B, radii.numel())
    assert torch.equal(hits, reference.sphere_hits(y, c, radii))
    assert torch.equal(hits, _brute_force_hits(y, c, radii.tolist()))
    assert torch.equal(dist, dist_ref)
    # a radius equal to a returned distance counts that sample
    b, s = divmod(int(rng.integers(0, B * S)), S)
    h = ops.sphere_hits(y[b : b + 1].to(device), c[b : b + 1].to(device), float(dist[b, s]))
    assert h.item() == int((dist[b] <= dist[b, s]).sum()) and h.item() >= 1


def test_sqrt_of_integers_boundary(device):
    """Distances sqrt(n) for non-square n: radii just below/above in float64 count correctly."""
    y = torch.zeros(1, 3, 2)
    y[0, 0] = torch.tensor([1.0, 1.0])  # sqrt 2
    y[0, 1] = torch.tensor([1.0, 2.0])  # sqrt 5
    y[0, 2] = torch.tensor([3.0, 4.0])  # 5
    c = torch.zeros(1, 2)
    s2 = float(np.float32(math.sqrt(2)))
    radii = [5.0, math.nextafter(5.0, 0), s2, math.nextafter(s2, 0), 10.0]
    assert ops.sphere_hits(y.to(device), c.to(device), radii).tolist() == [[3, 2, 1, 0, 3]]


def test_radii_order_and_duplicates(device):
    y, c = _integer_data(3, 50, 9, 5)
    y, c = y.to(device), c.to(device)
    radii = torch.tensor([7.0, 2.0, 9.5, 2.0, 4.0, 100.0, 0.1])
    hits = ops.sphere_hits(y, c, radii)
    order = torch.argsort(radii)
    sorted_hits = ops.sphere_hits(y, c, radii[order])
    assert torch.equal(hits[:, order], sorted_hits)
    assert torch.equal(hits.cpu(), reference.sphere_hits(y.cpu(), c.cpu(), radii))
    assert (torch.diff(sorted_hits, dim=1) >= 0).all()
    assert (hits[:, 5] == 50).all() and (hits[:, 6] == 0).all()


def test_empty_radii(device):
    y, c = _integer_data(4, 10, 5, 1)
    hits, dist = ops.sphere_hits(y.to(device), c.to(device), torch.empty(0), return_distances=True)
    assert hits.shape == (4, 0) and hits.dtype == torch.int64
    assert torch.equal(dist.cpu(), reference.sphere_distances(y, c))


@needs_ops
def test_the_compiled_op_takes_an_empty_batch(device):
    """B = 0 (or S = 0) straight into the compiled op (the internal core skips the Python checks): empty counts of the
    right shapes on every device, as the reference gives."""
    radii = torch.tensor([1.0, 2.0], dtype=torch.float64, device=device)
    for b, s in ((0, 5), (3, 0)):
        y, c = torch.zeros(b, s, 4, device=device), torch.zeros(b, 4, device=device)
        hits, dist = torch.ops.vaefast.sphere_hits(y, c, radii, True)
        assert hits.shape == (b, 2) and dist.shape == (b, s) and int(hits.sum()) == 0


def test_non_contiguous_inputs(device):
    y, c = _integer_data(6, 40, 30, 2)
    radii = torch.tensor([5.0, 8.0, 11.0])
    expected = reference.sphere_hits(y, c, radii).to(device)
    y, c = y.to(device), c.to(device)
    yt = y.transpose(0, 1).contiguous().transpose(0, 1)  # stride(2) == 1, permuted batch/sample strides
    yc = y.transpose(1, 2).contiguous().transpose(1, 2)  # stride(2) != 1
    cc = c.t().contiguous().t()
    for yy in (yt, yc, y):
        assert torch.equal(ops.sphere_hits(yy, cc, radii), expected)
    sub = y[::2, 1::3, ::2]
    assert torch.equal(ops.sphere_hits(sub, c[::2, ::2], radii), reference.sphere_hits(sub, c[::2, ::2], radii))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype, device):
    y, c = _integer_data(3, 30, 17, 3, dtype)
    hits, dist = ops.sphere_hits(y.to(device), c.to(device), [3.0, 6.0, 9.0], return_distances=True)
    assert dist.dtype == torch.float32
    assert torch.equal(dist.cpu(), reference.sphere_distances(y, c))
    assert torch.equal(hits.cpu(), reference.sphere_hits(y, c, torch.tensor([3.0, 6.0, 9.0])))


def test_random_real_data_matches_float64_within_rounding(device):
    g = torch.Generator().manual_seed(0)
    y, c = torch.rand(4, 64, 100, generator=g), torch.rand(4, 100, generator=g)
    _, dist = ops.sphere_hits(y.to(device), c.to(device), 1.0, return_distances=True)
    exact = ((y.double() - c.double().unsqueeze(1)) ** 2).sum(-1).sqrt()
    torch.testing.assert_close(dist.cpu().double(), exact, rtol=1e-6, atol=0)


@needs_ops
def test_opcheck(device):
    y, c = _integer_data(2, 7, 5, 4)
    y, c = y.to(device), c.to(device)
    radii = torch.tensor([2.0, 5.0, 3.0], dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.vaefast.sphere_hits.default, (y, c, radii, True))
    torch.library.opcheck(
        torch.ops.vaefast.sphere_hits.default,
        (y.double(), c.double(), radii, False),
        test_utils=("test_schema", "test_faketensor"),
    )


@needs_ops
def test_torch_compile_fake_kernel(device):
    y, c = _integer_data(2, 7, 5, 4)
    y, c = y.to(device), c.to(device)
    radii = torch.tensor([2.0, 5.0], dtype=torch.float64, device=device)

    def f(yy, cc):
        hits, dist = torch.ops.vaefast.sphere_hits(yy, cc, radii, True)
        return hits.sum(1), dist.max(1).values

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    for a, b in zip(compiled(y, c), f(y, c), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"y": [1.0]}, TypeError, "y"),
        ({"y": torch.zeros(2, 3)}, ValueError, "y"),
        ({"y": torch.zeros(2, 0, 4)}, ValueError, "y"),
        ({"y": torch.zeros(0, 3, 4), "center": torch.zeros(0, 4)}, ValueError, "y"),
        ({"y": torch.zeros(2, 3, 4, dtype=torch.int64)}, TypeError, "y"),
        ({"y": torch.full((2, 3, 4), float("nan"))}, ValueError, "y"),
        ({"y": torch.full((2, 3, 4), float("inf"))}, ValueError, "y"),
        ({"center": torch.zeros(2, 5)}, ValueError, "center"),
        ({"center": torch.zeros(3, 4)}, ValueError, "center"),
        ({"center": torch.zeros(2, 4, dtype=torch.float64)}, TypeError, "center"),
        ({"center": torch.full((2, 4), float("nan"))}, ValueError, "center"),
        ({"radii": [1.0, -1.0]}, ValueError, "radii"),
        ({"radii": 0.0}, ValueError, "radii"),
        ({"radii": [float("inf")]}, ValueError, "radii"),
        ({"radii": [float("nan")]}, ValueError, "radii"),
        ({"radii": [[1.0]]}, ValueError, "radii"),
        ({"return_distances": 1}, TypeError, "return_distances"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    args = {"y": torch.zeros(2, 3, 4), "center": torch.zeros(2, 4), "radii": [1.0]}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.sphere_hits(**args)
