"""Orthonormal layers (vaefast.models.lipschitz): orthonormal however they are trained (vaefast.train's retraction or
a plain optimiser loop), computed once per analysis with the uncached results, and model files of vaefast 0.2's
``torch.nn.utils.parametrizations.orthogonal`` layers load unchanged."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn.utils import parametrizations, parametrize

import vaefast
from vaefast import _checks
from vaefast.models import VAE, VAEConfig, save
from vaefast.models.lipschitz import ROUNDING, Orthonormal, orthonormal_layers, orthonormalize, retract_
from vaefast.training import train

certify = vaefast.certify
CFG = {"hidden": (32, 16), "latent_dim": 4, "likelihood": "gaussian", "gaussian_std": 0.2}


def _max_error(w: torch.Tensor) -> float:
    w = w.detach()
    gram = w @ w.mT if w.shape[0] < w.shape[1] else w.mT @ w
    return float((gram - torch.eye(gram.shape[0], dtype=w.dtype)).abs().max())


def _assert_orthonormal(model: torch.nn.Module) -> None:
    layers = list(orthonormal_layers(model))
    assert layers
    for _, v in layers:
        assert _max_error(v) <= ROUNDING * torch.finfo(v.dtype).eps


@pytest.fixture
def points() -> torch.Tensor:
    return torch.rand(96, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_training_keeps_weights_orthonormal_and_uses_them_as_stored(points: torch.Tensor) -> None:
    """After vaefast.train every stored matrix is orthonormal and is the weight itself (no per-forward work), and
    training improved the objective."""
    model = VAE(VAEConfig(**CFG, lipschitz=2.0), seed=0)
    before = vaefast.training.evaluate(model, points)["elbo"]
    train(model, points, epochs=3, batch_size=32, progress=False)
    _assert_orthonormal(model)
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            assert m.weight is m.parametrizations.weight.original
            assert _max_error(m.weight.detach()) <= ROUNDING * torch.finfo(torch.float32).eps
    assert vaefast.training.evaluate(model, points)["elbo"] > before


def test_a_plain_optimiser_loop_sees_orthonormal_weights_and_gradients(points: torch.Tensor) -> None:
    """Without the retraction the stored matrix leaves the orthonormal ones, and the weight is its orthonormal factor
    (differentiable: every stored matrix gets a gradient); retract_ brings it back."""
    model = VAE(VAEConfig(**CFG, lipschitz={"mu": 1.0, "logvar": 1.0}), seed=1)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        optimiser.zero_grad()
        model.loss(points[:32], dataset_size=96, generator=torch.Generator().manual_seed(0)).loss.backward()
        assert all(v.grad is not None and bool(v.grad.abs().sum() > 0) for _, v in orthonormal_layers(model))
        optimiser.step()
    layer = model.encoder.trunk[1]
    stored = layer.parametrizations.weight.original
    assert _max_error(stored.detach()) > 1e-3
    assert torch.equal(layer.weight, orthonormalize(stored.detach()))
    assert _max_error(layer.weight.detach()) <= ROUNDING * torch.finfo(torch.float32).eps
    assert retract_(model) == 4 and layer.weight is stored


def test_an_analysis_orthonormalises_once_with_the_uncached_results(points, monkeypatch) -> None:
    """With stored matrices off the orthonormal ones (a plain optimiser step), an estimate, an attack and a
    certificate compute each weight once, and give exactly the numbers of computing it on every forward."""
    model = VAE(VAEConfig(**CFG, lipschitz={"mu": 2.0, "logvar": 2.0}), seed=2)
    with torch.no_grad():
        for _, v in orthonormal_layers(model):
            v.add_(0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3)))
    x = points[:5]
    calls = {"n": 0}
    original_forward = Orthonormal.forward

    def counting(self, v):
        calls["n"] += 1
        return original_forward(self, v)

    def analyse() -> dict[str, torch.Tensor]:
        est = vaefast.estimate_r_robustness(model, x, radii=[1.0], num_samples=64, seed=0)
        attack = vaefast.MaxDamageAttack(model, eps=[0.3], steps=4)(x)
        cert = certify(model, x, 1.0, num_samples=64, estimate=est)
        return {"p": est.p_hat, "delta": attack.delta, "cert": cert.radius}

    monkeypatch.setattr(Orthonormal, "forward", counting)
    cached = analyse()
    per_analysis = calls["n"]
    assert per_analysis <= 3 * len(list(orthonormal_layers(model)))  # once per layer and analysis
    monkeypatch.setattr(_checks.parametrize, "cached", contextlib.nullcontext)
    monkeypatch.setattr(_checks, "_compute_parametrized", lambda model: None)
    calls["n"] = 0
    uncached = analyse()
    assert calls["n"] > per_analysis  # every forward computes the weights again
    for key in cached:
        assert torch.equal(cached[key], uncached[key]), key


def test_model_files_of_torch_orthogonal_layers_load_unchanged(tmp_path, points) -> None:
    """A model saved with PyTorch's orthogonal parametrization (vaefast 0.2) loads with the same weights, bit for bit,
    and a file of this version gives back the very numbers of the model that was saved."""
    old = VAE(VAEConfig(**CFG, lipschitz=2.0), seed=3)
    for m in [m for m in old.modules() if parametrize.is_parametrized(m, "weight")]:
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        parametrizations.orthogonal(m)
    train(old, points, epochs=1, batch_size=32, progress=False)  # off the initial point of the parametrization
    save(old, tmp_path / "old")
    loaded = vaefast.load_model(tmp_path / "old")
    weights = [(m.weight, n) for n, m in old.named_modules() if parametrize.is_parametrized(m, "weight")]
    again = {n: m.weight for n, m in loaded.named_modules() if parametrize.is_parametrized(m, "weight")}
    assert len(weights) == len(again) == 7 and all(torch.equal(w, again[n]) for w, n in weights)
    with torch.no_grad():  # the same numbers up to the GEMM's summation order (the old weights were transposed views)
        torch.testing.assert_close(loaded.encode(points)[0], old.encode(points)[0], rtol=1e-5, atol=1e-6)
    _assert_orthonormal(loaded)
    train(loaded, points, epochs=1, batch_size=32, progress=False)
    save(loaded, tmp_path / "new")
    again = vaefast.load_model(tmp_path / "new")
    with torch.no_grad():
        assert torch.equal(again.encode(points)[0], loaded.encode(points)[0])
