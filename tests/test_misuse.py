"""No silent misuse: as_vae needs decoder_output, every analysis runs the model in eval mode and restores
the caller's modes, a lazy as_vae model learns its input shape at every entry point, and the relative likelihood
degradation is |drop| / |log p| >= 0 for every likelihood."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from vaefast.attacks import LatentAttack, MaxDamageAttack, OutputAttack, distances, likelihood_degradation
from vaefast.jacobian import encoder_jacobian, jacobian_frobenius, jacobian_spectral
from vaefast.models import VAE, VAEConfig, as_vae
from vaefast.robustness import estimate_r_robustness, is_r_robust, margin_bound

torch.set_num_threads(1)

D, LATENT = 12, 2


# --- a user's model with train-mode layers -----------------------------------------------------------------
class _Encoder(nn.Module):
    """``x -> (mu, logvar)`` through an MLP body with Dropout or BatchNorm1d."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        norm = nn.Dropout(0.5) if layer == "dropout" else nn.BatchNorm1d(16)
        self.body = nn.Sequential(nn.Linear(D, 16), norm, nn.Tanh(), nn.Linear(16, 2 * LATENT))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.body(x).chunk(2, dim=1)
        return mu, logvar - 1.0


def _model(layer: str, lazy: bool = False) -> nn.Module:
    """A bernoulli as_vae model (same weights for the same ``layer``); ``lazy``: no input_shape/latent_dim given."""
    torch.manual_seed(0)
    enc = _Encoder(layer)
    dec = nn.Sequential(nn.Linear(LATENT, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, D))
    if layer == "batchnorm":  # running statistics that differ from any batch's own
        with torch.no_grad():
            enc.body[1].running_mean.uniform_(-0.5, 0.5)
            enc.body[1].running_var.uniform_(0.5, 2.0)
    return as_vae(enc, dec, likelihood="bernoulli", decoder_output="logits", input_shape=None if lazy else (D,))


def _x(n: int = 4) -> torch.Tensor:
    return 0.1 + 0.8 * torch.rand(n, D, generator=torch.Generator().manual_seed(1))


def _delta(x: torch.Tensor) -> torch.Tensor:
    return 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))


# every entry point, reduced to the tensors that must not depend on the caller's training mode (radii near the
# model's r* ~ 0.075, so p_hat, the sequential decisions and the bounds are sensitive to the network)
ENTRY_POINTS: dict[str, Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, ...]]] = {
    "estimate_r_robustness": lambda m, x: (
        (e := estimate_r_robustness(m, x, [0.06, 0.1], num_samples=64, seed=1)).p_hat,
        e.r_star,
    ),
    "is_r_robust": lambda m, x: ((e := is_r_robust(m, x, 0.077, max_samples=256, seed=1)).p_hat, e.samples_used),
    "margin_bound": lambda m, x: (
        (b := margin_bound(m, x, 0.1, num_samples=64, seed=1)).bound,
        b.whitened_bound,
        b.jac_frobenius,
        b.sigma_min,
    ),
    "MaxDamageAttack": lambda m, x: (
        (r := MaxDamageAttack(m, 0.3, steps=4, num_noise_samples=2)(x)).delta,
        r.objective,
    ),
    "LatentAttack": lambda m, x: ((r := LatentAttack(m, x[-1:], steps=4)(x[:-1])).delta, r.objective),
    "OutputAttack": lambda m, x: (
        (r := OutputAttack(m, x[-1:], loss="elbo", num_noise_samples=2, steps=4)(x[:-1])).delta,
        r.objective,
    ),
    "likelihood_degradation": lambda m, x: (
        (g := likelihood_degradation(m, x, _delta(x))).relative,
        g.drop,
    ),
    "distances": lambda m, x: tuple(distances(m, x, _delta(x), x[-1:]).values()),
    "jacobian": lambda m, x: (
        jacobian_frobenius(m.mean_encoder(), x),
        jacobian_spectral(m.mean_encoder(), x),
        encoder_jacobian(m.mean_encoder(), x),
    ),
}


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


def _assert_same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v), (u, v)


# --- as_vae: decoder_output is required ---------------------------------------------------------------------
def test_as_vae_requires_decoder_output_and_explains_the_choice() -> None:
    enc, dec = _Encoder("dropout"), nn.Linear(LATENT, D)
    with pytest.raises(TypeError, match="decoder_output") as info:
        as_vae(enc, dec, input_shape=(D,))
    message = str(info.value)
    assert "'logits'" in message and "'mean'" in message and "sigmoid" in message and "[0, 1]" in message
    with pytest.raises(TypeError):  # keyword-only: a positional "logits" is not silently read as something else
        as_vae(enc, dec, "bernoulli", "logits")  # type: ignore[misc]
    with pytest.raises(ValueError, match="decoder_output='mean'"):
        as_vae(enc, dec, likelihood="gaussian", decoder_output="logits", input_shape=(D,))
    with pytest.raises(ValueError, match="continuous_bernoulli"):
        as_vae(enc, dec, likelihood="continuous_bernoulli", decoder_output="mean", input_shape=(D,))
    with pytest.raises(ValueError, match="'logits' = pre-activation"):
        as_vae(enc, dec, decoder_output="probabilities", input_shape=(D,))


def test_as_vae_declared_output_decides_the_mean() -> None:
    enc, logits = _Encoder("dropout").eval(), nn.Linear(LATENT, D)
    probs = nn.Sequential(logits, nn.Sigmoid())
    as_logits = as_vae(enc, logits, decoder_output="logits", input_shape=(D,))
    as_mean = as_vae(enc, probs, decoder_output="mean", input_shape=(D,))
    z = torch.randn(3, LATENT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(as_mean.decode(z), as_logits.decode(z))
    # the silent misuse the required argument prevents: probabilities read as logits are squashed again
    wrong = as_vae(enc, probs, decoder_output="logits", input_shape=(D,))
    assert not torch.allclose(wrong.decode(z), as_mean.decode(z))
    gaussian = as_vae(enc, logits, likelihood="gaussian", decoder_output="mean", input_shape=(D,))
    torch.testing.assert_close(gaussian.decode(z), logits(z))


# --- eval mode everywhere -----------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("layer", ["dropout", "batchnorm"])
def test_train_mode_model_gives_eval_mode_numbers_and_keeps_its_modes(layer: str, entry: str) -> None:
    call, x = ENTRY_POINTS[entry], _x()
    reference_model = _model(layer).eval()
    reference = call(reference_model, x)
    model = _model(layer).train()
    modes, buffers = _modes(model), _buffers(model)
    first, second = call(model, x), call(model, x)
    _assert_same(first, second)
    _assert_same(first, reference)
    assert _modes(model) == modes and all(modes.values())
    for name, value in _buffers(model).items():  # no batch-norm statistics were updated
        assert torch.equal(value, buffers[name]), name


@pytest.mark.parametrize("entry", ["estimate_r_robustness", "margin_bound", "MaxDamageAttack", "OutputAttack"])
def test_mixed_modes_among_submodules_are_restored(entry: str) -> None:
    model = _model("dropout").train()
    model.encoder.eval()  # the whole encoder, and the decoder's first Linear, in eval mode; its dropout training
    model.decoder[0].eval()
    modes = _modes(model)
    assert len(set(modes.values())) == 2
    _assert_same(ENTRY_POINTS[entry](model, _x()), ENTRY_POINTS[entry](_model("dropout").eval(), _x()))
    assert _modes(model) == modes


def test_jacobian_of_a_train_mode_mlp_uses_the_eval_network() -> None:
    torch.manual_seed(3)
    mlp = nn.Sequential(nn.Linear(D, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, LATENT)).double()
    x = _x().double()
    want = jacobian_frobenius(mlp.eval(), x, method="exact")
    mlp.train()
    for method in ("auto", "exact", "fused"):  # the fused op skips the (eval-mode) dropout
        torch.testing.assert_close(jacobian_frobenius(mlp, x, method=method), want)
    assert mlp.training and mlp[1].training


# --- the input shape comes from x at every entry point ---------------------------------------------------------
@pytest.mark.parametrize("entry", [e for e in ENTRY_POINTS if e != "jacobian"])  # jacobians take the encoder
def test_lazy_as_vae_model_learns_its_shape_at_every_entry_point(entry: str) -> None:
    x = _x()
    lazy = _model("dropout", lazy=True)
    with pytest.raises(ValueError, match="not known yet"):
        _ = lazy.input_shape
    got = ENTRY_POINTS[entry](lazy, x)
    assert lazy.input_shape == (D,) and lazy.latent_dim == LATENT
    _assert_same(got, ENTRY_POINTS[entry](_model("dropout"), x))


@pytest.mark.parametrize("attack", [LatentAttack, OutputAttack])
def test_targeted_attacks_resolve_the_shape_from_their_target(attack: type) -> None:
    lazy = _model("batchnorm", lazy=True).train()
    modes = _modes(lazy)
    target = _x(1)
    attack(lazy, target, steps=2)
    assert lazy.input_shape == (D,) and lazy.latent_dim == LATENT
    assert _modes(lazy) == modes
    with pytest.raises(ValueError, match=r"target must have shape \[B, 12\]"):
        attack(_model("dropout"), torch.rand(1, 5), steps=2)


# --- likelihood degradation ---------------------------------------------------------------------------------
def _check_degradation(model: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> None:
    deg = likelihood_degradation(model, x, delta)
    with torch.no_grad():
        ll = model.log_likelihood(x, model.encode(x)[0])
        ll_adv = model.log_likelihood(x, model.encode(x + delta)[0])  # always the clean x
    assert torch.equal(deg.log_lik_clean, ll) and torch.equal(deg.log_lik_adv, ll_adv)
    assert torch.equal(deg.drop, ll - ll_adv)
    assert bool((deg.relative >= 0).all()) and bool((deg.relative > 0).any())
    assert torch.equal(deg.relative, deg.drop.abs() / deg.log_lik_clean.abs())
    # the paper's signed form has the same magnitude
    paper = (ll_adv - ll).abs() / ll
    torch.testing.assert_close(deg.relative, paper.abs(), rtol=0, atol=0)
    zero = likelihood_degradation(model, x, torch.zeros_like(x))
    assert bool((zero.relative == 0).all()) and bool((zero.drop == 0).all())


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "continuous_bernoulli"])
def test_relative_degradation_is_nonnegative_for_every_likelihood(likelihood: str) -> None:
    config = VAEConfig(input_shape=(D,), hidden=(16,), latent_dim=LATENT, likelihood=likelihood)
    model = VAE(config, seed=0).eval()
    x = _x(6)
    _check_degradation(model, x, 0.3 * _delta(x) / 0.05)


def test_relative_degradation_where_the_gaussian_log_likelihood_is_positive() -> None:
    torch.manual_seed(5)
    enc = _Encoder("dropout").eval()
    dec = nn.Linear(LATENT, D)
    with torch.no_grad():  # g(z) = 0.5 + small: a density above 1 at x near 0.5, so log p(x|z) > 0
        dec.weight.mul_(0.02)
        dec.bias.fill_(0.5)
    model = as_vae(enc, dec, likelihood="gaussian", decoder_output="mean", gaussian_std=0.1, input_shape=(D,))
    x = 0.5 + 0.02 * torch.randn(5, D, generator=torch.Generator().manual_seed(6))
    delta = torch.randn(5, D, generator=torch.Generator().manual_seed(7))
    deg = likelihood_degradation(model, x, delta)
    assert bool((deg.log_lik_clean > 0).all()) and not math.isnan(float(deg.relative.sum()))
    _check_degradation(model, x, delta)
