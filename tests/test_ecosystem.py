"""The ecosystem adapters on small random models built here (no downloads): diffusers' AutoencoderKL (skipped
without diffusers) and the ``encode -> [mu, log_var]`` convention; model sources (``diffusers:PATH``,
``module:function``) and the command line on a tiny AutoencoderKL."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import vaefast
from vaefast.cli import main
from vaefast.models import ForeignVAE, from_diffusers, from_encode_decode, load_source


def tiny_kl(in_channels: int = 3, size: int = 16, latent: int = 2, **config) -> nn.Module:
    """A random ``AutoencoderKL`` of about 40 k parameters: ``[C, size, size] -> [latent, size/2, size/2]``."""
    diffusers = pytest.importorskip("diffusers")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return diffusers.AutoencoderKL(
            in_channels=in_channels, out_channels=in_channels, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=latent, norm_num_groups=4, sample_size=size, **config,
        ).eval()  # fmt: skip


# --- diffusers ---------------------------------------------------------------------------------------------------
def test_from_diffusers_maps_range_latents_and_decoder():
    kl = tiny_kl()
    model = from_diffusers(kl)
    assert isinstance(model, ForeignVAE) and model.likelihood == "gaussian"
    x = torch.rand(3, 3, 16, 16)
    mu, logvar = model.encode(x)  # the first input fixes the shapes
    assert model.input_shape == (3, 16, 16) and model.latent_dim == 2 * 8 * 8
    with torch.no_grad():
        dist = kl.encode(2 * x - 1).latent_dist
        torch.testing.assert_close(mu, dist.mean.flatten(1))
        torch.testing.assert_close(logvar, dist.logvar.flatten(1))
        z = torch.randn(4, model.latent_dim)
        expected = (kl.decode(z.reshape(4, 2, 8, 8)).sample + 1) / 2
        torch.testing.assert_close(model.decode(z), expected)
    # any image size: a fresh adapter learns it from its first input
    other = from_diffusers(kl, input_shape=(3, 32, 16))
    assert other.latent_dim == 2 * 16 * 8


def test_diffusion_scaling_changes_latents_not_input_space_results():
    kl = tiny_kl(scaling_factor=0.5, shift_factor=0.1)
    plain, scaled = from_diffusers(kl), from_diffusers(kl, scaling="diffusion")
    x = torch.rand(2, 3, 16, 16)
    mu, logvar = plain.encode(x)
    mu_s, logvar_s = scaled.encode(x)
    torch.testing.assert_close(mu_s, (mu - 0.1) * 0.5)
    torch.testing.assert_close(logvar_s, logvar + 2 * math.log(0.5))
    torch.testing.assert_close(scaled.decode(mu_s), plain.decode(mu), rtol=1e-5, atol=1e-5)
    a = vaefast.margin_bound(plain, x, 4.0, num_samples=64, jacobian="exact")
    b = vaefast.margin_bound(scaled, x, 4.0, num_samples=64, jacobian="exact")
    torch.testing.assert_close(a.p_hat, b.p_hat)
    torch.testing.assert_close(a.bound, b.bound, rtol=1e-4, atol=0)
    torch.testing.assert_close(a.whitened_bound, b.whitened_bound, rtol=1e-4, atol=0)
    torch.testing.assert_close(b.sigma_min, a.sigma_min * 0.5, rtol=1e-5, atol=0)
    # per-channel latent statistics (the SDXL-style pipelines) take precedence
    stats = tiny_kl(scaling_factor=0.5, latents_mean=[0.2, -0.1], latents_std=[2.0, 4.0])
    mu0 = from_diffusers(stats).encode(x)[0].reshape(2, 2, 8, 8)
    mu1 = from_diffusers(stats, scaling="diffusion").encode(x)[0].reshape(2, 2, 8, 8)
    expected = (mu0 - torch.tensor([0.2, -0.1]).view(1, 2, 1, 1)) * 0.5 / torch.tensor([2.0, 4.0]).view(1, 2, 1, 1)
    torch.testing.assert_close(mu1, expected)


def test_margin_bound_on_autoencoder_kl_randomized_limits_hold():
    """d = 128 latents: "auto" is exact; the randomized limits contain the exact norms (one draw; coverage over
    many seeds is tested in test_randomized_jacobian)."""
    model = from_diffusers(tiny_kl())
    x = torch.rand(2, 3, 16, 16)
    est = vaefast.estimate_r_robustness(model, x, [4.0], num_samples=64)
    exact = vaefast.margin_bound(model, x, 4.0, estimate=est)
    rand = vaefast.margin_bound(model, x, 4.0, estimate=est, jacobian="randomized")
    assert exact.jac_method == "exact" and rand.jac_method == "randomized"
    assert bool((rand.jac_frobenius_upper >= exact.jac_frobenius).all())
    assert bool((rand.jac_spectral >= exact.jac_spectral * (1 - 1e-6)).all())
    assert bool((rand.jac_whitened_spectral >= exact.jac_whitened_spectral * (1 - 1e-6)).all())
    assert bool((rand.certified_bound <= exact.certified_bound * (1 + 1e-6)).all())


def test_from_diffusers_refuses_bad_arguments():
    with pytest.raises(TypeError, match="AutoencoderKL"):
        from_diffusers(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="scaling must be one of"):
        from_diffusers(tiny_kl(), scaling="sd")
    with pytest.raises(ValueError, match="latents_mean / latents_std"):
        from_diffusers(tiny_kl(latents_mean=[0.0] * 3, latents_std=[1.0] * 3), scaling="diffusion")


# --- encode -> [mu, log_var] -------------------------------------------------------------------------------------
class ListVAE(nn.Module):
    """The PyTorch-VAE convention: ``encode`` returns ``[mu, log_var]``, ``decode`` a Tanh image in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            self.enc = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 32), nn.ReLU())
            self.mu, self.var = nn.Linear(32, 5), nn.Linear(32, 5)
            self.dec = nn.Sequential(nn.Linear(5, 2 * 6 * 6), nn.Tanh(), nn.Unflatten(1, (2, 6, 6)))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.enc(x)
        return [self.mu(h), self.var(h)]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec(z)


def make_list_vae() -> nn.Module:
    """Entry point for the ``module:function`` source test."""
    return from_encode_decode(ListVAE(), decoder_output="mean", data_range=(-1, 1))


def test_from_encode_decode():
    net = ListVAE()
    model = from_encode_decode(net, decoder_output="mean", data_range=(-1, 1), input_shape=(2, 6, 6))
    x = torch.rand(4, 2, 6, 6)
    mu, logvar = model.encode(x)
    with torch.no_grad():
        ref_mu, ref_lv = net.encode(2 * x - 1)
        torch.testing.assert_close(mu, ref_mu)
        torch.testing.assert_close(logvar, ref_lv)
        torch.testing.assert_close(model.decode(mu), (net.decode(ref_mu) + 1) / 2)
    mb = vaefast.margin_bound(model, x, 1.0, num_samples=64)
    assert mb.jac_method == "exact" and bool(torch.isfinite(mb.bound).all())
    with pytest.raises(TypeError, match="decoder_output"):
        from_encode_decode(net)
    with pytest.raises(ValueError, match="logits"):
        from_encode_decode(net, "bernoulli", decoder_output="logits", data_range=(-1, 1))
    with pytest.raises(ValueError, match="data_range"):
        from_encode_decode(net, decoder_output="mean", data_range=(1, -1))
    with pytest.raises(TypeError, match="encode"):
        from_encode_decode(nn.Linear(2, 2), decoder_output="mean")
    single = nn.Module()
    single.encode, single.decode = (lambda x: x), (lambda z: z)
    with pytest.raises(ValueError, match=r"\[mu, log_var\]"):
        from_encode_decode(single, decoder_output="mean", input_shape=(3,))


# --- sources and the command line --------------------------------------------------------------------------------
def test_sources(tmp_path, monkeypatch):
    kl = tiny_kl(in_channels=1, size=8)
    kl.save_pretrained(tmp_path / "kl")
    model = load_source(f"diffusers:{tmp_path / 'kl'}")
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x)[0], kl.encode(2 * x - 1).latent_dist.mean.flatten(1))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    entry = load_source(f"{Path(__file__).stem}:make_list_vae")
    assert isinstance(entry, ForeignVAE) and not entry.training
    with pytest.raises(FileNotFoundError, match="no AutoencoderKL folder"):
        load_source(f"diffusers:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="cannot load an AutoencoderKL"):
        (tmp_path / "empty").mkdir()
        load_source(f"diffusers:{tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="model entry point"):
        load_source("no_such_module_here:make")
    with pytest.raises(TypeError, match="wrap foreign models"):
        load_source("torch.nn:Identity")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(ValueError, match="pip install 'vaefast\\[diffusers\\]'"):
        load_source(f"diffusers:{tmp_path / 'kl'}")


def test_cli_sweep_and_report_on_autoencoder_kl(tmp_path, capsys):
    kl = tiny_kl(in_channels=1, size=8)
    kl.save_pretrained(tmp_path / "kl")
    db = tmp_path / "kl.db"
    args = [
        "sweep", "--model", f"kl=diffusers:{tmp_path / 'kl'}", "--data", "digits", "--points", "2", "--samples", "64",
        "--radii", "1.3", "--db", str(db), "--no-progress", "--attack-steps", "3", "--max-radius", "2.0",
    ]  # fmt: skip
    assert main(args) == 0
    assert "1 units computed" in capsys.readouterr().out
    assert main(["report", str(db), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "index.html").is_file()
