"""Output-space targeted attack (Kos 2018 / Gondim-Ribeiro 2018): make the reconstruction of ``x + delta``
match the target ``x_t``.

loss "mse": ``||x_t - g(mu(x + delta))||_2^2``; loss "elbo": the target's negative ELBO under the posterior of
the attacked input, ``E_{q(z|x+delta)}[-log p(x_t|z)] + KL(q(z|x+delta) || N(0, I))`` (``num_noise_samples``
draws fixed per restart). Penalised (``+ lam ||delta||_2``) or under a hard budget, as for the latent attack.
"""

from __future__ import annotations

import torch

from vaefast._checks import check_choice, check_positive_int
from vaefast.attacks.base import latent_noise
from vaefast.attacks.targeted import TargetedAttack

LOSSES = ("mse", "elbo")


class OutputAttack(TargetedAttack):
    """Targeted attack on the reconstruction. ``result.objective`` is the loss (squared distance or -ELBO)."""

    name = "output"

    def __init__(
        self, model: torch.nn.Module, target: torch.Tensor, loss: str = "mse", num_noise_samples: int = 8, **kwargs
    ) -> None:
        self.loss_kind = check_choice("loss", loss, LOSSES)
        self.num_noise_samples = check_positive_int("num_noise_samples", num_noise_samples)
        super().__init__(model, target, **kwargs)
        if self.loss_kind == "elbo" and not hasattr(model, "log_likelihood"):
            raise TypeError("loss='elbo' needs a model with log_likelihood(x, z)")

    def _prepare(self, x: torch.Tensor, target: torch.Tensor) -> None:
        self._target = target
        self._noise = None
        if self.loss_kind == "elbo":
            ids = torch.arange(x.shape[0])
            self._noise = [
                latent_noise(ids, self.num_noise_samples, self.model.latent_dim, self.cfg.seed, r, x.dtype, x.device)
                for r in range(self.cfg.restarts)
            ]

    def loss(self, x_adv: torch.Tensor, rows: torch.Tensor, restart: int) -> torch.Tensor:
        model = self.model
        mu, logvar = model.encode(x_adv)
        target = self._target[rows]
        if self.loss_kind == "mse":
            return (model.decode(mu).flatten(1) - target.flatten(1)).pow(2).sum(1)
        eta = self._noise[restart][rows]
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eta
        b, s, d = z.shape
        xt = target.unsqueeze(1).expand(b, s, *target.shape[1:]).reshape(b * s, *target.shape[1:])
        nll = -model.log_likelihood(xt, z.reshape(b * s, d)).reshape(b, s).mean(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1)
        return nll + kl

    def _extra(self, x: torch.Tensor, x_adv: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.model
        recon_adv = model.decode(model.encode(x_adv)[0]).flatten(1)
        recon = model.decode(model.encode(x)[0]).flatten(1)
        return {
            "target_distance": torch.linalg.vector_norm(recon_adv - target.flatten(1), dim=1),
            "reconstruction_distance": torch.linalg.vector_norm(recon_adv - recon, dim=1),
        }
