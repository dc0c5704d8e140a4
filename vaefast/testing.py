"""Ground truth: the linear-Gaussian VAE of the paper's analysis, where every robustness quantity has a closed form.

``mu(x) = A x + b``, constant isotropic ``sigma``, ``g(z) = W z + c`` with ``W = w Q`` (orthonormal Q).
Then ``Delta_delta = W (A delta + sigma eps)`` and ``||Delta_delta||^2 = (w sigma)^2 chi2_d(lam)`` with
non-centrality ``lam = ||A delta||^2 / sigma^2``, so p_r, r*, the bounds and the true margin (worst
direction: the top right-singular vector of A) follow from ``scipy.stats.chi2`` / ``ncx2``.
"""

from __future__ import annotations

import math

import torch
from scipy import optimize, stats
from torch import nn

from vaefast.models.likelihoods import gaussian_log_density


class LinearGaussianVAE(nn.Module):
    """A VAE with linear encoder mean, constant isotropic encoder sigma and a linear Gaussian decoder.

    ``mu(x) = A x + b``, ``sigma(x) = sigma``, ``g(z) = W z + c`` with ``W = decoder_scale * Q`` (Q: orthonormal
    columns), ``p(x|z) = N(g(z), I)``; ``A ~ N(0, 1/4)``, ``b ~ N(0, 1/16)``, ``c ~ U(0, 1/4)`` entrywise.

    Args:
        input_dim: ``D``.
        latent_dim: ``d``.
        sigma: the encoder's standard deviation.
        decoder_scale: ``w``.
        seed: of the weights (a ``torch.Generator`` of its own).
        dtype: of the weights.
    """

    def __init__(
        self,
        input_dim: int = 12,
        latent_dim: int = 3,
        sigma: float = 0.3,
        decoder_scale: float = 1.5,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.input_shape = (input_dim,)
        self.latent_dim = latent_dim
        self.likelihood = "gaussian"
        self.sigma = float(sigma)
        self.decoder_scale = float(decoder_scale)
        self.encoder_mean = nn.Linear(input_dim, latent_dim).to(dtype)
        self.decoder_linear = nn.Linear(latent_dim, input_dim).to(dtype)
        with torch.no_grad():
            self.encoder_mean.weight.copy_(torch.randn(latent_dim, input_dim, generator=gen, dtype=dtype) / 2)
            self.encoder_mean.bias.copy_(torch.randn(latent_dim, generator=gen, dtype=dtype) / 4)
            q, _ = torch.linalg.qr(torch.randn(input_dim, latent_dim, generator=gen, dtype=dtype))
            self.decoder_linear.weight.copy_(self.decoder_scale * q)
            self.decoder_linear.bias.copy_(torch.rand(input_dim, generator=gen, dtype=dtype) / 4)

    # --- the model protocol ----------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior ``N(A x + b, sigma^2 I)``.

        Args:
            x: ``[B, D]``.

        Returns:
            ``(mu [B, d], logvar [B, d] = 2 log sigma)``.
        """
        mu = self.encoder_mean(x)
        return mu, torch.full_like(mu, 2.0 * math.log(self.sigma))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder mean.

        Args:
            z: ``[N, d]``.

        Returns:
            ``g(z) = W z + c`` ``[N, D]``.
        """
        return self.decoder_linear(z)

    def mean_encoder(self) -> nn.Module:
        """``x -> A x + b``.

        Returns:
            ``nn.Sequential(encoder_mean)`` (sharing the weights).
        """
        return nn.Sequential(self.encoder_mean)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The Gaussian log-likelihood.

        Args:
            x: ``[B, D]``.
            z: ``[B, d]``.

        Returns:
            ``log N(x; g(z), I)`` per point ``[B]``.
        """
        return gaussian_log_density(x, self.decode(z), 0.0).flatten(1).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic reconstruction.

        Args:
            x: ``[B, D]``.

        Returns:
            ``g(mu(x))`` ``[B, D]``.
        """
        return self.decode(self.encode(x)[0])

    # --- closed forms --------------------------------------------------------------------------------
    @property
    def A(self) -> torch.Tensor:  # noqa: N802  (the maths' name)
        """The encoder Jacobian.

        Returns:
            ``A = J_mu`` ``[d, D]`` (detached).
        """
        return self.encoder_mean.weight.detach()

    def _scale(self) -> float:
        return self.decoder_scale * self.sigma

    def p_robust(self, r: float, delta: torch.Tensor | None = None) -> float:
        """Exact ``p_r(x, delta) = P(||Delta_delta|| <= r)`` (independent of x).

        ``||Delta_delta||^2 = (w sigma)^2 chi2_d(lam)``, ``lam = ||A delta||^2 / sigma^2``.

        Args:
            r: the radius.
            delta: ``[D]`` (or any shape with D entries), or None for 0.

        Returns:
            ``chi2.cdf((r / (w sigma))^2, d)`` (``ncx2`` with non-centrality ``lam`` when ``lam > 0``).
        """
        lam = 0.0 if delta is None else float((self.A @ delta.reshape(-1).to(self.A)).pow(2).sum()) / self.sigma**2
        t = (r / self._scale()) ** 2
        return float(stats.chi2.cdf(t, self.latent_dim) if lam == 0 else stats.ncx2.cdf(t, self.latent_dim, lam))

    def r_star(self) -> float:
        """The smallest r with ``p_r > 1/2`` in the infinite-sample limit: the median of ``||Delta||``.

        Returns:
            ``w sigma sqrt(chi2.ppf(1/2, d))``.
        """
        return self._scale() * math.sqrt(stats.chi2.ppf(0.5, self.latent_dim))

    def singular_values(self) -> torch.Tensor:
        """The singular values of ``A``.

        Returns:
            ``[min(d, D)]`` in descending order.
        """
        return torch.linalg.svdvals(self.A)

    def worst_direction(self) -> torch.Tensor:
        """The unit input direction that moves the latent mean most.

        Returns:
            The top right-singular vector of ``A`` ``[D]``.
        """
        return torch.linalg.svd(self.A, full_matrices=False).Vh[0]

    def bounds(self, r: float) -> dict[str, float]:
        """The first-order margin bounds at the exact ``p = p_r(x, 0)`` (all 0 when ``p <= 1/2``).

        With ``q = Phi^-1(p)``: ``latent_margin = sigma q``, ``bound = sigma q / ||A||_F``, ``spectral_bound =
        sigma q / ||A||_2``, ``whitened_bound = q / (||A||_2 / sigma)``.

        Args:
            r: the radius.

        Returns:
            Those four and ``p``, ``jac_frobenius``, ``jac_spectral``, ``sigma_min`` by name.
        """
        p = self.p_robust(r)
        q = stats.norm.ppf(p) if p > 0.5 else 0.0
        fro = float(torch.linalg.matrix_norm(self.A, "fro"))
        spec = float(self.singular_values()[0])
        return {
            "p": p,
            "latent_margin": self.sigma * q,
            "bound": self.sigma * q / fro,
            "spectral_bound": self.sigma * q / spec,
            "whitened_bound": q / (spec / self.sigma),
            "jac_frobenius": fro,
            "jac_spectral": spec,
            "sigma_min": self.sigma,
        }

    def true_margin(self, r: float) -> float:
        """The true margin: the smallest ``||delta||`` with ``p_r(x, delta) <= 1/2``.

        The worst direction is the top right-singular vector of ``A``; ``lam*`` solves ``ncx2.cdf(t, d, lam*) = 1/2``
        and the margin is ``sigma sqrt(lam*) / ||A||_2``.

        Args:
            r: the radius.

        Returns:
            The margin (0 if already non-robust at ``delta = 0``).
        """
        if self.p_robust(r) <= 0.5:
            return 0.0
        t = (r / self._scale()) ** 2
        d = self.latent_dim

        def excess(lam: float) -> float:
            return float(stats.ncx2.cdf(t, d, lam)) - 0.5 if lam > 0 else float(stats.chi2.cdf(t, d)) - 0.5

        hi = 1.0
        while excess(hi) > 0:
            hi *= 2
        lam_star = optimize.brentq(excess, 0.0, hi, xtol=1e-12, rtol=1e-12)
        return self.sigma * math.sqrt(lam_star) / float(self.singular_values()[0])
