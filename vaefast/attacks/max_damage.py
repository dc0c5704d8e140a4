"""The maximum-damage attack: the perturbation of norm ``<= eps`` (or ``= eps``) that pushes the reconstruction
furthest from the clean reference ``g(mu(x))``:

``delta* = argmax_{||delta|| <= eps, x + delta in box} E_eta ||g(mu(x + delta) + eta sigma(x + delta)) - g(mu(x))||``

with ``eta ~ N(0, I_d)`` (mode "mean_var", the paper's attack on mean and variance) or ``eta = 0`` (mode "mean").
The expectation uses ``num_noise_samples`` draws fixed per restart (common random numbers, stream
``"attack-noise"`` keyed by the global point id), so the objective the optimiser sees is a smooth deterministic
function of delta and a point gets the same attack in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vaefast._checks import check_choice, check_positive_int, check_seed
from vaefast.attacks.base import Attack, AttackCall, EpsSpec, check_eps
from vaefast.attacks.engine import CONSTRAINTS, LoopConfig, check_loop_args, restart_noise
from vaefast.models.likelihoods import reparameterise

MODES = ("mean_var", "mean")


@dataclass(frozen=True)
class _DamageData:
    """Per-call data: the clean reconstructions ``g(mu(x))`` ``[B, D']`` and the fixed noise ``[B, R, S, d]``."""

    reference: torch.Tensor
    noise: torch.Tensor | None


class MaxDamageAttack(Attack):
    """Maximum-damage attack on a VAE: ``max_delta mean_s ||g(mu(x + delta) + eta_s sigma(x + delta)) - g(mu(x))||_2``.

    Configure once, call on batches (``attack(x, eps=None, point_ids=None, init=None)`` or ``attack(x)``).

    Args:
        model: a protocol model.
        eps: float, per-point tensor ``[B]``, or a list of floats (a curve: result fields gain a leading eps axis).
        norm: "L2" or "Linf".
        constraint: "ball" (``||delta|| <= eps``) or "sphere" (``||delta|| = eps``, used by the margin search).
        mode: "mean_var" (``eta ~ N(0, I)``) or "mean" (``eta = 0``: ``||g(mu(x + delta)) - g(mu(x))||``).
        steps: optimiser iterations per restart.
        step_size: initial step length (default: see :func:`vaefast.attacks.engine.default_step`).
        restarts: random restarts per point (each with its own fixed noise); the best is kept.
        num_noise_samples: S, draws of eta per restart.
        box: the data range ``(a, b)``; None for unbounded inputs.
        optimizer: "pgd" (normalised-gradient ascent with exact projections), "adam" (same projection),
            "lbfgsb" (scipy per point, the original protocol).
        seed: keys the noise and the random starts.
        progress: show a progress bar.
    """

    name = "max-damage"

    def __init__(
        self,
        model: torch.nn.Module,
        eps: EpsSpec,
        norm: str = "L2",
        constraint: str = "ball",
        mode: str = "mean_var",
        steps: int = 50,
        step_size: float | None = None,
        restarts: int = 1,
        num_noise_samples: int = 8,
        box: tuple[float, float] | None = (0.0, 1.0),
        optimizer: str = "pgd",
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        check_loop_args(norm, steps, step_size, restarts, optimizer, seed)
        self.constraint = check_choice("constraint", constraint, CONSTRAINTS)
        self.mode = check_choice("mode", mode, MODES)
        self.num_noise_samples = check_positive_int("num_noise_samples", num_noise_samples)
        check_eps(eps)
        seed = check_seed("seed", seed)
        cfg = LoopConfig(norm, constraint, steps, step_size, restarts, optimizer, seed, bool(progress))
        super().__init__(model, eps, box, cfg)

    def damage(
        self, x: torch.Tensor, x_adv: torch.Tensor, eta: torch.Tensor | None, reference: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The attack's objective at ``x_adv``.

        Args:
            x: clean points ``[B, *input_shape]`` (used for the reference when none is given).
            x_adv: attacked points, same shape.
            eta: fixed noise ``[B, S, d]``, or None (mode "mean" ignores it too).
            reference: ``g(mu(x))`` flattened ``[B, D']``, or None to compute it.

        Returns:
            ``[B]``: ``mean_s sqrt(||g(mu(x_adv) + eta_s sigma(x_adv)) - g(mu(x))||_2^2 + 1e-20)``.
        """
        model = self.model
        if reference is None:
            with torch.no_grad():
                reference = model.decode(model.encode(x)[0]).reshape(x.shape[0], -1)
        mu, logvar = model.encode(x_adv)
        if eta is None or self.mode == "mean":
            z = mu.unsqueeze(1)
        else:
            z = reparameterise(mu, logvar, eta.to(mu.dtype))
        b, s, d = z.shape
        recon = model.decode(z.reshape(b * s, d)).reshape(b, s, -1)
        sq = (recon - reference.unsqueeze(1)).pow(2).sum(-1)
        return torch.sqrt(sq + 1e-20).mean(1)

    def _prepare(self, call: AttackCall, reference: torch.Tensor | None = None, **options: Any) -> _DamageData:
        """The clean reconstructions (``reference``: ``g(mu(x))`` ``[B, D']`` if already known) and, in mode
        "mean_var", ``eta[b, r, s] ~ N(0, I_d)`` keyed by point id."""
        super()._prepare(call, **options)
        x, model = call.x, self.model
        if reference is None:
            with torch.no_grad():
                reference = model.decode(model.encode(x)[0]).reshape(x.shape[0], -1)
        if self.mode == "mean":
            return _DamageData(reference, None)
        cfg = self.cfg
        noise = restart_noise(
            call.point_ids, cfg.restarts, self.num_noise_samples, model.latent_dim, cfg.seed, "attack-noise",
            x.dtype, x.device,
        )  # fmt: skip
        return _DamageData(reference, noise)

    def _objective(self, call: AttackCall, x_adv: torch.Tensor, restart: int, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`damage` of the points ``rows`` under restart ``restart``'s noise."""
        data: _DamageData = call.data
        eta = None if data.noise is None else data.noise[rows, restart]
        return self.damage(call.x[rows], x_adv, eta, data.reference[rows])

    def _report(
        self, call: AttackCall, delta: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The best damage found (over steps and restarts) and the damage at ``delta = 0`` under restart 0's noise."""
        data: _DamageData = call.data
        eta = None if data.noise is None else data.noise[:, 0]
        initial = self.damage(call.x, call.x, eta, data.reference)
        return value.to(call.x.dtype), initial, {}
