"""Latent-space targeted attack (Tabacof 2016, Gondim-Ribeiro 2018, Kos 2018, Willetts 2021, Kuzina 2021):
move the encoder's posterior ``q(z|x + delta)`` toward the target's ``q(z|x_t)``.

Penalised: ``min_delta D(q(z|x+delta), q(z|x_t)) + lam ||delta||_2`` over the box; budget: ``min D`` subject to
``||delta|| <= eps`` (L2 or L-inf). ``D`` is KL, symmetric KL, 2-Wasserstein or ``||mu - mu_t||_2``
(:func:`vaefast.attacks.targeted.gaussian_divergence`).
"""

from __future__ import annotations

from typing import Any

import torch

from vaefast._checks import check_choice
from vaefast.attacks.base import AttackCall
from vaefast.attacks.targeted import TargetedAttack, gaussian_divergence

DIVERGENCES = ("kl", "skl", "w2", "mean_l2")


class LatentAttack(TargetedAttack):
    """Targeted attack in latent space: ``L(x_adv) = D(q(z|x_adv), q(z|x_t))``.

    ``result.objective`` is the divergence to the target posterior; ``result.extra`` holds ``latent_distance``
    ``||mu(x_adv) - mu(x_t)||``, ``target_distance`` ``||g(mu(x_adv)) - x_t||``, ``reconstruction_distance``
    ``||g(mu(x_adv)) - g(mu(x))||`` (all L2), ``input_distance`` ``||delta||_2`` and ``lam``.

    Args:
        model: a protocol model.
        target: ``[1 or B, *input_shape]`` target points.
        divergence: "kl", "skl", "w2" or "mean_l2" (see :func:`gaussian_divergence`).
        **kwargs: the settings of :class:`TargetedAttack` (mode, lam, eps, norm, steps, ...).
    """

    name = "latent"

    def __init__(self, model: torch.nn.Module, target: torch.Tensor, divergence: str = "kl", **kwargs: Any) -> None:
        self.divergence = check_choice("divergence", divergence, DIVERGENCES)
        super().__init__(model, target, **kwargs)

    def _cache(self, call: AttackCall, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The target posterior ``(mu_t, logvar_t)``, ``[B, d]`` each."""
        with torch.no_grad():
            mu_t, logvar_t = self.model.encode(target)
        return {"mu_t": mu_t, "logvar_t": logvar_t}

    def loss(self, call: AttackCall, x_adv: torch.Tensor, rows: torch.Tensor, restart: int) -> torch.Tensor:
        """``D(q(z|x_adv), q(z|x_t)) -> [b]`` for the points ``rows`` (deterministic: ``restart`` is unused).

        Args:
            call: the call (target posterior in ``call.data.cache``).
            x_adv: attacked points ``[b, *input_shape]``.
            rows: their rows in the batch.
            restart: unused.

        Returns:
            ``[b]``.
        """
        cache = call.data.cache
        mu, logvar = self.model.encode(x_adv)
        return gaussian_divergence(self.divergence, mu, logvar, cache["mu_t"][rows], cache["logvar_t"][rows])

    def _extra(self, call: AttackCall, x_adv: torch.Tensor) -> dict[str, torch.Tensor]:
        """Latent, target and reconstruction distances at ``x_adv`` (L2, per point)."""
        model = self.model
        mu_adv = model.encode(x_adv)[0]
        recon_adv = model.decode(mu_adv).flatten(1)
        recon = model.decode(model.encode(call.x)[0]).flatten(1)
        return {
            "latent_distance": torch.linalg.vector_norm(mu_adv - call.data.cache["mu_t"], dim=1),
            "target_distance": torch.linalg.vector_norm(recon_adv - call.data.target.flatten(1), dim=1),
            "reconstruction_distance": torch.linalg.vector_norm(recon_adv - recon, dim=1),
        }
