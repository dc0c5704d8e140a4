"""The maximum-damage attack (SPEC §1): the perturbation of norm ``<= eps`` (or ``= eps``) that pushes the
reconstruction furthest from the clean reference ``g(mu(x))``:

``delta* = argmax_{||delta|| <= eps, x + delta in box} E_eta ||g(mu(x + delta) + eta sigma(x + delta)) - g(mu(x))||``

with ``eta ~ N(0, I_d)`` (mode "mean_var", the paper's attack on mean and variance) or ``eta = 0`` (mode "mean").
The expectation uses ``num_noise_samples`` draws fixed per restart (common random numbers), so the objective
the optimiser sees is a smooth deterministic function of delta.
"""

from __future__ import annotations

import torch

from vaefast._checks import (
    analysis,
    check_box,
    check_choice,
    check_inputs,
    check_model,
    check_positive_int,
    check_seed,
    check_tensor,
)
from vaefast.attacks.base import (
    CONSTRAINTS,
    AttackResult,
    LoopConfig,
    box_offsets,
    check_eps_feasible,
    check_loop_args,
    latent_noise,
    lp_norms,
    optimise,
    parse_eps,
    stack_results,
)

MODES = ("mean_var", "mean")


class MaxDamageAttack:
    """Maximum-damage attack on a VAE (torchattacks/foolbox style: configure once, call on batches).

    ``eps``: float, per-point tensor ``[B]``, or a list of floats (a curve: result fields gain a leading eps
    axis). ``norm`` "L2"/"Linf"; ``constraint`` "ball" (``||delta|| <= eps``) or "sphere" (``= eps``, used by the
    margin search); ``box`` the data range (``None``: unbounded inputs). ``optimizer``: "pgd" (normalised-gradient
    ascent with exact projections), "adam" (same projection), "lbfgsb" (scipy per point, the original protocol).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        eps: float | torch.Tensor | list[float],
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
        self.model = check_model(model)
        check_loop_args(norm, steps, step_size, restarts, optimizer, seed)
        self.constraint = check_choice("constraint", constraint, CONSTRAINTS)
        self.mode = check_choice("mode", mode, MODES)
        self.num_noise_samples = check_positive_int("num_noise_samples", num_noise_samples)
        self.box = check_box(box)
        if isinstance(eps, (int, float)) and not isinstance(eps, bool):
            parse_eps(eps, 1, torch.device("cpu"))  # validate early
        self.eps = eps
        self.cfg = LoopConfig(
            norm, constraint, steps, step_size, restarts, optimizer, check_seed("seed", seed), bool(progress)
        )

    @property
    def norm(self) -> str:
        return self.cfg.norm

    def damage(
        self, x: torch.Tensor, x_adv: torch.Tensor, eta: torch.Tensor | None, reference: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``mean_s ||g(mu(x_adv) + eta_s * sigma(x_adv)) - g(mu(x))||_2`` per point (``eta[B, S, d]``)."""
        model = self.model
        if reference is None:
            with torch.no_grad():
                reference = model.decode(model.encode(x)[0]).reshape(x.shape[0], -1)
        mu, logvar = model.encode(x_adv)
        if eta is None or self.mode == "mean":
            z = mu.unsqueeze(1)
        else:
            z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eta.to(mu.dtype)
        b, s, d = z.shape
        recon = model.decode(z.reshape(b * s, d)).reshape(b, s, -1)
        sq = (recon - reference.unsqueeze(1)).pow(2).sum(-1)
        return torch.sqrt(sq + 1e-20).mean(1)

    @analysis
    def attack(
        self,
        x: torch.Tensor,
        eps: float | torch.Tensor | list[float] | None = None,
        point_ids: torch.Tensor | None = None,
        init: torch.Tensor | None = None,
    ) -> AttackResult:
        """Attack every point of ``x[B, *input_shape]``. ``eps`` overrides the configured radius;
        ``point_ids`` (global indices, default ``arange(B)``) key the random numbers, so a point gets the same
        attack in any batch; ``init`` (shape of x) warm-starts the first restart (PGD/Adam), e.g. with the
        perturbation found at a nearby radius rescaled to the new one. The model runs in eval mode (every
        submodule's training flag restored afterwards); a model without a known input shape learns it from x."""
        x = check_inputs(self.model, x)
        b = x.shape[0]
        eps_list, curve = parse_eps(self.eps if eps is None else eps, b, x.device)
        if point_ids is None:
            point_ids = torch.arange(b)
        elif not isinstance(point_ids, torch.Tensor) or point_ids.shape != (b,):
            raise ValueError(f"point_ids must be a tensor of shape [{b}]")
        lo, hi = box_offsets(x, self.box)
        if init is not None:
            init = check_tensor("init", init)
            if init.shape != x.shape:
                raise ValueError(f"init must have the shape of x {tuple(x.shape)}, got {tuple(init.shape)}")
            init = init.reshape(b, -1)
        results = [self._attack_one(x, e, lo, hi, point_ids.cpu(), init) for e in eps_list]
        return stack_results(results) if curve else results[0]

    __call__ = attack

    def _attack_one(self, x, eps, lo, hi, point_ids, init=None) -> AttackResult:
        if self.constraint == "sphere":
            check_eps_feasible(eps, self.norm, lo, hi)
        model = self.model
        s = 1 if self.mode == "mean" else self.num_noise_samples
        with torch.no_grad():
            reference = model.decode(model.encode(x)[0]).reshape(x.shape[0], -1)
        noises = [
            None
            if self.mode == "mean"
            else latent_noise(point_ids, s, model.latent_dim, self.cfg.seed, r, x.dtype, x.device)
            for r in range(self.cfg.restarts)
        ]

        def objective(x_adv: torch.Tensor, restart: int, rows: torch.Tensor) -> torch.Tensor:
            eta = None if noises[restart] is None else noises[restart][rows]
            return self.damage(x[rows], x_adv, eta, reference[rows])

        delta, value = optimise(objective, x, eps, lo, hi, self.cfg, point_ids, desc="max-damage", init=init)
        delta = delta.view_as(x)
        with torch.no_grad():
            initial = self.damage(x, x, noises[0], reference)
        return AttackResult(
            x_adv=(x + delta).detach(),
            delta=delta.detach(),
            norms=lp_norms(delta, self.norm).detach(),
            objective=value.to(x.dtype),
            eps=eps.to(x.dtype),
            initial_objective=initial.detach(),
            norm=self.norm,
        )
