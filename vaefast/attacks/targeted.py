"""What the targeted attacks (latent and output) share: the penalised form ``min loss + lam ||delta||_2`` over
the box (Adam by default), the hard-budget form ``min loss`` s.t. ``||delta|| <= eps`` (PGD by default), and the
log-spaced lambda sweep of Gondim-Ribeiro et al. (2018)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from vaefast._checks import (
    check_choice,
    check_inputs,
    check_positive_float,
    check_positive_int,
    check_seed,
    eval_mode,
)
from vaefast.attacks.base import (
    Attack,
    AttackCall,
    AttackResult,
    EpsSpec,
    broadcast_target,
    check_eps,
    stack_results,
)
from vaefast.attacks.engine import LoopConfig, check_loop_args, lp_norms

TARGET_MODES = ("penalised", "budget")


@dataclass
class LambdaSweep:
    """Penalised attacks at each of ``lams[L]``.

    Attributes:
        lams: the penalty weights ``[L]``.
        result: an :class:`AttackResult` whose fields have a leading lambda axis ``[L, B, ...]``.
    """

    lams: torch.Tensor
    result: AttackResult

    def to_rows(self) -> list[dict]:
        """The result's rows (:meth:`AttackResult.to_rows`), each with its ``lam``.

        Returns:
            ``L * B`` dicts of Python scalars.
        """
        rows = self.result.to_rows()
        n_points = self.result.norms.shape[-1]
        for i, row in enumerate(rows):
            row["lam"] = float(self.lams[i // n_points])
        return rows


@dataclass(frozen=True)
class TargetData:
    """Per-call data of a targeted attack.

    Attributes:
        target: the targets ``x_t`` of the batch ``[B, *input_shape]``.
        lam: the penalty weight of this call.
        cache: what the attack precomputed from the targets (e.g. the target posterior, fixed noise).
    """

    target: torch.Tensor
    lam: float
    cache: dict[str, torch.Tensor] = field(default_factory=dict)


class TargetedAttack(Attack):
    """Base of the targeted attacks: ``min_delta L(x + delta, x_t) + lam ||delta||_2`` over the box (penalised) or
    ``min L`` s.t. ``||delta|| <= eps`` and the box (budget).

    Subclasses implement :meth:`loss` (``L``, per point) and :meth:`_extra` (their distances), and may precompute
    per-call data from the targets in :meth:`_cache`. ``result.objective`` is ``L`` at delta (without the penalty;
    lower is a stronger attack), ``result.initial_objective`` ``L`` at ``delta = 0``.

    Args:
        model: a protocol model.
        target: ``[1, *input_shape]`` (one target for every point) or ``[B, *input_shape]`` (one per point);
            a model without a known input shape learns it from the target.
        mode: "penalised" or "budget".
        lam: the penalty weight (penalised; reported in both modes).
        eps: the norm budget (budget mode; float, per-point tensor or a list for a curve).
        norm: "L2" or "Linf" (the budget's norm).
        steps, step_size, restarts, optimizer, seed, progress: the engine's settings; ``optimizer`` defaults to
            "adam" (penalised) or "pgd" (budget). Penalised attacks start at ``delta = 0``, budget attacks at a
            random point of the ball.
        box: the data range ``(a, b)``; None for unbounded inputs.
    """

    name = "targeted"

    def __init__(
        self,
        model: torch.nn.Module,
        target: torch.Tensor,
        mode: str = "penalised",
        lam: float = 1.0,
        eps: EpsSpec | None = None,
        norm: str = "L2",
        steps: int = 100,
        step_size: float | None = None,
        restarts: int = 1,
        box: tuple[float, float] | None = (0.0, 1.0),
        optimizer: str | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        self.mode = check_choice("mode", mode, TARGET_MODES)
        self.lam = check_positive_float("lam", lam, allow_zero=True)
        if self.mode == "budget":
            if eps is None:
                raise ValueError("mode='budget' needs eps (the norm budget)")
            check_eps(eps)
        if optimizer is None:
            optimizer = "adam" if self.mode == "penalised" else "pgd"
        check_loop_args(norm, steps, step_size, restarts, optimizer, check_seed("seed", seed))
        constraint = "none" if self.mode == "penalised" else "ball"
        budget = self.mode == "budget"
        cfg = LoopConfig(norm, constraint, steps, step_size, restarts, optimizer, seed, bool(progress), budget)
        super().__init__(model, eps, box, cfg, requires=self._requires())
        self.target = check_inputs(self.model, target, "target").detach()

    # --- to implement ----------------------------------------------------------------------------------------
    def _requires(self) -> tuple[str, ...]:
        """Model methods the attack needs beyond ``encode``/``decode``."""
        return ()

    def loss(self, call: AttackCall, x_adv: torch.Tensor, rows: torch.Tensor, restart: int) -> torch.Tensor:
        """``L(x_adv, x_t) -> [b]`` (to minimise) for the points ``rows`` of the call's batch.

        Args:
            call: the call (targets in ``call.data``).
            x_adv: attacked points ``[b, *input_shape]``.
            rows: their rows in the batch ``[b]``.
            restart: which restart's fixed random numbers to use.

        Returns:
            ``[b]``.
        """
        raise NotImplementedError

    def _cache(self, call: AttackCall, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-call tensors computed once from the targets ``[B, *input_shape]`` (default: none)."""
        return {}

    def _extra(self, call: AttackCall, x_adv: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attack-specific per-point distances at ``x_adv`` for the result's ``extra``."""
        raise NotImplementedError

    # --- the hooks of Attack -----------------------------------------------------------------------------------
    def _parse_eps(self, eps: object, batch: int, device: torch.device) -> tuple[list[torch.Tensor], bool]:
        """Budget mode: the radii of :meth:`Attack._parse_eps`; penalised mode: ``eps = inf`` (no norm bound)."""
        if self.mode == "budget":
            return super()._parse_eps(eps, batch, device)
        if eps is not None:
            raise ValueError("eps applies to mode='budget' only; the penalised attack's strength is lam=")
        return [torch.full((batch,), float("inf"), dtype=torch.float64, device=device)], False

    def _prepare(
        self, call: AttackCall, lam: float | None = None, target: torch.Tensor | None = None, **options: Any
    ) -> TargetData:
        """Per-call options: ``lam`` (overrides the configured penalty weight) and ``target`` (overrides the
        configured targets: ``[1, *input_shape]`` or ``[B, *input_shape]``)."""
        super()._prepare(call, **options)
        lam = self.lam if lam is None else check_positive_float("lam", lam, allow_zero=True)
        target = self.target if target is None else check_inputs(self.model, target, "target").detach()
        target = broadcast_target(target, call.x)
        return TargetData(target, lam, self._cache(call, target))

    def _objective(self, call: AttackCall, x_adv: torch.Tensor, restart: int, rows: torch.Tensor) -> torch.Tensor:
        """``-L(x_adv) - lam ||x_adv - x||_2`` (penalised) or ``-L(x_adv)`` (budget), to maximise."""
        val = -self.loss(call, x_adv, rows, restart)
        lam = call.data.lam if self.mode == "penalised" else 0.0
        if lam:
            d = (x_adv - call.x[rows]).flatten(1)
            val = val - lam * torch.sqrt(d.pow(2).sum(1) + 1e-20)
        return val

    def _report(
        self, call: AttackCall, delta: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``L`` at delta and at 0 (restart 0's random numbers), the distances, ``||delta||_2`` and ``lam``."""
        x = call.x
        x_adv = x + delta
        rows = torch.arange(x.shape[0], device=x.device)
        extra = self._extra(call, x_adv)
        extra["input_distance"] = lp_norms(delta, "L2")
        extra["lam"] = torch.full((x.shape[0],), float(call.data.lam), dtype=x.dtype, device=x.device)
        return self.loss(call, x_adv, rows, 0), self.loss(call, x, rows, 0), extra

    # --- the lambda sweep --------------------------------------------------------------------------------------
    def sweep(
        self,
        x: torch.Tensor,
        lams: torch.Tensor | list[float] | None = None,
        num: int = 41,
        log2_range: tuple[float, float] = (-20.0, 20.0),
        *,
        point_ids: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
    ) -> LambdaSweep:
        """Penalised attacks over log-spaced penalty weights (Gondim-Ribeiro et al. 2018).

        Args:
            x: clean points ``[B, *input_shape]``.
            lams: the weights ``[L]`` (>= 0), or None for ``lam = 2^k``, ``k`` in ``linspace(*log2_range, num)``.
            num: number of log-spaced weights.
            log2_range: ``(k_min, k_max)``.
            point_ids: ``[B]`` global point ids (key the random numbers), default ``arange(B)``.
            target: overrides the configured targets for this sweep.

        Returns:
            A :class:`LambdaSweep`; the arguments are validated and the targets prepared once for every weight.
        """
        if self.mode != "penalised":
            raise ValueError("sweep needs mode='penalised'")
        lams_t = _lambda_grid(lams, num, log2_range)
        with eval_mode(self.model):
            call = self._begin(x, None, point_ids, None, {"target": target})
            results = [self._solve(replace(call, data=replace(call.data, lam=float(v))), call.eps[0]) for v in lams_t]
        return LambdaSweep(lams_t, stack_results(results))


def _lambda_grid(lams: object, num: int, log2_range: tuple[float, float]) -> torch.Tensor:
    """The sweep's weights: ``lams`` checked (1-D, non-empty, finite, >= 0) or ``2^linspace(*log2_range, num)``."""
    if lams is None:
        check_positive_int("num", num)
        return torch.logspace(log2_range[0], log2_range[1], num, base=2.0, dtype=torch.float64)
    lams_t = torch.as_tensor(lams, dtype=torch.float64)
    if lams_t.dim() != 1 or lams_t.numel() == 0 or not bool(torch.isfinite(lams_t).all()) or bool((lams_t < 0).any()):
        raise ValueError("lams must be a non-empty 1-D sequence of finite numbers >= 0")
    return lams_t


def gaussian_divergence(
    kind: str, mu: torch.Tensor, logvar: torch.Tensor, mu_t: torch.Tensor, logvar_t: torch.Tensor
) -> torch.Tensor:
    """Divergence between diagonal Gaussians ``q = N(mu, e^logvar)`` and ``q_t = N(mu_t, e^logvar_t)``, per row.

    Args:
        kind: "kl", "skl", "w2" or "mean_l2".
        mu, logvar: ``[B, d]`` of q.
        mu_t, logvar_t: ``[B, d]`` of q_t.

    Returns:
        ``[B]``: kl ``KL(q||q_t) = 1/2 sum(logvar_t - logvar + (e^logvar + (mu - mu_t)^2) / e^logvar_t - 1)``;
        skl ``KL(q||q_t) + KL(q_t||q)``; w2 ``W_2 = sqrt(||mu - mu_t||^2 + ||sigma - sigma_t||^2)``;
        mean_l2 ``||mu - mu_t||_2``.
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
