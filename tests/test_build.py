"""The compiled core: ops registered for CPU (and CUDA when built with it), CPU-vs-CUDA parity on a GPU (``gpu``
tests, skipped with their reason by tests/conftest.py where CUDA cannot run), and the pure-PyTorch fallback when
``vaefast._C`` cannot be loaded."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import vaefast
from vaefast import ops

PACKAGE_DIR = os.path.dirname(vaefast.__file__)
BUILT = bool(glob.glob(os.path.join(PACKAGE_DIR, "_C*.so")) or glob.glob(os.path.join(PACKAGE_DIR, "_C*.pyd")))
# Every compiled op (each engineer appends theirs).
OPS = ["reparam_sample", "sphere_hits", "mlp_jacobian_frobenius"]


@pytest.mark.skipif(not BUILT, reason="vaefast._C not built in this tree")
def test_extension_loads_when_built():
    assert vaefast.has_compiled_ops()


@pytest.mark.skipif(not vaefast.has_compiled_ops(), reason="vaefast._C not built")
@pytest.mark.parametrize("op", OPS)
def test_every_op_has_kernels(op):
    name = f"vaefast::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    if vaefast.compiled_with_cuda():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_reparam_cpu_cuda_bit_identical(dtype):
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(7, 13, generator=g).to(dtype), torch.randn(7, 13, generator=g).to(dtype)
    cpu = ops.reparam_sample(mu, logvar, 300, seed=2**35 + 1, offset=2**32 - 3, sample_offset=5)
    gpu = ops.reparam_sample(mu.cuda(), logvar.cuda(), 300, seed=2**35 + 1, offset=2**32 - 3, sample_offset=5)
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sphere_hits_cpu_cuda_equal(dtype):
    g = torch.Generator().manual_seed(1)
    y = torch.randint(-4, 5, (5, 200, 97), generator=g).to(dtype)
    c = torch.randint(-2, 3, (5, 97), generator=g).to(dtype)
    radii = torch.tensor([9.0, 3.0, 12.5, 15.0])
    h_cpu, d_cpu = ops.sphere_hits(y, c, radii, return_distances=True)
    h_gpu, d_gpu = ops.sphere_hits(y.cuda(), c.cuda(), radii.cuda(), return_distances=True)
    assert torch.equal(h_cpu, h_gpu.cpu()) and torch.equal(d_cpu, d_gpu.cpu())
    yt = y.transpose(1, 2).contiguous().transpose(1, 2).cuda()
    assert torch.equal(ops.sphere_hits(yt, c.cuda(), radii).cpu(), h_cpu)


def _op_outputs() -> dict[str, torch.Tensor]:
    """The three ops on fixed inputs (float64 Jacobian: the kernel and the reference agree to rounding there)."""
    g = torch.Generator().manual_seed(3)
    mu, logvar = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    y, c = torch.randint(-3, 4, (4, 20, 8), generator=g).float(), torch.zeros(4, 8)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    weights = [torch.randn(h, d, generator=g, dtype=torch.float64) for d, h in [(7, 9), (9, 6), (6, 3)]]
    biases = [torch.randn(w.shape[0], generator=g, dtype=torch.float64) for w in weights]
    return {
        "z": ops.reparam_sample(mu, logvar, 9, seed=5, offset=2),
        "hits": ops.sphere_hits(y, c, [2.0, 5.0, 7.0]),
        "jac": ops.mlp_jacobian_frobenius(x, weights, biases, "tanh"),
    }


FALLBACK_SCRIPT = """
import sys, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import vaefast
    from vaefast import ops
    sys.path.insert(0, sys.argv[2])
    from test_build import _op_outputs
assert not vaefast.has_compiled_ops() and not vaefast.compiled_with_cuda()
msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(msgs) == 1, msgs
print(msgs[0])
torch.save(_op_outputs(), sys.argv[1])
"""


@pytest.mark.parametrize("case", ["no_extension", "other_torch"])
def test_fallback_without_usable_extension_warns_and_matches_compiled(tmp_path, case):
    """A copy of the package whose extension is absent (``no_extension``), or recorded as built against another torch
    (``other_torch``: the .so is present but must not be loaded), imports with one warning that says why and how to
    rebuild, and its pure-PyTorch reference gives the compiled ops' results: the same reparam bits and hit counts,
    the same Jacobian norms to rounding."""
    if case == "other_torch" and not BUILT:
        pytest.skip("vaefast._C not built in this tree")
    pkg = tmp_path / "vaefast"
    hidden = ["_C*.so", "_C*.pyd"] if case == "no_extension" else []
    shutil.copytree(PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns(*hidden, "_build.json", "__pycache__"))
    if case == "other_torch":
        (pkg / "_build.json").write_text(json.dumps({"torch": "2.0.0+cu117", "cuda": "11.7"}))
    out = tmp_path / "out.pt"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    args = [sys.executable, "-c", FALLBACK_SCRIPT, str(out), os.path.dirname(__file__)]
    proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warning = proc.stdout.strip()
    assert warning.startswith("vaefast: compiled ops unavailable") and "\n" not in warning, warning
    if case == "other_torch":
        assert f"built against torch 2.0.0+cu117, running torch {torch.__version__}" in warning, warning
        assert "pip install --no-build-isolation" in warning, warning
    got, expected = torch.load(out, weights_only=True), _op_outputs()
    assert torch.equal(got["z"], expected["z"]) and torch.equal(got["hits"], expected["hits"])
    torch.testing.assert_close(got["jac"], expected["jac"], rtol=1e-10, atol=0)
