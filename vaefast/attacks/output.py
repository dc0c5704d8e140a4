"""Output-space targeted attack (Kos 2018 / Gondim-Ribeiro 2018): make the reconstruction of ``x + delta``
match the target ``x_t``.

loss "mse": ``||x_t - g(mu(x + delta))||_2^2``; loss "elbo": the target's negative ELBO under the posterior of
the attacked input, ``E_{q(z|x+delta)}[-log p(x_t|z)] + KL(q(z|x+delta) || N(0, I))`` with ``num_noise_samples``
draws fixed per restart (stream ``"elbo-noise"``, keyed by the global point id, so a point gets the same attack in
any batch). Penalised (``+ lam ||delta||_2``) or under a hard budget, as for the latent attack.
"""

from __future__ import annotations

from typing import Any

import torch

from vaefast._checks import check_choice, check_positive_int
from vaefast.attacks.base import AttackCall
from vaefast.attacks.engine import restart_noise
from vaefast.attacks.targeted import TargetedAttack
from vaefast.models.likelihoods import gaussian_kl, reparameterise

LOSSES = ("mse", "elbo")


class OutputAttack(TargetedAttack):
    """Targeted attack on the reconstruction: ``L = ||x_t - g(mu(x_adv))||^2`` or ``L = -ELBO(x_t; q(z|x_adv))``.

    ``result.objective`` is the loss; ``result.extra`` holds ``target_distance`` ``||g(mu(x_adv)) - x_t||``,
    ``reconstruction_distance`` ``||g(mu(x_adv)) - g(mu(x))||`` (L2), ``input_distance`` and ``lam``.

    Args:
        model: a protocol model (with ``log_likelihood`` for ``loss="elbo"``).
        target: ``[1 or B, *input_shape]`` target points.
        loss: "mse" or "elbo".
        num_noise_samples: S, draws of ``z ~ q(z|x_adv)`` per restart for the ELBO.
        **kwargs: the settings of :class:`TargetedAttack` (mode, lam, eps, norm, steps, ...).
    """

    name = "output"

    def __init__(
        self,
        model: torch.nn.Module,
        target: torch.Tensor,
        loss: str = "mse",
        num_noise_samples: int = 8,
        **kwargs: Any,
    ) -> None:
        self.loss_kind = check_choice("loss", loss, LOSSES)
        self.num_noise_samples = check_positive_int("num_noise_samples", num_noise_samples)
        super().__init__(model, target, **kwargs)

    def _requires(self) -> tuple[str, ...]:
        """``log_likelihood`` for the ELBO."""
        return ("log_likelihood",) if self.loss_kind == "elbo" else ()

    def _cache(self, call: AttackCall, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """For the ELBO: ``eta[b, r, s] ~ N(0, I_d)`` keyed by (seed, "elbo-noise", point id, r S + s)."""
        if self.loss_kind != "elbo":
            return {}
        x, cfg = call.x, self.cfg
        noise = restart_noise(
            call.point_ids, cfg.restarts, self.num_noise_samples, self.model.latent_dim, cfg.seed, "elbo-noise",
            x.dtype, x.device,
        )  # fmt: skip
        return {"noise": noise}

    def loss(self, call: AttackCall, x_adv: torch.Tensor, rows: torch.Tensor, restart: int) -> torch.Tensor:
        """The loss of the points ``rows`` at ``x_adv``.

        Args:
            call: the call (targets and noise in ``call.data``).
            x_adv: attacked points ``[b, *input_shape]``.
            rows: their rows in the batch.
            restart: which restart's noise the ELBO uses.

        Returns:
            ``[b]``: mse ``||x_t - g(mu)||_2^2``; elbo
            ``-mean_s log p(x_t | mu + sigma eta_s) + 1/2 sum(mu^2 + sigma^2 - log sigma^2 - 1)``, with
            ``(mu, log sigma^2) = encode(x_adv)``.
        """
        model = self.model
        mu, logvar = model.encode(x_adv)
        target = call.data.target[rows]
        if self.loss_kind == "mse":
            return (model.decode(mu).flatten(1) - target.flatten(1)).pow(2).sum(1)
        eta = call.data.cache["noise"][rows, restart]
        z = reparameterise(mu, logvar, eta)
        b, s, d = z.shape
        xt = target.unsqueeze(1).expand(b, s, *target.shape[1:]).reshape(b * s, *target.shape[1:])
        nll = -model.log_likelihood(xt, z.reshape(b * s, d)).reshape(b, s).mean(1)
        kl = gaussian_kl(mu, logvar)
        return nll + kl

    def _extra(self, call: AttackCall, x_adv: torch.Tensor) -> dict[str, torch.Tensor]:
        """Target and reconstruction distances at ``x_adv`` (L2, per point)."""
        model = self.model
        recon_adv = model.decode(model.encode(x_adv)[0]).flatten(1)
        recon = model.decode(model.encode(call.x)[0]).flatten(1)
        return {
            "target_distance": torch.linalg.vector_norm(recon_adv - call.data.target.flatten(1), dim=1),
            "reconstruction_distance": torch.linalg.vector_norm(recon_adv - recon, dim=1),
        }
