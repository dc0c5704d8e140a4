"""The copyable examples run as a user would run them (small settings; skipped without their optional packages)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latent_diffusion_vae(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    image = pytest.importorskip("PIL.Image")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16), layers_per_block=1, latent_channels=2, norm_num_groups=4, sample_size=16,
        )  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    (tmp_path / "pngs").mkdir()
    pixels = (torch.rand(24, 20, 3) * 255).to(torch.uint8).numpy()
    image.fromarray(pixels).save(tmp_path / "pngs" / "a.png")
    example = _example("latent_diffusion_vae")
    common = ["--size", "16", "--samples", "32", "--steps", "2", "--max-radius", "0.5"]
    example.main([str(tmp_path / "vae"), "--images", str(tmp_path / "pngs"), "--num-images", "3", "--r", "8", *common])
    out = capsys.readouterr().out
    assert "images (1, 3, 16, 16)" in out and "latent size d = 128" in out
    assert "p_hat = " in out and "r* = " in out and "certificate: " in out
    assert "bound = " in out and "numerical margin > 0.5" in out
    example.main([str(tmp_path / "vae"), "--num-images", "2", "--r", "1", *common])  # random images, not r-robust
    out = capsys.readouterr().out
    assert "images (2, 3, 16, 16)" in out and "bound: none" in out and "numerical margin = 0" in out


def test_your_own_vae(capsys):
    """The README's quickstart as a script: a foreign VAE trained by its own loop, every analysis printed; the sound
    certificate is below the evidence of a break, and the margin's estimate inside its bracket."""
    example = _example("your_own_vae")
    est, bound, margin, cert = example.main(steps=300)
    robust = est.decision[:, 0] == 1
    assert bool(robust.any()) and bool((bound.certified == robust).all()) and bool(((cert.radius > 0) == robust).all())
    upper = margin.upper[robust]
    assert bool((cert.radius[robust] <= upper).all())
    assert bool((margin.lower[robust] <= margin.margin[robust]).all())
    assert bool((margin.margin[robust] <= upper).all())
    out = capsys.readouterr().out
    for title in ("RRobustnessResult:", "MarginBound:", "NumericalMargin:", "Certificate:"):
        assert title in out
    enc, dec = example.build_and_train(steps=300)
    again = example.build_and_train(steps=300)[0]
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), again.state_dict().values(), strict=True))
