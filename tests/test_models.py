"""vaefast.models: config round trip, networks, likelihoods vs scipy/closed forms, objectives, save/load, as_vae."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats
from torch import nn

import vaefast
from vaefast.models import VAE, VAEConfig, as_vae, gaussian_kl, gaussian_log_density, load
from vaefast.models import save as save_model
from vaefast.models.config import ACTIVATIONS
from vaefast.models.likelihoods import repeat_per_sample
from vaefast.reference import MLP_ACTIVATIONS, activation_of
from vaefast.rng import derive_seed

torch.set_num_threads(1)


def tiny(**kw) -> VAEConfig:
    base = {"input_shape": (1, 8, 8), "hidden": (16,), "latent_dim": 3}
    base.update(kw)
    return VAEConfig(**base)


# --- config ---------------------------------------------------------------------------------------------
def test_config_json_round_trip():
    c = VAEConfig(
        input_shape=(3, 32, 32),
        architecture="conv",
        hidden=(64,),
        activation="leaky_relu",
        activation_param=0.2,
        latent_dim=5,
        likelihood="gaussian_learned",
        learned_variance="scalar",
        objective="beta_tcvae",
        tc_weight=6.0,
        conv_channels=(8, 16),
    )
    c2 = VAEConfig.from_json(c.to_json())
    assert c2 == c
    assert json.loads(c.to_json())["input_shape"] == [3, 32, 32]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"activation": "swish"}, "activation"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"likelihood": "poisson"}, "likelihood"),
        ({"objective": "iwae"}, "objective"),
        ({"beta": -1.0}, "beta"),
        ({"gaussian_std": 0.0}, "gaussian_std"),
        ({"hidden": (0,)}, "hidden"),
        ({"architecture": "conv", "input_shape": (1, 28, 28), "conv_channels": (8, 8, 8)}, "divisible"),
        ({"architecture": "conv", "input_shape": (64,)}, "input_shape"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny(**kw)


def test_config_from_dict_rejects_unknown_and_bad_json():
    with pytest.raises(ValueError, match="unknown"):
        VAEConfig.from_dict({"latent_dim": 2, "colour": "red"})
    with pytest.raises(ValueError, match="JSON"):
        VAEConfig.from_json("{not json")


# --- networks and the protocol --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "arch"), [((1, 8, 8), "mlp"), ((1, 28, 28), "conv"), ((3, 32, 32), "conv"), ((1, 64, 64), "conv")]
)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian_learned", "continuous_bernoulli"])
def test_protocol_shapes(shape, arch, likelihood):
    m = VAE(tiny(input_shape=shape, architecture=arch, likelihood=likelihood))
    x = torch.rand(3, *shape)
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (3, 3)
    mean = m.decode(mu)
    assert mean.shape == x.shape
    if likelihood in ("bernoulli", "continuous_bernoulli"):
        assert bool(((mean > 0) & (mean < 1)).all())
    assert m.log_likelihood(x, mu).shape == (3,)
    assert m.log_likelihood(x, mu.unsqueeze(1).expand(3, 4, 3)).shape == (3, 4)
    assert m.elbo(x, seed=0).shape == (3,)
    assert torch.allclose(m.mean_encoder()(x), mu)
    assert m.input_shape == shape and m.latent_dim == 3 and m.likelihood == likelihood


def test_mlp_mean_encoder_is_sequential_sharing_parameters():
    m = VAE(tiny(hidden=(16, 12), activation="elu"))
    seq = m.mean_encoder()
    assert isinstance(seq, nn.Sequential)
    kinds = [type(layer).__name__ for layer in seq]
    assert kinds == ["Flatten", "Linear", "ELU", "Linear", "ELU", "Linear"]
    own = {p.data_ptr() for p in m.encoder.parameters()}
    assert all(p.data_ptr() in own for p in seq.parameters())
    assert seq[-1] is m.encoder.mu


def test_construction_is_seeded():
    a, b, c = VAE(tiny(), seed=3), VAE(tiny(), seed=3), VAE(tiny(), seed=4)
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), k
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


def test_logvar_soft_bound_keeps_sigma_finite():
    m = VAE(tiny(logvar_bound=4.0))
    with torch.no_grad():
        m.encoder.logvar.bias.fill_(1e6)
    _, logvar = m.encode(torch.rand(2, 1, 8, 8))
    assert bool(torch.isfinite(logvar).all()) and float(logvar.detach().max()) <= 4.0


def test_bad_inputs_name_the_argument():
    m = VAE(tiny())
    with pytest.raises(ValueError, match="x must have shape"):
        m.encode(torch.rand(2, 64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        m.encode(np.zeros((2, 1, 8, 8)))
    with pytest.raises(ValueError, match="z must have last dimension"):
        m.decode(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="same batch size"):
        m.log_likelihood(torch.rand(2, 1, 8, 8), torch.zeros(3, 3))
    with pytest.raises(TypeError, match="config"):
        VAE({"latent_dim": 3})


# --- likelihoods against independent references ---------------------------------------------------------
def _setup(likelihood, **kw):
    m = VAE(tiny(likelihood=likelihood, **kw)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64)
    z = torch.randn(4, 3, generator=g, dtype=torch.float64)
    out = m.decoder_output(z).detach().numpy().reshape(4, -1)
    return m, x, z, out, x.numpy().reshape(4, -1)


def test_bernoulli_log_likelihood_and_mean():
    m, x, z, logits, xn = _setup("bernoulli")
    p = special.expit(logits)
    ref = (xn * np.log(p) + (1 - xn) * np.log1p(-p)).sum(1)
    np.testing.assert_allclose(m.log_likelihood(x, z).detach().numpy(), ref, rtol=1e-10)
    np.testing.assert_allclose(m.decode(z).detach().numpy().reshape(4, -1), p, rtol=1e-12)
    xb = (x > 0.5).double()
    ref_b = stats.bernoulli.logpmf(xb.numpy().reshape(4, -1), p).sum(1)
    np.testing.assert_allclose(m.log_likelihood(xb, z).detach().numpy(), ref_b, rtol=1e-10)


def test_gaussian_log_likelihood_fixed_and_learned():
    m, x, z, mean, xn = _setup("gaussian", gaussian_std=0.3)
    ref = stats.norm.logpdf(xn, loc=mean, scale=0.3).sum(1)
    np.testing.assert_allclose(m.log_likelihood(x, z).detach().numpy(), ref, rtol=1e-10)
    m, x, z, mean, xn = _setup("gaussian_learned")
    with torch.no_grad():
        m.observation.raw_logvar.copy_(torch.linspace(-2, 1, 64, dtype=torch.float64).reshape(1, 8, 8))
    std = np.exp(0.5 * m.observation.logvar().detach().numpy().reshape(-1))
    ref = stats.norm.logpdf(xn, loc=mean, scale=std).sum(1)
    np.testing.assert_allclose(m.log_likelihood(x, z).detach().numpy(), ref, rtol=1e-10)
    scalar = VAE(tiny(likelihood="gaussian_learned", learned_variance="scalar"))
    assert scalar.observation.raw_logvar.shape == ()


def test_continuous_bernoulli_against_closed_form_and_quadrature():
    m, x, z, logits, xn = _setup("continuous_bernoulli")
    lam = special.expit(logits)
    log_c = np.log(2 * np.arctanh(1 - 2 * lam) / (1 - 2 * lam))
    ref = (log_c + xn * np.log(lam) + (1 - xn) * np.log1p(-lam)).sum(1)
    np.testing.assert_allclose(m.log_likelihood(x, z).detach().numpy(), ref, rtol=1e-7)
    mean = m.decode(z).detach().numpy().reshape(4, -1)
    for j in (0, 17, 40):
        l_ = lam[0, j]
        c = math.exp(log_c[0, j])
        quad, _ = integrate.quad(lambda t, l_=l_, c=c: t * c * l_**t * (1 - l_) ** (1 - t), 0, 1)
        assert mean[0, j] == pytest.approx(quad, rel=1e-6)
    assert not np.allclose(mean, lam)  # the CB mean, not lambda


def test_gaussian_kl_matches_torch_distributions():
    mu, logvar = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(gaussian_kl(mu, logvar), torch.distributions.kl_divergence(q, p).sum(1))
    torch.testing.assert_close(gaussian_kl(mu, logvar, per_dimension=True), torch.distributions.kl_divergence(q, p))


def test_gaussian_log_density_and_repeat_per_sample():
    g = torch.Generator().manual_seed(0)
    x, mean, logvar = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ref = stats.norm.logpdf(x.numpy(), mean.numpy(), np.exp(0.5 * logvar.numpy()))
    np.testing.assert_allclose(gaussian_log_density(x, mean, logvar).numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(gaussian_log_density(x, mean, 0.5).numpy(), stats.norm.logpdf(x, mean, math.exp(0.25)))
    rep = repeat_per_sample(x, 5)
    assert rep.shape == (15, 4) and all(torch.equal(rep[b * 5 + s], x[b]) for b in range(3) for s in range(5))


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_every_activation_of_the_table_builds_a_recognised_mlp(name):
    """One activation table: every configurable activation is a module the MLP recogniser maps back to its name."""
    encoder = VAE(tiny(activation=name, hidden=(8, 8))).mean_encoder()
    acts = [layer for layer in encoder if not isinstance(layer, (nn.Flatten, nn.Linear))]
    assert len(acts) == 2
    assert all(activation_of(a) == (name, MLP_ACTIVATIONS[name].default_param) for a in acts)


# --- objectives ------------------------------------------------------------------------------------------
def test_elbo_seeded_and_equal_to_recon_minus_kl():
    m = VAE(tiny()).double()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    e1, e2 = m.elbo(x, seed=5), m.elbo(x, seed=5)
    assert torch.equal(e1, e2) and not torch.equal(e1, m.elbo(x, seed=6))
    mu, logvar = m.encode(x)
    eps = torch.randn(
        mu.shape, generator=torch.Generator().manual_seed(derive_seed(5, "vae", "elbo")), dtype=torch.float64
    )
    ref = m.log_likelihood(x, mu + (0.5 * logvar).exp() * eps) - gaussian_kl(mu, logvar)
    torch.testing.assert_close(e1, ref)
    many = m.elbo(x, num_samples=4000, seed=1)
    # the per-point ELBO is an average over q: its MC estimate concentrates near the one-sample mean
    single = torch.stack([m.elbo(x, seed=s) for s in range(400)]).mean(0)
    torch.testing.assert_close(many, single, atol=0.5, rtol=0)


def test_beta_vae_loss():
    m = VAE(tiny(objective="beta_vae", beta=4.0))
    x = torch.rand(8, 1, 8, 8)
    t = m.loss(x, generator=torch.Generator().manual_seed(0))
    mu, logvar = m.encode(x)
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(0))
    recon = m.log_likelihood(x, mu + (0.5 * logvar).exp() * eps)
    kl = gaussian_kl(mu, logvar)
    torch.testing.assert_close(t.loss, -(recon - 4.0 * kl).mean())
    torch.testing.assert_close(t.elbo, (recon - kl).mean())
    assert t.tc is None


def test_beta_tcvae_minibatch_weighted_sampling():
    m = VAE(tiny(objective="beta_tcvae", tc_weight=1.0)).double()
    x = torch.rand(7, 1, 8, 8, dtype=torch.float64)
    n_data = 100
    with torch.no_grad():
        t = m.loss(x, dataset_size=n_data, generator=torch.Generator().manual_seed(2))
    mu, logvar = (a.detach().numpy() for a in m.encode(x))
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).numpy()
    std = np.exp(0.5 * logvar)
    z = mu + std * eps
    recon = m.log_likelihood(x, torch.from_numpy(z)).detach().numpy()
    # independent MWS computation with scipy densities
    dens = stats.norm.logpdf(z[:, None, :], loc=mu[None], scale=std[None])  # [i, j, k]
    log_qz = special.logsumexp(dens.sum(2), axis=1) - math.log(n_data * 7)
    log_prod = (special.logsumexp(dens, axis=1) - math.log(n_data * 7)).sum(1)
    log_qzx = stats.norm.logpdf(z, loc=mu, scale=std).sum(1)
    log_pz = stats.norm.logpdf(z).sum(1)
    np.testing.assert_allclose(float(t.tc), (log_qz - log_prod).mean(), rtol=1e-9)
    np.testing.assert_allclose(float(t.mi), (log_qzx - log_qz).mean(), rtol=1e-9)
    np.testing.assert_allclose(float(t.dimkl), (log_prod - log_pz).mean(), rtol=1e-9)
    # unit weights: MI + TC + dimKL telescopes to log q(z|x) - log p(z) (the sampled-KL ELBO)
    np.testing.assert_allclose(float(t.loss), -(recon - (log_qzx - log_pz)).mean(), rtol=1e-9)
    heavy = VAE(tiny(objective="beta_tcvae", tc_weight=6.0)).double()
    heavy.load_state_dict(m.state_dict())
    with torch.no_grad():
        t6 = heavy.loss(x, dataset_size=n_data, generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(float(t6.loss - t.loss), 5.0 * float(t.tc), rtol=1e-9)
    with pytest.raises(ValueError, match="dataset_size"):
        m.loss(x)


# --- save / load -----------------------------------------------------------------------------------------
def test_save_load_identical(tmp_path):
    m = VAE(tiny(likelihood="gaussian_learned", hidden=(16, 8)), seed=1)
    with torch.no_grad():
        m.observation.raw_logvar.add_(0.3)
    save_model(m, tmp_path / "run")
    m2 = load(tmp_path / "run")
    assert m2.config == m.config
    x = torch.rand(5, 1, 8, 8)
    mu, lv = m.encode(x)
    mu2, lv2 = m2.encode(x)
    assert torch.equal(mu, mu2) and torch.equal(lv, lv2)
    assert torch.equal(m.log_likelihood(x, mu), m2.log_likelihood(x, mu2))
    assert torch.equal(m.elbo(x, seed=0), m2.elbo(x, seed=0))
    assert vaefast.load_model is load


def test_load_errors(tmp_path):
    m = VAE(tiny())
    d = save_model(m, tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope")
    weights = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt or truncated"):
        load(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load(d)
    d2 = save_model(m, tmp_path / "mismatch")
    cfg = json.loads((d2 / "config.json").read_text())
    cfg["latent_dim"] = 4
    (d2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        load(d2)
    (d2 / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"config\.json"):
        load(d2)
    (d2 / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load(d2)


# --- as_vae: a model defined only here ---------------------------------------------------------------------
class MyEncoder(nn.Module):
    def __init__(self, d_in=12, d=2):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, 10), nn.Tanh())
        self.mu, self.lv = nn.Linear(10, d), nn.Linear(10, d)

    def forward(self, x):
        h = self.body(x.flatten(1))
        return self.mu(h), self.lv(h)


class MyDecoder(nn.Module):
    def __init__(self, d=2, d_out=12, out_shape=(3, 4)):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 10), nn.Tanh(), nn.Linear(10, d_out))
        self.out_shape = out_shape

    def forward(self, z):
        return self.net(z).reshape(z.shape[0], *self.out_shape)


def test_as_vae_protocol_against_direct_computation():
    torch.manual_seed(0)
    enc, dec = MyEncoder(), MyDecoder()
    model = as_vae(enc, dec, decoder_output="logits", latent_dim=2)
    assert model.input_shape == (3, 4) and model.latent_dim == 2 and model.likelihood == "bernoulli"
    x = torch.rand(5, 3, 4)
    mu, lv = model.encode(x)
    torch.testing.assert_close(mu, enc(x)[0])
    torch.testing.assert_close(model.decode(mu), torch.sigmoid(dec(mu)))
    p = torch.sigmoid(dec(mu)).flatten(1)
    ref = (x.flatten(1) * p.log() + (1 - x.flatten(1)) * (1 - p).log()).sum(1)
    torch.testing.assert_close(model.log_likelihood(x, mu), ref)
    torch.testing.assert_close(model.mean_encoder()(x), mu)
    assert set(model.mean_encoder().parameters()) <= set(enc.parameters())
    kl = 0.5 * (mu**2 + lv.exp() - lv - 1).sum(1)
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(derive_seed(3, "vae", "elbo")))
    torch.testing.assert_close(model.elbo(x, seed=3), model.log_likelihood(x, mu + (0.5 * lv).exp() * eps) - kl)


def test_as_vae_lazy_shape_mean_output_and_gaussian():
    torch.manual_seed(1)
    enc, dec = MyEncoder(), MyDecoder()
    lazy = as_vae(enc, dec, decoder_output="logits")
    with pytest.raises(ValueError, match="not known yet"):
        _ = lazy.input_shape
    x = torch.rand(4, 3, 4)
    lazy.encode(x)
    assert lazy.input_shape == (3, 4) and lazy.latent_dim == 2

    class MeanDec(nn.Module):
        def forward(self, z):
            return torch.sigmoid(dec(z))

    mm = as_vae(enc, MeanDec(), decoder_output="mean", input_shape=(3, 4))
    z = torch.randn(4, 2)
    torch.testing.assert_close(mm.decode(z), torch.sigmoid(dec(z)))  # exact decoder mean
    torch.testing.assert_close(mm.log_likelihood(x, z), lazy.log_likelihood(x, z), atol=1e-4, rtol=1e-5)

    g = as_vae(enc, dec, likelihood="gaussian", decoder_output="mean", gaussian_std=0.5, input_shape=(3, 4))
    ref = stats.norm.logpdf(x.flatten(1).numpy(), dec(z).detach().flatten(1).numpy(), 0.5).sum(1)
    np.testing.assert_allclose(g.log_likelihood(x, z).detach().numpy(), ref, rtol=1e-5)
    assert vaefast.as_vae is as_vae


def test_as_vae_mismatch_and_bad_arguments():
    with pytest.raises(ValueError, match="encoder/decoder mismatch"):
        as_vae(MyEncoder(), MyDecoder(d_out=10, out_shape=(10,)), decoder_output="logits", input_shape=(12,))
    with pytest.raises(ValueError, match="decoder failed"):
        as_vae(MyEncoder(d=2), MyDecoder(d=3), decoder_output="logits", input_shape=(12,))
    with pytest.raises(ValueError, match="latent_dim=3"):
        as_vae(MyEncoder(d=2), MyDecoder(d=2), decoder_output="logits", input_shape=(12,), latent_dim=3)
    with pytest.raises(ValueError, match=r"\(mu, logvar\)"):
        as_vae(nn.Linear(12, 2), MyDecoder(), decoder_output="logits", input_shape=(12,))
    with pytest.raises(ValueError, match="likelihood"):
        as_vae(MyEncoder(), MyDecoder(), likelihood="poisson", decoder_output="logits")
    with pytest.raises(ValueError, match="decoder_output"):
        as_vae(MyEncoder(), MyDecoder(), decoder_output="probs")
    with pytest.raises(TypeError, match="encoder"):
        as_vae(lambda x: x, MyDecoder(), decoder_output="logits")
