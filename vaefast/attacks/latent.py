"""Latent-space targeted attack (Tabacof 2016, Gondim-Ribeiro 2018, Kos 2018, Willetts 2021, Kuzina 2021):
move the encoder's posterior ``q(z|x + delta)`` toward the target's ``q(z|x_t)``.

Penalised: ``min_delta D(q(z|x+delta), q(z|x_t)) + lam ||delta||_2`` over the box; budget: ``min D`` subject to
``||delta|| <= eps`` (L2 or L-inf). ``D`` is KL, symmetric KL, 2-Wasserstein or ``||mu - mu_t||_2``
(:func:`vaefast.attacks.targeted.gaussian_divergence`).
"""

from __future__ import annotations

import torch

from vaefast._checks import check_choice
from vaefast.attacks.targeted import TargetedAttack, gaussian_divergence

DIVERGENCES = ("kl", "skl", "w2", "mean_l2")


class LatentAttack(TargetedAttack):
    """Targeted attack in latent space. ``result.objective`` is the divergence to the target posterior."""

    name = "latent"

    def __init__(self, model: torch.nn.Module, target: torch.Tensor, divergence: str = "kl", **kwargs) -> None:
        self.divergence = check_choice("divergence", divergence, DIVERGENCES)
        super().__init__(model, target, **kwargs)

    def _prepare(self, x: torch.Tensor, target: torch.Tensor) -> None:
        with torch.no_grad():
            self._mu_t, self._logvar_t = self.model.encode(target)

    def loss(self, x_adv: torch.Tensor, rows: torch.Tensor, restart: int) -> torch.Tensor:
        mu, logvar = self.model.encode(x_adv)
        return gaussian_divergence(self.divergence, mu, logvar, self._mu_t[rows], self._logvar_t[rows])

    def _extra(self, x: torch.Tensor, x_adv: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.model
        mu_adv = model.encode(x_adv)[0]
        recon_adv = model.decode(mu_adv).flatten(1)
        recon = model.decode(model.encode(x)[0]).flatten(1)
        return {
            "latent_distance": torch.linalg.vector_norm(mu_adv - self._mu_t, dim=1),
            "target_distance": torch.linalg.vector_norm(recon_adv - target.flatten(1), dim=1),
            "reconstruction_distance": torch.linalg.vector_norm(recon_adv - recon, dim=1),
        }
