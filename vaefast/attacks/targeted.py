"""Shared machinery of the targeted attacks (latent and output): penalised form ``loss + lam ||delta||_2``
(box-constrained Adam by default) or hard-budget form (``||delta|| <= eps``, PGD by default), and the log-spaced
lambda sweep of Gondim-Ribeiro et al. (2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vaefast._checks import (
    analysis,
    check_box,
    check_choice,
    check_inputs,
    check_model,
    check_positive_float,
    check_positive_int,
    check_seed,
)
from vaefast.attacks.base import (
    AttackResult,
    LoopConfig,
    box_offsets,
    check_loop_args,
    lp_norms,
    optimise,
    parse_eps,
    stack_results,
)

TARGET_MODES = ("penalised", "budget")


@dataclass
class LambdaSweep:
    """Penalised attacks at each ``lams[L]``; ``result`` fields have a leading lambda axis."""

    lams: torch.Tensor
    result: AttackResult

    def to_rows(self) -> list[dict]:
        rows = self.result.to_rows()
        n_points = self.result.norms.shape[-1]
        for i, row in enumerate(rows):
            row["lam"] = float(self.lams[i // n_points])
        return rows


class TargetedAttack:
    """Base: subclasses implement ``loss(x_adv, rows, restart) -> [b]`` (to minimise) and ``_extra``."""

    name = "targeted"

    def __init__(
        self,
        model: torch.nn.Module,
        target: torch.Tensor,
        mode: str = "penalised",
        lam: float = 1.0,
        eps: float | torch.Tensor | list[float] | None = None,
        norm: str = "L2",
        steps: int = 100,
        step_size: float | None = None,
        restarts: int = 1,
        box: tuple[float, float] | None = (0.0, 1.0),
        optimizer: str | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        self.model = check_model(model)
        # a model without a known input shape (lazy as_vae adapter) learns it from the target, in eval mode
        self.target = check_inputs(self.model, target, "target").detach()
        self.mode = check_choice("mode", mode, TARGET_MODES)
        self.lam = check_positive_float("lam", lam, allow_zero=True)
        if self.mode == "budget" and eps is None:
            raise ValueError("mode='budget' needs eps (the norm budget)")
        if self.mode == "budget" and isinstance(eps, (int, float)):
            check_positive_float("eps", eps)
        self.eps = eps
        if optimizer is None:
            optimizer = "adam" if self.mode == "penalised" else "pgd"
        check_loop_args(norm, steps, step_size, restarts, optimizer, check_seed("seed", seed))
        check_positive_int("steps", steps)
        self.box = check_box(box)
        constraint = "none" if self.mode == "penalised" else "ball"
        self.cfg = LoopConfig(
            norm,
            constraint,
            steps,
            step_size,
            restarts,
            optimizer,
            seed,
            bool(progress),
            random_start=self.mode == "budget",
        )

    @property
    def norm(self) -> str:
        return self.cfg.norm

    # --- to implement --------------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def loss(self, x_adv: torch.Tensor, rows: torch.Tensor, restart: int) -> torch.Tensor:
        raise NotImplementedError

    def _extra(self, x: torch.Tensor, x_adv: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # --- driver --------------------------------------------------------------------------------------
    def _targets(self, x: torch.Tensor) -> torch.Tensor:
        t = self.target
        if t.shape[0] == 1:
            return t.expand(x.shape[0], *t.shape[1:]).to(x.dtype)
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"target must have batch size 1 or {x.shape[0]} (that of x), got {t.shape[0]}")
        return t.to(x.dtype)

    @analysis
    def attack(
        self,
        x: torch.Tensor,
        lam: float | None = None,
        eps: float | list[float] | torch.Tensor | None = None,
        point_ids: torch.Tensor | None = None,
    ) -> AttackResult:
        """Attack ``x[B, *input_shape]`` toward the target(s); ``objective`` is the attack loss (without the
        penalty), lower is a stronger attack; ``extra`` holds the distances. The model runs in eval mode (every
        submodule's training flag restored afterwards)."""
        x = check_inputs(self.model, x)
        target = self._targets(x)
        lam = self.lam if lam is None else check_positive_float("lam", lam, allow_zero=True)
        b = x.shape[0]
        point_ids = torch.arange(b) if point_ids is None else point_ids.cpu()
        lo, hi = box_offsets(x, self.box)
        self._prepare(x, target)
        if self.mode == "budget":
            eps_list, curve = parse_eps(self.eps if eps is None else eps, b, x.device)
        else:
            eps_list, curve = [torch.full((b,), float("inf"), dtype=torch.float64, device=x.device)], False
        out = []
        for e in eps_list:
            penal = lam if self.mode == "penalised" else 0.0

            def objective(x_adv: torch.Tensor, restart: int, rows: torch.Tensor, penal: float = penal) -> torch.Tensor:
                val = -self.loss(x_adv, rows, restart)
                if penal:
                    d = (x_adv - x[rows]).flatten(1)
                    val = val - penal * torch.sqrt(d.pow(2).sum(1) + 1e-20)
                return val

            delta, _ = optimise(objective, x, e, lo, hi, self.cfg, point_ids, desc=self.name)
            delta = delta.view_as(x).detach()
            x_adv = x + delta
            with torch.no_grad():
                rows = torch.arange(b, device=x.device)
                final = self.loss(x_adv, rows, 0)
                initial = self.loss(x, rows, 0)
                extra = self._extra(x, x_adv, target)
            extra["input_distance"] = lp_norms(delta, "L2")
            extra["lam"] = torch.full((b,), float(lam), dtype=x.dtype, device=x.device)
            out.append(
                AttackResult(
                    x_adv=x_adv,
                    delta=delta,
                    norms=lp_norms(delta, self.norm),
                    objective=final,
                    eps=e.to(x.dtype),
                    initial_objective=initial,
                    norm=self.norm,
                    extra=extra,
                )
            )
        return stack_results(out) if curve else out[0]

    __call__ = attack

    @analysis
    def sweep(
        self,
        x: torch.Tensor,
        lams: torch.Tensor | list[float] | None = None,
        num: int = 41,
        log2_range: tuple[float, float] = (-20.0, 20.0),
    ) -> LambdaSweep:
        """Penalised attacks over log-spaced ``lam = 2^k``, ``k`` in ``linspace(*log2_range, num)`` (or ``lams``)."""
        if self.mode != "penalised":
            raise ValueError("sweep needs mode='penalised'")
        if lams is None:
            check_positive_int("num", num)
            lams_t = torch.logspace(log2_range[0], log2_range[1], num, base=2.0, dtype=torch.float64)
        else:
            lams_t = torch.as_tensor(lams, dtype=torch.float64)
            if lams_t.dim() != 1 or lams_t.numel() == 0 or bool((lams_t < 0).any()):
                raise ValueError("lams must be a non-empty 1-D sequence of numbers >= 0")
        results = [self.attack(x, lam=float(v)) for v in lams_t]
        return LambdaSweep(lams_t, stack_results(results))


def gaussian_divergence(
    kind: str, mu: torch.Tensor, logvar: torch.Tensor, mu_t: torch.Tensor, logvar_t: torch.Tensor
) -> torch.Tensor:
    """Divergence between diagonal Gaussians ``q = N(mu, e^logvar)`` and ``q_t = N(mu_t, e^logvar_t)``, per row.

    kl: ``KL(q||q_t) = 1/2 sum(logvar_t - logvar + (e^logvar + (mu - mu_t)^2) / e^logvar_t - 1)``;
    skl: ``KL(q||q_t) + KL(q_t||q)``; w2: ``W_2 = sqrt(||mu - mu_t||^2 + ||sigma - sigma_t||^2)``;
    mean_l2: ``||mu - mu_t||_2``.
    """

    def kl(m1, lv1, m2, lv2):
        return 0.5 * (lv2 - lv1 + (lv1.exp() + (m1 - m2).pow(2)) / lv2.exp() - 1).sum(-1)

    if kind == "kl":
        return kl(mu, logvar, mu_t, logvar_t)
    if kind == "skl":
        return kl(mu, logvar, mu_t, logvar_t) + kl(mu_t, logvar_t, mu, logvar)
    if kind == "w2":
        sq = (mu - mu_t).pow(2).sum(-1) + (torch.exp(0.5 * logvar) - torch.exp(0.5 * logvar_t)).pow(2).sum(-1)
        return torch.sqrt(sq + 1e-20)
    return torch.sqrt((mu - mu_t).pow(2).sum(-1) + 1e-20)
