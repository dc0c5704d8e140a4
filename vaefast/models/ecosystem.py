"""Thin adapters (on top of :func:`vaefast.models.as_vae`) for the VAEs of the PyTorch ecosystem.

- :func:`from_diffusers`: diffusers' ``AutoencoderKL`` (the latent-diffusion / Stable Diffusion VAE family):
  ``encode(x).latent_dist`` (``.mean``, ``.logvar``) and ``decode(z).sample``, images in ``[-1, 1]``.
- :func:`from_encode_decode`: the ``model.encode(x) -> [mu, log_var]`` / ``model.decode(z)`` convention of popular
  PyTorch VAE collections (e.g. AntixK/PyTorch-VAE), any data range.

vaefast's data live in ``[0, 1]``: the adapter maps ``x`` to the model's range ``[lo, hi]`` (``lo + (hi - lo) x``)
before the encoder and maps decoder means back (``(y - lo) / (hi - lo)``), so distances, radii ``r`` and margins are
in ``[0, 1]`` pixel units. Spatial latents (``[B, C, h, w]``) are flattened to ``[B, d]`` and reshaped for the
decoder (the layout comes from the last ``encode``: one forward of any input fixes it). The models' own weights are
shared, never copied; diffusers is not imported here (it is optional).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from vaefast._checks import check_choice, check_positive_float
from vaefast.models.adapter import ForeignVAE, as_vae

__all__ = ["DIFFUSERS_SCALINGS", "from_diffusers", "from_encode_decode"]

DIFFUSERS_SCALINGS = ("none", "diffusion")

Posterior = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Generator = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _diffusers_posterior(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dist = model.encode(x).latent_dist
    return dist.mean, dist.logvar


def _diffusers_decode(model: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return model.decode(z).sample


def _listed_posterior(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.encode(x)
    if not (isinstance(out, (list, tuple)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise ValueError(f"model.encode(x) must return [mu, log_var], got {type(out).__name__}")
    return out[0], out[1]


def _plain_decode(model: nn.Module, z: torch.Tensor) -> torch.Tensor:
    out = model.decode(z)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"model.decode(z) must return a tensor, got {type(out).__name__}")
    return out


class _Ported(nn.Module):
    """A foreign model's posterior and decoder in vaefast's conventions: data in ``[0, 1]``, flat latents.

    Latent coordinates may be an affine map of the model's own, ``z' = a z + b`` per channel (``a > 0``): then
    ``mu' = a mu + b``, ``logvar' = logvar + 2 log a`` and the decoder sees ``(z' - b) / a``.
    """

    def __init__(
        self, model: nn.Module, posterior: Posterior, generate: Generator, data_range: tuple[float, float],
        latent_scale: torch.Tensor, latent_shift: torch.Tensor,
    ) -> None:  # fmt: skip
        super().__init__()
        self.model, self.posterior, self.generate = model, posterior, generate
        self.lo, self.hi = data_range
        self.register_buffer("latent_scale", latent_scale, persistent=False)
        self.register_buffer("latent_shift", latent_shift, persistent=False)
        self.latent_shape: tuple[int, ...] | None = None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.posterior(self.model, self.lo + (self.hi - self.lo) * x)
        if mu.shape != logvar.shape or mu.dim() < 2:
            raise ValueError(f"the posterior's mean and log-variance must be [B, ...] alike, got {tuple(mu.shape)}")
        self.latent_shape = tuple(mu.shape[1:])
        scale = self.latent_scale.to(mu.dtype)
        mu = mu * scale + self.latent_shift.to(mu.dtype)
        return mu.flatten(1), (logvar + 2 * scale.log()).flatten(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.latent_shape is None:
            raise ValueError("the latent layout is not known yet: encode an input once (or pass input_shape=)")
        if z.shape[-1] != math.prod(self.latent_shape):
            raise ValueError(f"z must have {math.prod(self.latent_shape)} coordinates, got shape {tuple(z.shape)}")
        z = z.reshape(z.shape[0], *self.latent_shape)
        z = (z - self.latent_shift.to(z.dtype)) / self.latent_scale.to(z.dtype)
        return (self.generate(self.model, z) - self.lo) / (self.hi - self.lo)


class _Face(nn.Module):
    """``encode`` or ``decode`` of a :class:`_Ported` as a module (both faces share it)."""

    def __init__(self, ported: _Ported, method: str) -> None:
        super().__init__()
        self.ported, self.method = ported, method

    def forward(self, t: torch.Tensor):
        return getattr(self.ported, self.method)(t)


def _check_range(data_range: object) -> tuple[float, float]:
    if not (isinstance(data_range, Sequence) and len(data_range) == 2):
        raise TypeError(f"data_range must be a pair (lo, hi), got {data_range!r}")
    lo, hi = (float(v) for v in data_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"data_range must satisfy lo < hi (finite), got {data_range!r}")
    return lo, hi


def _port(
    model: nn.Module, posterior: Posterior, generate: Generator, data_range: tuple[float, float],
    scale: torch.Tensor, shift: torch.Tensor, **as_vae_kwargs,
) -> ForeignVAE:  # fmt: skip
    ported = _Ported(model, posterior, generate, data_range, scale, shift)
    return as_vae(_Face(ported, "encode"), _Face(ported, "decode"), **as_vae_kwargs)


def _diffusion_latents(config: object, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` ``[C, 1, 1]`` of the latents a diffusion model sees, ``z' = a z + b``, from a diffusers config:
    ``(z - latents_mean) scaling_factor / latents_std`` when the config has per-channel statistics (the SDXL-style
    pipelines), else ``(z - shift_factor) scaling_factor`` (``shift_factor`` 0 when absent)."""
    factor = float(getattr(config, "scaling_factor", 1.0) or 1.0)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean, dtype=torch.float64).reshape(-1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float64).reshape(-1, 1, 1)
        if mean_t.shape[0] != channels or std_t.shape[0] != channels:
            raise ValueError(f"latents_mean / latents_std must have {channels} entries (latent_channels)")
        scale = factor / std_t
        return scale, -mean_t * scale
    shift = float(getattr(config, "shift_factor", 0.0) or 0.0)
    return torch.full((1, 1, 1), factor, dtype=torch.float64), torch.full((1, 1, 1), -shift * factor).double()


def from_diffusers(
    vae: nn.Module,
    *,
    scaling: str = "none",
    input_shape: tuple[int, ...] | None = None,
    gaussian_std: float = 1.0,
) -> ForeignVAE:
    """Wrap a diffusers ``AutoencoderKL`` (e.g. a Stable Diffusion VAE) as a vaefast model.

    ``x`` in ``[0, 1]`` goes to the VAE as ``2 x - 1``; the posterior is ``latent_dist.mean`` / ``.logvar``
    (``[B, C, h, w]``, flattened to ``d = C h w``); the decoder mean is ``(decode(z).sample + 1) / 2`` (not clamped:
    the decoder's own mean map). The likelihood is Gaussian with the fixed ``gaussian_std`` (it enters only
    log-likelihoods, never p, r*, bounds or margins).

    Args:
        vae: an ``AutoencoderKL`` (anything with ``encode(x).latent_dist`` and ``decode(z).sample``).
        scaling: the latent coordinates. ``"none"``: the VAE's own posterior ``N(mean, exp(logvar))``.
            ``"diffusion"``: the latents a diffusion model sees, ``z' = (z - shift_factor) scaling_factor`` (or
            ``(z - latents_mean) scaling_factor / latents_std`` per channel when the config has them), with
            ``sigma' = sigma scaling_factor (/ latents_std)``; the decoder undoes it, as the pipelines do. Input-space
            results (p, r*, the bounds, margins, certificates) are the same for both; latent-space quantities
            (``latent_margin``, ``sigma_min``, ``||J||``, latent attacks) are in the chosen coordinates.
        input_shape: ``(C, H, W)`` (H, W multiples of the VAE's downsampling factor); None: the first input seen.
        gaussian_std: the Gaussian likelihood's standard deviation in ``[0, 1]`` pixel units.

    Returns:
        A :class:`~vaefast.models.ForeignVAE` (likelihood "gaussian", decoder output "mean") sharing the VAE's
        weights.

    Raises:
        TypeError: ``vae`` is no ``nn.Module`` with ``encode``/``decode``.
        ValueError: an unknown ``scaling``, or a config whose latent statistics do not fit its channels.
    """
    if not isinstance(vae, nn.Module) or not callable(getattr(vae, "encode", None)):
        raise TypeError(f"vae must be a diffusers AutoencoderKL (an nn.Module with encode/decode), got {type(vae)}")
    scaling = check_choice("scaling", scaling, DIFFUSERS_SCALINGS)
    check_positive_float("gaussian_std", gaussian_std)
    config = getattr(vae, "config", None)
    if scaling == "diffusion":
        scale, shift = _diffusion_latents(config, int(getattr(config, "latent_channels", 1)))
    else:
        scale, shift = torch.ones(1, 1, 1, dtype=torch.float64), torch.zeros(1, 1, 1, dtype=torch.float64)
    device = next((p.device for p in vae.parameters()), torch.device("cpu"))
    return _port(
        vae, _diffusers_posterior, _diffusers_decode, (-1.0, 1.0), scale.to(device), shift.to(device),
        likelihood="gaussian", decoder_output="mean", input_shape=input_shape, gaussian_std=gaussian_std,
    )  # fmt: skip


def from_encode_decode(
    model: nn.Module,
    likelihood: str = "gaussian",
    *,
    decoder_output: str | None = None,
    data_range: tuple[float, float] = (0.0, 1.0),
    input_shape: tuple[int, ...] | None = None,
    gaussian_std: float = 1.0,
) -> ForeignVAE:
    """Wrap a model with ``model.encode(x) -> [mu, log_var]`` and ``model.decode(z)`` (the PyTorch-VAE convention).

    Args:
        model: the VAE module (``encode`` returns a list or tuple ``[mu, log_var]``, ``[B, ...]`` each; ``decode``
            takes ``z`` of ``mu``'s shape).
        likelihood: as :func:`~vaefast.models.as_vae` ("gaussian", "bernoulli", "continuous_bernoulli").
        decoder_output: required, as :func:`~vaefast.models.as_vae`: "mean" (e.g. a Tanh image) or "logits".
        data_range: the model's data range ``(lo, hi)``, e.g. ``(-1, 1)`` for a Tanh decoder trained on ``2 x - 1``;
            inputs are mapped there and decoder means back to ``[0, 1]`` ("logits" needs ``(0, 1)``).
        input_shape: the per-point input shape; None: the first input seen.
        gaussian_std: the Gaussian likelihood's standard deviation (in ``[0, 1]`` units).

    Returns:
        A :class:`~vaefast.models.ForeignVAE` sharing the model's weights.

    Raises:
        TypeError: ``model`` lacks ``encode``/``decode``, or ``decoder_output`` not given.
        ValueError: a bad ``data_range`` or likelihood, or logits with a range other than ``(0, 1)``.
    """
    if not isinstance(model, nn.Module) or not all(callable(getattr(model, a, None)) for a in ("encode", "decode")):
        raise TypeError(f"model must be an nn.Module with encode() and decode(), got {type(model).__name__}")
    lo, hi = _check_range(data_range)
    if decoder_output == "logits" and (lo, hi) != (0.0, 1.0):
        raise ValueError(f"decoder_output='logits' needs data_range=(0, 1) (logits cannot be rescaled), got {(lo, hi)}")
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return _port(
        model, _listed_posterior, _plain_decode, (lo, hi), one.to(device), zero.to(device), likelihood=likelihood,
        decoder_output=decoder_output, input_shape=input_shape, gaussian_std=gaussian_std,
    )  # fmt: skip
