"""The attack base class and what every attack shares: the result type, the per-call context, the data box and
the checks of a call's arguments.

An attack is configured once and called on batches (foolbox's ``Attack``, torchattacks' one file per attack).
:class:`Attack` owns the call: it validates the arguments once, runs the model in eval mode, loops over the
radii of a curve and hands each radius to the shared optimisation engine (:func:`vaefast.attacks.engine.optimise`);
a subclass supplies only its objective (and, where it differs, its per-call data and extra result fields).
Per-call data lives in an :class:`AttackCall` passed to the hooks, never on the attack object, so one attack
object can serve any number of calls, also concurrently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, final

import torch

from vaefast._checks import (
    check_box,
    check_inputs,
    check_model,
    check_positive_float,
    check_tensor,
    eval_mode,
)
from vaefast.attacks.engine import LoopConfig, lp_norms, optimise
from vaefast.attacks.projections import max_l2_norm, max_norm

EpsSpec = float | torch.Tensor | Sequence[float]
"""A radius for every point (float), one per point (1-D tensor ``[B]``), or a curve (a list of floats)."""


@dataclass
class AttackResult:
    """Per-point outcome of an attack; for a list of eps (a curve) every field gains a leading eps axis.

    Attributes:
        x_adv: ``x + delta``.
        delta: the perturbation, ``[B, *input_shape]``, inside its norm budget and the data box.
        norms: ``||delta||`` in the attack's norm, ``[B]``.
        objective: the attack's objective at delta (expected reconstruction distance for max-damage, the loss
            without penalty for targeted attacks), ``[B]``.
        eps: the radius each point was attacked at (inf for penalised attacks), ``[B]``.
        initial_objective: the same objective at ``delta = 0``, ``[B]``.
        norm: "L2" or "Linf".
        extra: attack-specific per-point tensors (e.g. distances to the target).
    """

    x_adv: torch.Tensor
    delta: torch.Tensor
    norms: torch.Tensor
    objective: torch.Tensor
    eps: torch.Tensor
    initial_objective: torch.Tensor
    norm: str = "L2"
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The fields as one flat dict.

        Returns:
            ``x_adv``, ``delta``, ``norms``, ``objective``, ``eps``, ``initial_objective``, ``norm`` and every
            entry of ``extra``.
        """
        out: dict[str, Any] = {
            "x_adv": self.x_adv,
            "delta": self.delta,
            "norms": self.norms,
            "objective": self.objective,
            "eps": self.eps,
            "initial_objective": self.initial_objective,
            "norm": self.norm,
        }
        out.update(self.extra)
        return out

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict of Python scalars per point (and per eps for curves).

        Returns:
            Rows with ``point`` (and ``eps_index`` for curves), ``eps``, ``norm_value``, ``objective``,
            ``initial_objective``, ``norm`` and every per-point entry of ``extra``.
        """
        scalars = {
            "eps": self.eps,
            "norm_value": self.norms,
            "objective": self.objective,
            "initial_objective": self.initial_objective,
        }
        scalars.update({k: v for k, v in self.extra.items() if v.dim() == self.norms.dim()})
        flat = {k: v.detach().reshape(-1).cpu() for k, v in scalars.items()}
        rows = []
        curve = self.norms.dim() == 2
        n_points = self.norms.shape[-1]
        for i in range(self.norms.numel()):
            row: dict[str, Any] = {"point": i % n_points}
            if curve:
                row["eps_index"] = i // n_points
            row.update({k: v[i].item() for k, v in flat.items()})
            row["norm"] = self.norm
            rows.append(row)
        return rows


def stack_results(results: Sequence[AttackResult]) -> AttackResult:
    """Stack results along a new leading axis (a curve over eps or lambda).

    Args:
        results: results of the same points, one per eps (or lambda).

    Returns:
        An :class:`AttackResult` whose fields are ``torch.stack`` of the inputs' (extras present in all of them).
    """
    first = results[0]
    extra_keys = [k for k in first.extra if all(k in r.extra for r in results)]
    return AttackResult(
        x_adv=torch.stack([r.x_adv for r in results]),
        delta=torch.stack([r.delta for r in results]),
        norms=torch.stack([r.norms for r in results]),
        objective=torch.stack([r.objective for r in results]),
        eps=torch.stack([r.eps for r in results]),
        initial_objective=torch.stack([r.initial_objective for r in results]),
        norm=first.norm,
        extra={k: torch.stack([r.extra[k] for r in results]) for k in extra_keys},
    )


# --- the data box ------------------------------------------------------------------------------------------------
def box_offsets(
    x: torch.Tensor, box: tuple[float, float] | None, name: str = "x"
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-coordinate bounds on delta that keep ``x + delta`` in the box.

    Args:
        x: points ``[B, *shape]``.
        box: ``(a, b)`` or None.
        name: the argument's name in the error message.

    Returns:
        ``(lo, hi)`` float64 ``[B, D]`` with ``lo = min(a - x, 0)``, ``hi = max(b - x, 0)`` (flattened), or
        ``(None, None)`` without a box.

    Raises:
        ValueError: ``x`` has entries outside the box (beyond a relative tolerance of 1e-6).
    """
    if box is None:
        return None, None
    flat = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    tol = 1e-6 * max(1.0, box[1] - box[0])
    if bool((flat < box[0] - tol).any()) or bool((flat > box[1] + tol).any()):
        lo_v, hi_v = flat.min().item(), flat.max().item()
        raise ValueError(f"{name} has entries outside box={box} (min {lo_v:.4g}, max {hi_v:.4g})")
    return (box[0] - flat).clamp(max=0.0), (box[1] - flat).clamp(min=0.0)


def max_perturbation(x: torch.Tensor, box: tuple[float, float] | None) -> torch.Tensor | None:
    """Per point the largest ``||delta||_2`` with ``x + delta`` inside the box.

    Args:
        x: points ``[B, *shape]`` inside the box.
        box: ``(a, b)`` or None.

    Returns:
        ``[B]`` float64 on the CPU, ``||max(|a - x|, |b - x|)||_2`` (the distance to the farthest corner), or None
        without a box. A margin or bound above it is larger than the input space allows.
    """
    lo, hi = box_offsets(x, check_box(box))
    return None if lo is None else max_l2_norm(lo, hi).cpu()


# --- the arguments of a call -------------------------------------------------------------------------------------
def check_eps(eps: object) -> None:
    """Validate a configured eps before any batch is seen (the per-point length is checked at call time).

    Args:
        eps: a number, a list of numbers, or a 1-D tensor.

    Raises:
        ValueError / TypeError: a value that is not finite and > 0, an empty list, a tensor of the wrong rank.
    """
    if isinstance(eps, torch.Tensor):
        t = check_tensor("eps", eps, ndim=(0, 1))
        if bool((t <= 0).any()):
            raise ValueError("eps must be > 0 everywhere")
        return
    if isinstance(eps, (list, tuple)):
        if len(eps) == 0:
            raise ValueError("eps is an empty list")
        for e in eps:
            check_positive_float("eps", e)
        return
    check_positive_float("eps", eps)


def parse_eps(eps: object, batch: int, device: torch.device) -> tuple[list[torch.Tensor], bool]:
    """Per-point radii from an eps specification.

    Args:
        eps: a float (every point), a 1-D tensor ``[B]`` (per point) or a list of floats (a curve).
        batch: B.
        device: of the radii.

    Returns:
        ``(radii, curve)``: a list of float64 ``[B]`` tensors (one per curve entry) and whether eps was a list.
    """
    if isinstance(eps, torch.Tensor) and eps.dim() == 0:
        eps = float(eps)
    check_eps(eps)
    if isinstance(eps, torch.Tensor):
        if eps.shape[0] != batch:
            raise ValueError(f"eps as a tensor must have one entry per point ({batch}), got {tuple(eps.shape)}")
        return [eps.to(torch.float64).to(device)], False
    if isinstance(eps, (list, tuple)):
        return [torch.full((batch,), float(e), dtype=torch.float64, device=device) for e in eps], True
    return [torch.full((batch,), float(eps), dtype=torch.float64, device=device)], False


def check_eps_feasible(eps: torch.Tensor, norm: str, lo: torch.Tensor | None, hi: torch.Tensor | None) -> None:
    """A sphere ``||delta|| = eps`` must meet the box: ``eps_b <= max_{lo <= d <= hi} ||d||`` for every point.

    Args:
        eps: ``[B]`` radii.
        norm: "L2" or "Linf".
        lo, hi: ``[B, D]`` box offsets of delta, or None (no box: always feasible).

    Raises:
        ValueError: naming the first point whose sphere misses the box.
    """
    if lo is None:
        return
    cap = max_norm(norm, lo, hi)
    bad = eps > cap * (1 + 1e-9)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"eps={eps[i].item():.4g} exceeds the largest {norm} perturbation that keeps point {i} inside the box "
            f"({cap[i].item():.4g}); the sphere does not meet the box"
        )


def check_point_ids(point_ids: object, batch: int) -> torch.Tensor:
    """Global point ids of a batch (they key the attack's random numbers).

    Args:
        point_ids: None (``arange(B)``) or an integer tensor ``[B]`` of ids >= 0.
        batch: B.

    Returns:
        ``[B]`` int64 on the CPU.
    """
    if point_ids is None:
        return torch.arange(batch)
    if not isinstance(point_ids, torch.Tensor) or point_ids.shape != (batch,):
        raise ValueError(f"point_ids must be a tensor of shape [{batch}]")
    if point_ids.is_floating_point() or point_ids.is_complex() or point_ids.dtype == torch.bool:
        raise TypeError(f"point_ids must be an integer tensor, got {point_ids.dtype}")
    if bool((point_ids < 0).any()):
        raise ValueError("point_ids must be >= 0")
    return point_ids.to(torch.int64).cpu()


def check_like(name: str, value: object, x: torch.Tensor) -> torch.Tensor:
    """A finite float tensor of x's shape (a perturbation, a warm start).

    Args:
        name: the argument's name in error messages.
        value: the tensor to check.
        x: the batch it belongs to.

    Returns:
        ``value``.
    """
    value = check_tensor(name, value)
    if value.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(value.shape)}")
    return value


def broadcast_target(target: torch.Tensor, x: torch.Tensor, name: str = "target") -> torch.Tensor:
    """Targets for every point of ``x``.

    Args:
        target: ``[1, *shape]`` (one target for all points) or ``[B, *shape]`` (one per point).
        x: the batch ``[B, *shape]``.
        name: the argument's name in error messages.

    Returns:
        ``[B, *shape]`` in x's dtype.
    """
    if target.shape[0] == 1:
        return target.expand(x.shape[0], *target.shape[1:]).to(x.dtype)
    if target.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must have batch size 1 or {x.shape[0]} (that of x), got {target.shape[0]}")
    return target.to(x.dtype)


# --- the base class ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttackCall:
    """One call of an attack: its validated arguments and the attack's per-call data.

    Attributes:
        x: clean points ``[B, *input_shape]``.
        point_ids: ``[B]`` global point ids (int64, CPU); they key every random number of the call.
        eps: the radii, one ``[B]`` float64 tensor per curve entry (inf without a norm budget).
        curve: whether the result gains a leading eps axis.
        lo, hi: ``[B, D]`` box offsets of delta, or None.
        init: ``[B, D]`` warm start of the first restart, or None.
        data: what the attack prepared for this call (:meth:`Attack._prepare`): targets, fixed noise, ...
    """

    x: torch.Tensor
    point_ids: torch.Tensor
    eps: list[torch.Tensor]
    curve: bool
    lo: torch.Tensor | None
    hi: torch.Tensor | None
    init: torch.Tensor | None
    data: Any = None


class Attack:
    """Base class of every attack: ``delta* = argmax_{delta feasible} f(x + delta)`` per point.

    The feasible set is ``{||delta|| <= eps}`` (``= eps`` for a sphere constraint, no norm bound for penalised
    attacks) intersected with the data box ``x + delta in [a, b]``. :meth:`attack` (also ``__call__``) is final;
    subclasses implement the hooks :meth:`_objective` (``f``, to maximise) and :meth:`_report` (the reported
    objective and extra fields), and where needed :meth:`_prepare` (per-call data and keyword options) and
    :meth:`_parse_eps`.

    Args:
        model: a protocol model (:class:`vaefast._checks.VAEModel`).
        eps: the configured radius (see :data:`EpsSpec`), or None where the attack has no norm budget.
        box: the data box ``(a, b)``, or None for unbounded inputs.
        cfg: the optimisation engine's settings.
        requires: model methods the attack needs beyond ``encode``/``decode``.
    """

    name: ClassVar[str] = "attack"

    def __init__(
        self,
        model: torch.nn.Module,
        eps: EpsSpec | None,
        box: tuple[float, float] | None,
        cfg: LoopConfig,
        requires: Sequence[str] = (),
    ) -> None:
        self.model = check_model(model, requires)
        self.box = check_box(box)
        self.eps = eps
        self.cfg = cfg

    @property
    def norm(self) -> str:
        """The norm of the budget, "L2" or "Linf"."""
        return self.cfg.norm

    @final
    def __call__(
        self,
        x: torch.Tensor,
        eps: EpsSpec | None = None,
        point_ids: torch.Tensor | None = None,
        init: torch.Tensor | None = None,
        **options: Any,
    ) -> AttackResult:
        """Same as :meth:`attack`."""
        return self.attack(x, eps, point_ids, init, **options)

    @final
    def attack(
        self,
        x: torch.Tensor,
        eps: EpsSpec | None = None,
        point_ids: torch.Tensor | None = None,
        init: torch.Tensor | None = None,
        **options: Any,
    ) -> AttackResult:
        """Attack every point of ``x``: ``delta_b = argmax f_b(x_b + delta)`` over the feasible set, per radius.

        The model runs in eval mode (every submodule's training flag restored afterwards); a model without a
        known input shape learns it from ``x``.

        Args:
            x: clean points ``[B, *input_shape]`` inside the box.
            eps: overrides the configured radius: a float, a per-point tensor ``[B]``, or a list (a curve).
            point_ids: ``[B]`` global point ids (default ``arange(B)``); they key the random numbers, so a point
                gets the same attack in any batch.
            init: ``[B, *input_shape]`` warm start of the first restart (projected onto the feasible set), e.g. the
                perturbation found at a nearby radius rescaled to the new one.
            **options: per-call options of the attack (targeted attacks: ``lam``, ``target``).

        Returns:
            An :class:`AttackResult` (fields with a leading eps axis for a curve).
        """
        with eval_mode(self.model):
            call = self._begin(x, eps, point_ids, init, options)
            results = [self._solve(call, e) for e in call.eps]
        return stack_results(results) if call.curve else results[0]

    @final
    def run_validated(
        self,
        x: torch.Tensor,
        eps: torch.Tensor,
        point_ids: torch.Tensor,
        init: torch.Tensor | None = None,
        offsets: tuple[torch.Tensor, torch.Tensor] | None = None,
        **options: Any,
    ) -> AttackResult:
        """The attack on arguments the caller has validated (the internal core's path: no scans of the inputs, no
        feasibility check; the model must already be in eval mode).

        Args:
            x: clean points ``[B, *input_shape]`` inside the box.
            eps: ``[B]`` float64 radii on x's device (feasible for a sphere constraint).
            point_ids: ``[B]`` int64 global point ids on the CPU.
            init: ``[B, *input_shape]`` warm start of the first restart, or None.
            offsets: the box offsets ``(lo, hi)`` ``[B, D]`` of x (:meth:`vaefast.core.box.Box.offsets`), or None
                without a box.
            **options: per-call options of the attack (e.g. max-damage's ``reference``).

        Returns:
            An :class:`AttackResult`.
        """
        lo, hi = (None, None) if offsets is None else offsets
        flat_init = None if init is None else init.reshape(x.shape[0], -1)
        call = AttackCall(x, point_ids, [eps], False, lo, hi, flat_init)
        return self._solve(replace(call, data=self._prepare(call, **options)), eps, check=False)

    def _begin(self, x: object, eps: object, point_ids: object, init: object, options: dict[str, Any]) -> AttackCall:
        """Validate a call's arguments once and prepare the attack's per-call data."""
        x = check_inputs(self.model, x)
        b = x.shape[0]
        eps_list, curve = self._parse_eps(eps, b, x.device)
        lo, hi = box_offsets(x, self.box)
        flat_init = None if init is None else check_like("init", init, x).reshape(b, -1)
        call = AttackCall(x, check_point_ids(point_ids, b), eps_list, curve, lo, hi, flat_init)
        return replace(call, data=self._prepare(call, **options))

    def _solve(self, call: AttackCall, eps: torch.Tensor, check: bool = True) -> AttackResult:
        """Run the engine at radii ``eps[B]`` and assemble the result (``check``: that a sphere meets the box)."""
        if check and self.cfg.constraint == "sphere":
            check_eps_feasible(eps, self.norm, call.lo, call.hi)

        def objective(x_adv: torch.Tensor, restart: int, rows: torch.Tensor) -> torch.Tensor:
            return self._objective(call, x_adv, restart, rows)

        x = call.x
        delta, value = optimise(objective, x, eps, call.lo, call.hi, self.cfg, call.point_ids, self.name, call.init)
        delta = delta.view_as(x).detach()
        with torch.no_grad():
            reported, initial, extra = self._report(call, delta, value)
        return AttackResult(
            x_adv=(x + delta).detach(),
            delta=delta,
            norms=lp_norms(delta, self.norm).detach(),
            objective=reported.detach(),
            eps=eps.to(x.dtype),
            initial_objective=initial.detach(),
            norm=self.norm,
            extra=extra,
        )

    # --- hooks ---------------------------------------------------------------------------------------------------
    def _parse_eps(self, eps: object, batch: int, device: torch.device) -> tuple[list[torch.Tensor], bool]:
        """The radii of a call: ``eps`` or the configured one (see :func:`parse_eps`)."""
        return parse_eps(self.eps if eps is None else eps, batch, device)

    def _prepare(self, call: AttackCall, **options: Any) -> Any:
        """Per-call data for the objective (stored as ``call.data``); rejects options the attack does not take."""
        if options:
            raise TypeError(f"{type(self).__name__}.attack() got unexpected keyword argument(s) {sorted(options)}")
        return None

    def _objective(self, call: AttackCall, x_adv: torch.Tensor, restart: int, rows: torch.Tensor) -> torch.Tensor:
        """``f(x_adv) -> [b]`` to maximise, for the points ``rows`` of the call's batch (restart: which restart's
        fixed random numbers to use)."""
        raise NotImplementedError

    def _report(
        self, call: AttackCall, delta: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(objective at delta [B], objective at 0 [B], extra fields)`` given the engine's best ``value``."""
        raise NotImplementedError
