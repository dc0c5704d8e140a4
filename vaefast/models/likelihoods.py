"""Gaussian densities and observation models p(x|z).

The diagonal-Gaussian pieces every objective shares are written once here: the log-density (latent posteriors,
the prior, Gaussian likelihoods and baselines), the KL to the standard normal prior, the reparameterisation
``z = mu + sigma * eps`` and the "repeat x once per latent sample" layout of ``log p(x | z_s)``.

Observation models map the decoder's output to the likelihood mean g(z) and to log p(x|z) per point. Decoder
outputs ("natural outputs"): logits for ``bernoulli`` and ``continuous_bernoulli``, the mean for the Gaussians.
Every ``log_prob`` sums over all non-batch dimensions and returns ``[N]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.distributions import ContinuousBernoulli

LOG_2PI = math.log(2 * math.pi)


# --- diagonal Gaussians ----------------------------------------------------------------------------------------------
def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor | float) -> torch.Tensor:
    """Element-wise ``log N(x; mean, e^logvar) = -1/2 ((x - mean)^2 e^-logvar + logvar + log 2 pi)``.

    Args:
        x: the points.
        mean: the means (broadcast against ``x``).
        logvar: the log-variances, a tensor (broadcast) or one number.

    Returns:
        The log-densities in the broadcast shape, not reduced.
    """
    inv_var = torch.exp(-logvar) if isinstance(logvar, torch.Tensor) else math.exp(-logvar)
    return -0.5 * ((x - mean).pow(2) * inv_var + logvar + LOG_2PI)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, *, per_dimension: bool = False) -> torch.Tensor:
    """``KL(N(mu, diag e^logvar) || N(0, I)) = 1/2 sum_k (mu_k^2 + e^logvar_k - logvar_k - 1)``.

    Args:
        mu: ``[..., d]`` the means.
        logvar: ``[..., d]`` the log-variances.
        per_dimension: return the terms of the sum (one KL per latent dimension) instead of the sum.

    Returns:
        ``[...]`` (or ``[..., d]`` with ``per_dimension``).
    """
    terms = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1)
    return terms if per_dimension else terms.sum(-1)


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``z = mu + exp(logvar / 2) * eps``.

    Args:
        mu: ``[B, d]``.
        logvar: ``[B, d]``.
        eps: ``[B, d]`` or ``[B, S, d]`` standard normals.

    Returns:
        ``z`` of ``eps``'s shape (``mu``, ``sigma`` broadcast over the samples).
    """
    if eps.dim() == mu.dim() + 1:
        mu, logvar = mu.unsqueeze(1), logvar.unsqueeze(1)
    return mu + torch.exp(0.5 * logvar) * eps


def repeat_per_sample(x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Every point repeated once per latent sample, in the layout of ``z[B, S, d].reshape(B * S, d)``.

    Args:
        x: ``[B, *shape]``.
        num_samples: ``S``.

    Returns:
        ``[B * S, *shape]`` with row ``b * S + s`` equal to ``x[b]`` (an expanded view, copied by the reshape).
    """
    b = x.shape[0]
    return x.unsqueeze(1).expand(b, num_samples, *x.shape[1:]).reshape(b * num_samples, *x.shape[1:])


def soft_bound(raw: torch.Tensor, bound: float) -> torch.Tensor:
    """``bound * tanh(raw / bound)``: identity near 0, smooth, confined to ``(-bound, bound)``.

    Args:
        raw: the unconstrained values.
        bound: the limit (``<= 0``: no limit).

    Returns:
        The bounded values (``raw`` itself when ``bound <= 0``).
    """
    return raw if bound <= 0 else bound * torch.tanh(raw / bound)


# --- observation models ----------------------------------------------------------------------------------------------
class Likelihood(nn.Module):
    """An observation model ``p(x | z)`` read from the decoder's natural output ``out = f(z)``.

    Subclasses implement ``mean(out) = g(z)``, ``log_prob(x, out) = log p(x | z)`` summed per point, and
    ``output_from_mean(mean)`` (the natural output whose mean is ``mean``).
    """

    name = ""

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """The likelihood mean.

        Args:
            out: ``[N, *shape]`` the decoder's natural output.

        Returns:
            ``g(z)`` ``[N, *shape]``.
        """
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The log-likelihood of each point.

        Args:
            x: ``[N, *shape]`` the data.
            out: ``[N, *shape]`` the decoder's natural output.

        Returns:
            ``[N]`` ``log p(x | z)`` summed over all non-batch dimensions.
        """
        raise NotImplementedError

    def output_from_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """The natural output whose likelihood mean is ``mean`` (the inverse of :meth:`mean`).

        Args:
            mean: ``[N, *shape]`` likelihood means.

        Returns:
            ``[N, *shape]`` natural outputs.
        """
        raise NotImplementedError


class Bernoulli(Likelihood):
    """``log p(x|z) = sum_j x_j log p_j + (1 - x_j) log(1 - p_j)``, ``p = sigmoid(logits)`` (x may be grey-level).

    ``mean(logits) = sigmoid(logits)``; ``output_from_mean(p) = logit(p)`` (p clamped to ``[1e-6, 1 - 1e-6]``).
    """

    name = "bernoulli"

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """``sigmoid(logits)``."""
        return torch.sigmoid(out)

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``sum_j x_j log p_j + (1 - x_j) log(1 - p_j)``, ``p = sigmoid(logits)``."""
        return -F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)

    def output_from_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """``logit(p)``."""
        return torch.logit(mean, eps=1e-6)


class Gaussian(Likelihood):
    """``log N(x; m, s^2 I) = sum_j log N(x_j; m_j, s^2)`` with a fixed ``s``; the decoder returns the mean ``m``.

    Args:
        std: ``s > 0``.
    """

    name = "gaussian"

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = float(std)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """The decoder's output itself."""
        return out

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``sum_j log N(x_j; m_j, s^2)``."""
        return gaussian_log_density(x, out, 2.0 * math.log(self.std)).flatten(1).sum(1)

    def output_from_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """The mean itself."""
        return mean


class GaussianLearned(Likelihood):
    """``log N(x; m, diag e^v)`` with a learned log-variance ``v`` (one per pixel or one scalar).

    ``v = b tanh(raw / b)`` (:func:`soft_bound`, ``b = logvar_bound``); the decoder returns the mean ``m``.

    Args:
        input_shape: the shape of one point (of ``v`` when ``per_pixel``).
        per_pixel: one log-variance per pixel (else one scalar).
        logvar_bound: ``b``.
    """

    name = "gaussian_learned"

    def __init__(self, input_shape: tuple[int, ...], per_pixel: bool, logvar_bound: float = 10.0) -> None:
        super().__init__()
        self.raw_logvar = nn.Parameter(torch.zeros(input_shape if per_pixel else ()))
        self.logvar_bound = float(logvar_bound)

    def logvar(self) -> torch.Tensor:
        """The bounded log-variance.

        Returns:
            ``v = b tanh(raw / b)``, of shape ``input_shape`` or ``()``.
        """
        return soft_bound(self.raw_logvar, self.logvar_bound)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """The decoder's output itself."""
        return out

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``sum_j log N(x_j; m_j, e^v_j)``."""
        return gaussian_log_density(x, out, self.logvar().to(out.dtype)).flatten(1).sum(1)

    def output_from_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """The mean itself."""
        return mean


class ContinuousBernoulliLikelihood(Likelihood):
    """Continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): ``p(x|l) = C(l) l^x (1-l)^(1-x)`` on [0, 1].

    ``mean(logits)`` is the distribution's mean ``l/(2l-1) + 1/(2 artanh(1-2l))``, not ``l = sigmoid(logits)``;
    there is no ``output_from_mean`` (decoders must return logits).
    """

    name = "continuous_bernoulli"

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """``l/(2l-1) + 1/(2 artanh(1-2l))``, ``l = sigmoid(logits)``."""
        return ContinuousBernoulli(logits=out, validate_args=False).mean

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``sum_j log C(l_j) + x_j log l_j + (1 - x_j) log(1 - l_j)``."""
        return ContinuousBernoulli(logits=out, validate_args=False).log_prob(x).flatten(1).sum(1)

    def output_from_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """Not available: always raises ``ValueError``."""
        raise ValueError("likelihood='continuous_bernoulli' needs a decoder returning logits (decoder_output='logits')")


def make_likelihood(
    name: str,
    input_shape: tuple[int, ...],
    *,
    gaussian_std: float = 0.1,
    learned_variance: str = "pixel",
    logvar_bound: float = 10.0,
) -> Likelihood:
    """The observation model called ``name``.

    Args:
        name: one of bernoulli, gaussian, gaussian_learned, continuous_bernoulli.
        input_shape: the shape of one point.
        gaussian_std: the fixed standard deviation of ``gaussian``.
        learned_variance: ``"pixel"`` or ``"scalar"`` log-variance of ``gaussian_learned``.
        logvar_bound: the soft bound of the learned log-variance.

    Returns:
        The :class:`Likelihood` module.
    """
    if name == "bernoulli":
        return Bernoulli()
    if name == "gaussian":
        return Gaussian(gaussian_std)
    if name == "gaussian_learned":
        return GaussianLearned(tuple(input_shape), learned_variance == "pixel", logvar_bound)
    if name == "continuous_bernoulli":
        return ContinuousBernoulliLikelihood()
    raise ValueError(
        f"likelihood must be one of ['bernoulli', 'gaussian', 'gaussian_learned', 'continuous_bernoulli'], got {name!r}"
    )
