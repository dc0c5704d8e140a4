"""The VAE model protocol (shared base class) and vaefast's own configurable ``VAE``.

Encoder ``q(z|x) = N(mu(x), diag exp(logvar(x)))``, prior ``p(z) = N(0, I)``, decoder ``p(x|z)`` from
:mod:`vaefast.models.likelihoods`. Single-sample ELBO with the analytic KL:
``ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))``, ``KL = 1/2 sum_k (mu_k^2 + s_k^2 - log s_k^2 - 1)``.

Seeds: ``VAE(config, seed)`` initialises its parameters from ``rng.derive_seed(seed, "vae", "init")`` and
``elbo(x, seed=s)`` draws its noise from a generator seeded with ``rng.derive_seed(s, "vae", "elbo")``, so neither
shares numbers with training (:mod:`vaefast.training`) run with the same seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vaefast import rng
from vaefast._checks import check_positive_int, check_seed, check_tensor
from vaefast.models.config import VAEConfig
from vaefast.models.likelihoods import (
    Likelihood,
    gaussian_kl,
    gaussian_log_density,
    make_likelihood,
    reparameterise,
    repeat_per_sample,
    soft_bound,
)
from vaefast.models.networks import build_networks
from vaefast.rng import derive_seed

__all__ = ["VAE", "BaseVAE", "LossTerms", "sample_latent"]


@dataclass
class LossTerms:
    """Batch means of the training objective and its parts.

    Attributes:
        loss: what the optimiser minimises.
        elbo: ``recon - kl`` (always with the analytic KL).
        recon: ``log p(x | z)``, ``z ~ q(z|x)``.
        kl: ``KL(q(z|x) || N(0, I))``.
        tc, mi, dimkl: the β-TCVAE decomposition (None for the other objectives).
    """

    loss: torch.Tensor
    elbo: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    tc: torch.Tensor | None = None
    mi: torch.Tensor | None = None
    dimkl: torch.Tensor | None = None


def sample_latent(
    mu: torch.Tensor, logvar: torch.Tensor, num_samples: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Reparameterised samples ``z = mu + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` from ``generator``.

    Args:
        mu: ``[B, d]``.
        logvar: ``[B, d]``.
        num_samples: None for one sample per point, else ``S``.
        generator: the source of ``eps`` (None: torch's global generator).

    Returns:
        ``[B, d]`` (or ``[B, S, d]``).
    """
    shape = mu.shape if num_samples is None else (mu.shape[0], num_samples, mu.shape[1])
    eps = torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return reparameterise(mu, logvar, eps)


def _generator(seed: int | None, generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """The ELBO's noise generator: the caller's, one seeded from ``derive_seed(seed, "vae", "elbo")``, or None."""
    if generator is not None:
        if seed is not None:
            raise ValueError("pass either seed or generator, not both")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    if seed is None:
        return None
    return rng.generator(seed, "vae", "elbo", device=device)


def _total_correlation_terms(
    z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, dataset_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(MI, TC, dimKL)`` per point from minibatch-weighted sampling (Chen et al. 2018).

    ``log q(z_i) ~ logsumexp_j log q(z_i|x_j) - log(N M)`` and ``log prod_k q(z_ik) ~ sum_k [logsumexp_j
    log q(z_ik|x_j) - log(N M)]`` (N = ``dataset_size``, M = batch size); ``MI = log q(z|x) - log q(z)``,
    ``TC = log q(z) - log prod_k q(z_k)``, ``dimKL = log prod_k q(z_k) - log p(z)``.
    """
    log_qzx = gaussian_log_density(z, mu, logvar).sum(1)
    log_pz = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
    mat = gaussian_log_density(z.unsqueeze(1), mu.unsqueeze(0), logvar.unsqueeze(0))  # [i, j, k]
    log_nm = math.log(dataset_size * z.shape[0])
    log_qz = torch.logsumexp(mat.sum(2), dim=1) - log_nm
    log_prod_qz = (torch.logsumexp(mat, dim=1) - log_nm).sum(1)
    return log_qzx - log_qz, log_qz - log_prod_qz, log_prod_qz - log_pz


class BaseVAE(nn.Module):
    """The model protocol on top of an encoder, a decoder and a :class:`Likelihood`.

    Subclasses set ``input_shape``, ``latent_dim``, ``likelihood`` (str), ``observation`` (a :class:`Likelihood`)
    and implement ``_encode_raw`` / ``decoder_output`` / ``mean_encoder``; the objective weights (``objective``,
    ``beta``, ``mi_weight``, ``tc_weight``, ``dimkl_weight``) select :meth:`loss`.
    """

    input_shape: tuple[int, ...]
    latent_dim: int
    likelihood: str
    observation: Likelihood
    objective: str = "elbo"
    beta: float = 1.0
    mi_weight: float = 1.0
    tc_weight: float = 1.0
    dimkl_weight: float = 1.0

    # --- to implement --------------------------------------------------------------------------------
    def _encode_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's natural output (logits or mean).

        Args:
            z: ``[N, d]``.

        Returns:
            ``[N, *input_shape]``.
        """
        raise NotImplementedError

    def mean_encoder(self) -> nn.Module:
        """``x -> mu(x)`` as a module sharing the encoder's parameters.

        Returns:
            The module.
        """
        raise NotImplementedError

    # --- checks --------------------------------------------------------------------------------------
    def _check_x(self, x: object, name: str = "x") -> torch.Tensor:
        x = check_tensor(name, x, finite=False)
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ValueError(
                f"{name} must have shape [B, {', '.join(map(str, self.input_shape))}], got {tuple(x.shape)}"
            )
        return x

    def _check_z(self, z: object, ndim: tuple[int, ...] = (2,)) -> torch.Tensor:
        z = check_tensor("z", z, ndim=ndim, finite=False)
        if z.shape[-1] != self.latent_dim:
            raise ValueError(f"z must have last dimension latent_dim={self.latent_dim}, got shape {tuple(z.shape)}")
        return z

    # --- the protocol --------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior ``q(z|x) = N(mu, diag e^logvar)``.

        Args:
            x: ``[B, *input_shape]``.

        Returns:
            ``(mu [B, d], logvar [B, d])``.
        """
        return self._encode_raw(self._check_x(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood mean ``g(z)``.

        Args:
            z: ``[N, d]``.

        Returns:
            ``[N, *input_shape]``.
        """
        return self.observation.mean(self.decoder_output(self._check_z(z)))

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``log p(x | z)`` of every point under one or several latent samples.

        Args:
            x: ``[B, *input_shape]``.
            z: ``[B, d]`` or ``[B, S, d]`` (S samples per point).

        Returns:
            ``[B]`` or ``[B, S]``.
        """
        x = self._check_x(x)
        z = self._check_z(z, ndim=(2, 3))
        if z.shape[0] != x.shape[0]:
            raise ValueError(f"x and z must have the same batch size, got {x.shape[0]} and {z.shape[0]}")
        if z.dim() == 2:
            return self.observation.log_prob(x, self.decoder_output(z))
        b, s, _ = z.shape
        out = self.decoder_output(z.reshape(b * s, -1))
        return self.observation.log_prob(repeat_per_sample(x, s), out).reshape(b, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic reconstruction ``g(mu(x))``.

        Args:
            x: ``[B, *input_shape]``.

        Returns:
            ``[B, *input_shape]``.
        """
        return self.decode(self.encode(x)[0])

    sample_latent = staticmethod(sample_latent)

    def elbo(
        self, x: torch.Tensor, num_samples: int = 1, seed: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Per-point ELBO ``mean_s log p(x|z_s) - KL(q(z|x) || N(0, I))``, ``z_s ~ q(z|x)``.

        Args:
            x: ``[B, *input_shape]``.
            num_samples: ``S``, latent samples per point.
            seed: reproducible noise from a generator seeded with ``rng.derive_seed(seed, "vae", "elbo")``.
            generator: the caller's generator instead (not with ``seed``); neither: torch's global generator.

        Returns:
            ``[B]``.
        """
        check_positive_int("num_samples", num_samples)
        x = self._check_x(x)
        gen = _generator(seed, generator, x.device)
        mu, logvar = self._encode_raw(x)
        if num_samples == 1:
            recon = self.log_likelihood(x, sample_latent(mu, logvar, generator=gen))
        else:
            recon = self.log_likelihood(x, sample_latent(mu, logvar, num_samples, gen)).mean(1)
        return recon - gaussian_kl(mu, logvar)

    def loss(
        self, x: torch.Tensor, dataset_size: int | None = None, generator: torch.Generator | None = None
    ) -> LossTerms:
        """The training objective (to minimise) and its components, as batch means, from one ``z ~ q(z|x)``.

        - ``elbo``: ``-(recon - KL)``; ``beta_vae``: ``-(recon - beta KL)``;
        - ``beta_tcvae`` (Chen et al. 2018): ``-(recon - a MI - b TC - c dimKL)`` with the minibatch-weighted
          sampling estimates of :func:`_total_correlation_terms` (a, b, c = ``mi_weight``, ``tc_weight``,
          ``dimkl_weight``).

        Args:
            x: ``[M, *input_shape]``.
            dataset_size: ``N``, the number of training points (β-TCVAE only; ``>= M``).
            generator: the source of the reparameterisation noise (None: torch's global generator).

        Returns:
            The :class:`LossTerms`.
        """
        x = self._check_x(x)
        mu, logvar = self._encode_raw(x)
        z = sample_latent(mu, logvar, generator=generator)
        recon = self.log_likelihood(x, z)
        kl = gaussian_kl(mu, logvar)
        elbo = (recon - kl).mean()
        if self.objective == "elbo":
            return LossTerms(-elbo, elbo, recon.mean(), kl.mean())
        if self.objective == "beta_vae":
            return LossTerms(-(recon - self.beta * kl).mean(), elbo, recon.mean(), kl.mean())
        if dataset_size is None:
            raise ValueError("objective='beta_tcvae' needs dataset_size (the number of training points)")
        check_positive_int("dataset_size", dataset_size, minimum=x.shape[0])
        mi, tc, dimkl = _total_correlation_terms(z, mu, logvar, dataset_size)
        objective = recon - self.mi_weight * mi - self.tc_weight * tc - self.dimkl_weight * dimkl
        return LossTerms(-objective.mean(), elbo, recon.mean(), kl.mean(), tc.mean(), mi.mean(), dimkl.mean())


class VAE(BaseVAE):
    """A VAE built from a :class:`VAEConfig` (MLP or conv encoder/decoder, any supported likelihood/objective).

    ``logvar = b tanh(raw / b)`` with ``b = config.logvar_bound`` (see :class:`VAEConfig`).

    Args:
        config: the architecture, likelihood and objective.
        seed: parameters are initialised from ``rng.derive_seed(seed, "vae", "init")`` (None: torch's global
            generator), so construction is reproducible.
    """

    def __init__(self, config: VAEConfig, seed: int | None = 0) -> None:
        super().__init__()
        if not isinstance(config, VAEConfig):
            raise TypeError(f"config must be a VAEConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.input_shape = tuple(config.input_shape)
        self.latent_dim = config.latent_dim
        self.likelihood = config.likelihood
        self.objective = config.objective
        self.beta = config.beta
        self.mi_weight, self.tc_weight, self.dimkl_weight = config.mi_weight, config.tc_weight, config.dimkl_weight
        if seed is None:
            self._build()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(check_seed("seed", seed), "vae", "init"))
                self._build()

    def _build(self) -> None:
        c = self.config
        self.encoder, self.decoder = build_networks(c)
        self.observation = make_likelihood(
            c.likelihood,
            self.input_shape,
            gaussian_std=c.gaussian_std,
            learned_variance=c.learned_variance,
            logvar_bound=c.logvar_bound,
        )

    def _encode_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, raw = self.encoder(x)
        return mu, soft_bound(raw, self.config.logvar_bound)

    def decoder_output(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder network's output (logits or mean).

        Args:
            z: ``[N, d]``.

        Returns:
            ``[N, *input_shape]``.
        """
        return self.decoder(z)

    def mean_encoder(self) -> nn.Sequential:
        """``x -> mu`` as an ``nn.Sequential`` sharing the encoder's parameters.

        Returns:
            For MLP encoders exactly ``Flatten, Linear, act, ..., Linear``, the form the fused Jacobian kernel
            recognises.
        """
        return self.encoder.mean_module()

    def extra_repr(self) -> str:
        """The architecture, likelihood, objective and latent size, for ``repr``.

        Returns:
            One line.
        """
        c = self.config
        return f"{c.architecture}, likelihood={c.likelihood}, objective={c.objective}, latent_dim={c.latent_dim}"
