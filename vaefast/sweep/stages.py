"""The stages of one work unit, each returning the library's own result types.

estimate → bound → margin → evidence → curves, all on one block of points at one radius r:

- **estimate**: p̂_r(x) with its Clopper–Pearson interval and r*(x) (:class:`RRobustnessResult`);
- **bound**: every bound variant and its components from that same estimate (:class:`MarginBound`);
- **margin**: the numerical margin by batched bisection from that same clean-point decision, with its evidence —
  the δ that broke r-robustness at the margin and the p̂ the search saw there (:class:`NumericalMargin`);
- **evidence**: what that δ does to the model's likelihood (:class:`Evidence`);
- **certify**: sound certified radii from that same estimate (its hits, through the one-sided Clopper–Pearson
  limit at the spec's confidence), with global and local constants (:class:`~vaefast.certification.Certificate`;
  None, with the refusal's reason, where the encoder has an op without a sound rule);
- **curves**: p̂_r and the likelihood degradation under the max-damage attack with ‖δ‖ ≤ eps, every budget
  (:class:`CurvePoint`), at the spec's curve radii.

Random numbers are keyed by identity: the estimate and the margin search draw on ``H(seed, "mc", model, r)``
with ``point_offset = first_pos`` (the counter-based sampler keys noise by global point index), the curves'
attacks on ``H(seed, "curve", model, r)``; so a unit gives the same numbers in whichever process and order it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vaefast._checks import analysis
from vaefast.attacks.base import max_perturbation
from vaefast.attacks.max_damage import MaxDamageAttack
from vaefast.attacks.metrics import LikelihoodDegradation, likelihood_degradation
from vaefast.certification import Certificate, CertificationRefused, EncoderCertifier, certificate_from_estimate
from vaefast.margin import NumericalMargin, numerical_margin
from vaefast.rng import derive_seed
from vaefast.robustness import MarginBound, RRobustnessResult, estimate_r_robustness, margin_bound
from vaefast.sweep.spec import SweepSpec, WorkUnit, margin_box, margin_settings, rkey
from vaefast.sweep.timing import StageTimer


def mc_seed(spec: SweepSpec, unit: WorkUnit) -> int:
    """The Monte-Carlo stream of a unit's estimate and margin search: ``H(seed, "mc", model, r)``.

    Args:
        spec: the sweep specification.
        unit: the work unit.

    Returns:
        The seed.
    """
    return derive_seed(spec.seed, "mc", unit.model, rkey(unit.r))


def curve_seed(spec: SweepSpec, unit: WorkUnit) -> int:
    """The stream of a unit's curve attacks: ``H(seed, "curve", model, r)``.

    Args:
        spec: the sweep specification.
        unit: the work unit.

    Returns:
        The seed.
    """
    return derive_seed(spec.seed, "curve", unit.model, rkey(unit.r))


def estimate(model: nn.Module, x: torch.Tensor, unit: WorkUnit, spec: SweepSpec) -> RRobustnessResult:
    """The estimate stage: p̂_r(x), its interval and r*(x) at the unit's radius.

    Args:
        model: a protocol model.
        x: the unit's points on the model's device.
        unit: the work unit.
        spec: the sweep specification.

    Returns:
        The estimate (the one clean-point decision of the unit).
    """
    return estimate_r_robustness(
        model, x, [unit.r], num_samples=spec.num_samples, seed=mc_seed(spec, unit), confidence=spec.confidence,
        point_offset=unit.first_pos,
    )  # fmt: skip


def bound(model: nn.Module, x: torch.Tensor, unit: WorkUnit, est: RRobustnessResult) -> MarginBound:
    """The bound stage: every margin-bound variant from the estimate ``est``.

    Args:
        model: a protocol model.
        x: the unit's points.
        unit: the work unit.
        est: the estimate stage's result.

    Returns:
        The bounds and their components.
    """
    return margin_bound(model, x, unit.r, point_offset=unit.first_pos, estimate=est)


def margin(
    model: nn.Module, x: torch.Tensor, unit: WorkUnit, spec: SweepSpec, est: RRobustnessResult
) -> NumericalMargin:
    """The margin stage: the numerical margin from the clean-point decision ``est``, with its evidence.

    Args:
        model: a protocol model.
        x: the unit's points.
        unit: the work unit.
        spec: the sweep specification (search settings: :func:`vaefast.sweep.spec.margin_settings`).
        est: the estimate stage's result.

    Returns:
        The margins, brackets, breaking perturbations and the p̂ the search saw at them.
    """
    return numerical_margin(
        model, x, unit.r, seed=mc_seed(spec, unit), point_offset=unit.first_pos, estimate=est, progress=False,
        **margin_settings(spec),
    )  # fmt: skip


@dataclass
class Evidence:
    """What the margin's evidence does to the model's likelihood, and the box limit of every point of a unit.

    The reconstructions g(μ(x)) and g(μ(x + δ)) are not kept: they follow from the model, x and δ (the report
    recomputes them).

    Attributes:
        index: the points of the unit with evidence (margin > 0 and bracketed), in order.
        delta: their breaking perturbations ``[len(index), *input_shape]``.
        degradation: the likelihood degradation under those δ (``None`` without evidence).
        max_radius: per point the largest ‖δ‖₂ the data box allows (``None`` without a box).
    """

    index: list[int]
    delta: torch.Tensor | None
    degradation: LikelihoodDegradation | None
    max_radius: torch.Tensor | None


def evidence(model: nn.Module, x: torch.Tensor, nm: NumericalMargin, spec: SweepSpec) -> Evidence:
    """The evidence stage: the likelihood degradation under each breaking δ the search returned.

    Args:
        model: a protocol model.
        x: the unit's points.
        nm: the margin stage's result.
        spec: the sweep specification (its box).

    Returns:
        The evidence of the points whose margin is > 0 and bracketed.
    """
    index = [b for b, has in enumerate(((nm.margin > 0) & nm.bracketed).tolist()) if has]
    delta = degradation = None
    if index:
        sel = torch.tensor(index, device=x.device)
        delta = nm.delta[sel].to(device=x.device, dtype=x.dtype)
        degradation = likelihood_degradation(model, x[sel], delta)
    return Evidence(index, delta, degradation, max_perturbation(x, margin_box(spec)))


@dataclass
class Certificates:
    """The sound certificates of a unit's points: ``global_`` and ``local`` (each None where refused), and ``reason``:
    the refusals' messages (``"<method>: <why>"``, joined by ``"; "``), or None when both exist."""

    global_: Certificate | None
    local: Certificate | None
    reason: str | None = None


def certificates(model: nn.Module, x: torch.Tensor, unit: WorkUnit, est: RRobustnessResult) -> Certificates:
    """The certify stage: :func:`vaefast.certification.certificate_from_estimate` from the estimate ``est`` (its hits,
    at its confidence), globally and locally, with the model's cached
    :class:`~vaefast.certification.EncoderCertifier`; a refused method gives None and its reason.

    Args:
        model: a protocol model.
        x: the unit's points.
        unit: the work unit.
        est: the estimate stage's result.

    Returns:
        The certificates.
    """
    try:
        certifier = EncoderCertifier.for_model(model, x)
    except CertificationRefused as exc:  # the encoder cannot be traced or has an op without a rule
        return Certificates(None, None, str(exc))
    found: dict[str, Certificate | None] = {}
    reasons = []
    for method in ("global", "local"):
        try:
            found[method] = certificate_from_estimate(certifier, x, est, method, est.confidence)
        except CertificationRefused as exc:  # no rule for this method (e.g. exp has no global constant)
            found[method] = None
            reasons.append(f"{method}: {exc}")
    return Certificates(found["global"], found["local"], "; ".join(reasons) or None)


@dataclass
class CurvePoint:
    """One attack budget of a unit's p̂-vs-attack-norm curve.

    Attributes:
        eps: the budget.
        delta: the max-damage perturbations with ‖δ‖ ≤ eps ``[n_points, *input_shape]``.
        estimate: p̂_r at x + δ.
        degradation: the likelihood degradation under δ.
    """

    eps: float
    delta: torch.Tensor
    estimate: RRobustnessResult
    degradation: LikelihoodDegradation


def curves(model: nn.Module, x: torch.Tensor, unit: WorkUnit, spec: SweepSpec) -> list[CurvePoint]:
    """The curve stage: the max-damage attack at every budget, then p̂_r and the degradation under each δ.

    Args:
        model: a protocol model.
        x: the unit's points.
        unit: the work unit.
        spec: the sweep specification (budgets ``attack_eps``, ``attack_kwargs``).

    Returns:
        One :class:`CurvePoint` per budget (empty when the spec has no curves at this radius).
    """
    if not spec.curves_at(unit.r):
        return []
    attack = MaxDamageAttack(model, eps=list(spec.attack_eps), seed=curve_seed(spec, unit), **spec.attack_kwargs)
    adv = attack.attack(x, point_ids=torch.arange(unit.first_pos, unit.first_pos + unit.n_points))
    deltas = adv.delta.detach().reshape(len(spec.attack_eps), *x.shape)
    out = []
    for eps, d in zip(spec.attack_eps, deltas, strict=True):
        est = estimate_r_robustness(
            model, x, [unit.r], num_samples=spec.num_samples, delta=d, seed=mc_seed(spec, unit),
            confidence=spec.confidence, point_offset=unit.first_pos,
        )  # fmt: skip
        out.append(CurvePoint(eps, d, est, likelihood_degradation(model, x, d)))
    return out


@dataclass
class UnitOutcome:
    """Everything the stages computed for one work unit.

    Attributes:
        unit: the work unit.
        seed: its Monte-Carlo stream (:func:`mc_seed`).
        estimate, bound, margin, evidence, certificates, curves: the stages' results.
        seconds: wall-clock seconds per stage, ``{"seconds_<stage>": s}`` including ``seconds_total``.
    """

    unit: WorkUnit
    seed: int
    estimate: RRobustnessResult
    bound: MarginBound
    margin: NumericalMargin
    evidence: Evidence
    certificates: Certificates
    curves: list[CurvePoint] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


@analysis
def run_stages(model: nn.Module, x: torch.Tensor, unit: WorkUnit, spec: SweepSpec) -> UnitOutcome:
    """Run the stages of one work unit in order, timing each.

    The clean point is decided once: the estimate feeds both the bound and the margin search, so a point is
    certified by the bound exactly when the search treats it as r-robust.

    Args:
        model: a protocol model (in eval mode for the whole unit; the caller's mode is restored).
        x: the unit's points ``[n_points, *input_shape]`` on the model's device.
        unit: the work unit.
        spec: the sweep specification.

    Returns:
        The stages' results and timings.
    """
    timer = StageTimer()
    with timer("total"):
        with timer("estimate"):
            est = estimate(model, x, unit, spec)
        with timer("bound"):
            mb = bound(model, x, unit, est)
        with timer("margin"):
            nm = margin(model, x, unit, spec, est)
        with timer("evidence"):
            ev = evidence(model, x, nm, spec)
        with timer("certify"):
            cert = certificates(model, x, unit, est)
        with timer("curve"):
            cps = curves(model, x, unit, spec)
    return UnitOutcome(unit, mc_seed(spec, unit), est, mb, nm, ev, cert, cps, timer.seconds)
