"""The stages of one work unit (one model, a block of points, every radius r), each returning the library's own
result types, all on the internal core (validated tensors, one encoding, one sampler, eval mode set once):

- **estimate**: p̂_r(x) for every r with its intervals, the three-way clean decision and r*(x), from one pass of
  samples (:class:`~vaefast.robustness.RRobustnessResult`, ``[B, K]``);
- **bound**: the encoder's geometry once (σ_min and the Jacobian norms do not depend on r), then every bound
  variant per radius from that same estimate (:class:`~vaefast.robustness.MarginBound` per r);
- **margin**: one attack path per point serving every radius, the clean point decided by that same estimate
  (:class:`~vaefast.margin.NumericalMargin`, ``[B, K]``: the estimate, its bracket and its evidence);
- **evidence**: what each breaking δ does to the model's likelihood (:class:`Evidence`);
- **certify**: sound certified radii of every (point, r) from that same estimate (:class:`Certificates`; NULL with
  the reason where the encoder cannot be read);
- **curves**: one ball attack per budget (the max-damage objective does not depend on r), then p̂ at every curve
  radius and the likelihood degradation under each δ (:class:`CurvePoint`).

Random numbers are keyed by identity: the estimate and the margin search draw on ``H(seed, "mc", model)`` with the
points' global positions (the counter-based sampler keys noise by point), the curves' attacks on
``H(seed, "curve", model)``; so a unit gives the same numbers in whichever process and order it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vaefast._checks import analysis
from vaefast._threads import intra_op_threads
from vaefast.attacks.max_damage import MaxDamageAttack
from vaefast.attacks.metrics import LikelihoodDegradation, likelihood_degradation
from vaefast.certification import CertificationRefused, EncoderCertifier
from vaefast.core.decide import clean_decision
from vaefast.core.encoding import Encoding, encode
from vaefast.core.sampling import Sampler
from vaefast.margin import NumericalMargin, margins_validated
from vaefast.rng import derive_seed
from vaefast.robustness import MarginBound, RRobustnessResult, bounds_from, estimate_validated
from vaefast.stats import clopper_pearson_one_sided
from vaefast.sweep.spec import SweepSpec, WorkUnit
from vaefast.sweep.timing import StageTimer


def mc_seed(spec: SweepSpec, model: str) -> int:
    """The Monte-Carlo stream of a model's estimates and margin searches: ``H(seed, "mc", model)``.

    Args:
        spec: the sweep specification.
        model: the model's name.

    Returns:
        The seed.
    """
    return derive_seed(spec.seed, "mc", model)


def curve_seed(spec: SweepSpec, model: str) -> int:
    """The stream of a model's curve attacks: ``H(seed, "curve", model)``.

    Args:
        spec: the sweep specification.
        model: the model's name.

    Returns:
        The seed.
    """
    return derive_seed(spec.seed, "curve", model)


@dataclass
class UnitContext:
    """What every stage of a unit shares: the points, their ids, the radii, the clean encoding and one sampler."""

    model: nn.Module
    x: torch.Tensor
    unit: WorkUnit
    spec: SweepSpec
    ids: torch.Tensor
    radii: torch.Tensor
    enc: Encoding
    sampler: Sampler

    @classmethod
    def build(cls, model: nn.Module, x: torch.Tensor, unit: WorkUnit, spec: SweepSpec) -> UnitContext:
        ids = torch.arange(unit.first_pos, unit.first_pos + unit.n_points, dtype=torch.int64)
        radii = torch.tensor(spec.radii, dtype=torch.float64)
        return cls(model, x, unit, spec, ids, radii, encode(model, x), Sampler(model, x.device))

    @property
    def seed(self) -> int:
        return mc_seed(self.spec, self.unit.model)


def estimate(ctx: UnitContext) -> RRobustnessResult:
    """The estimate stage: p̂_r(x) of every radius, its intervals, the clean decision and r*(x).

    Args:
        ctx: the unit's context.

    Returns:
        The ``[B, K]`` estimate (the one clean-point decision of the unit).
    """
    s = ctx.spec
    return estimate_validated(
        ctx.model, ctx.x, None, ctx.radii, ctx.ids, s.num_samples, ctx.seed, s.confidence, ctx.sampler, enc=ctx.enc
    )


def bound(ctx: UnitContext, est: RRobustnessResult) -> list[MarginBound]:
    """The bound stage: the encoder's geometry once, every bound variant per radius from the estimate.

    Args:
        ctx: the unit's context.
        est: the estimate stage's result.

    Returns:
        One :class:`MarginBound` per radius, in the spec's order.
    """
    return bounds_from(ctx.model, ctx.x, est, seed=ctx.seed)


def margin(ctx: UnitContext, est: RRobustnessResult) -> NumericalMargin:
    """The margin stage: one attack path per point for every radius, the clean point decided by ``est`` (with the
    search's intra-op threads, :mod:`vaefast._threads`).

    Args:
        ctx: the unit's context.
        est: the estimate stage's result.

    Returns:
        The ``[B, K]`` margins, brackets and evidence.
    """
    return search_margins(ctx, est.hits)


def search_margins(ctx: UnitContext, hits: torch.Tensor) -> NumericalMargin:
    """The margin search of a unit from its clean counts (the clean decision follows from them): the margin stage,
    and ``vaefast verify``'s recomputation of it from the stored counts.

    Args:
        ctx: the unit's context.
        hits: ``[B, K]`` int64 clean counts of ``spec.num_samples`` samples (CPU).

    Returns:
        The ``[B, K]`` margins, brackets and evidence.
    """
    s = ctx.spec
    clean = (clean_decision(hits, s.num_samples, s.confidence), hits, torch.full_like(hits, s.num_samples))
    with intra_op_threads(ctx.model, ctx.x.device):
        return margins_validated(
            ctx.model, ctx.x, ctx.enc, ctx.radii, ctx.ids, clean, s.margin, s.box, ctx.seed, ctx.sampler
        )


@dataclass
class Evidence:
    """What the margin's evidence does to the model's likelihood, and the box limit of every point of a unit.

    The reconstructions g(μ(x)) and g(μ(x + δ)) are not kept: they follow from the model, x and δ (the report
    recomputes them).

    Attributes:
        index: the ``(point, radius)`` items with evidence (a decided break), in order.
        degradation: the likelihood degradation under their δ (``None`` without evidence).
        max_radius: per point the largest ‖δ‖₂ the data box allows (``None`` without a box).
    """

    index: list[tuple[int, int]]
    degradation: LikelihoodDegradation | None
    max_radius: torch.Tensor | None


def evidence(ctx: UnitContext, nm: NumericalMargin) -> Evidence:
    """The evidence stage: the likelihood degradation under each breaking δ the search returned.

    Args:
        ctx: the unit's context.
        nm: the margin stage's result.

    Returns:
        The evidence of the items with a decided break.
    """
    has = (nm.clean == 1) & nm.bracketed
    index = [tuple(p) for p in has.nonzero().tolist()]
    degradation = None
    if index:
        b, k = has.nonzero(as_tuple=True)
        dev = ctx.x.device
        delta = nm.delta[b.to(dev), k.to(dev)].to(device=dev, dtype=ctx.x.dtype)
        degradation = likelihood_degradation(ctx.model, ctx.x[b.to(dev)], delta)
    limit = None if ctx.spec.box is None else ctx.spec.box.max_perturbation(ctx.x)
    return Evidence(index, degradation, limit)


@dataclass
class Certificates:
    """The sound certificates of a unit: ``global_`` and ``local`` radii ``[B, K]`` (None where refused) and the
    refusal ``reason`` (None when both exist)."""

    global_: torch.Tensor | None
    local: torch.Tensor | None
    reason: str | None = None


def certificates(ctx: UnitContext, est: RRobustnessResult) -> Certificates:
    """The certify stage: sound certified radii of every (point, r) from the estimate (:func:`certify_counts`).

    Args:
        ctx: the unit's context.
        est: the estimate stage's result.

    Returns:
        The certificates, or the reason the encoder cannot be certified.
    """
    return certify_counts(ctx.model, ctx.x, est.hits, est.num_samples, est.confidence)


def certify_counts(
    model: nn.Module, x: torch.Tensor, hits: torch.Tensor, num_samples: int, confidence: float
) -> Certificates:
    """Sound certified radii of every (point, r) from clean counts: the one-sided Clopper–Pearson lower limit
    ``p_low`` of ``hits`` of ``num_samples`` at ``confidence``, then the model's cached
    :class:`~vaefast.certification.EncoderCertifier` globally and locally (what the sweep stores and ``vaefast
    verify`` re-derives).

    Args:
        model: the model, in eval mode.
        x: the points ``[B, *input_shape]`` on the model's device.
        hits: ``[B, K]`` clean counts, one column per radius.
        num_samples: the samples behind each count.
        confidence: of ``p_low``.

    Returns:
        The :class:`Certificates` (a refused method is None, with its reason).
    """
    try:
        certifier = EncoderCertifier.for_model(model, x)
    except CertificationRefused as exc:  # the encoder cannot be traced or has an op without a rule
        return Certificates(None, None, str(exc))
    p_low, _ = clopper_pearson_one_sided(hits.cpu(), num_samples, 1.0 - confidence)
    found, reasons = [], []
    for method in ("global", "local"):
        try:
            found.append(certifier.radii(x, p_low, method).radius.cpu())
        except CertificationRefused as exc:  # no rule for this method (e.g. exp has no global constant)
            found.append(None)
            reasons.append(f"{method}: {exc}")
    return Certificates(found[0], found[1], "; ".join(reasons) or None)


@dataclass
class CurvePoint:
    """One attack budget of a unit's p̂-vs-attack-norm curves.

    Attributes:
        eps: the budget.
        delta: the max-damage perturbations with ‖δ‖ ≤ eps ``[n_points, *input_shape]`` (one for every radius).
        estimate: p̂ at x + δ for every curve radius (``[n_points, K_c]``).
        degradation: the likelihood degradation under δ.
    """

    eps: float
    delta: torch.Tensor
    estimate: RRobustnessResult
    degradation: LikelihoodDegradation


def curves(ctx: UnitContext) -> list[CurvePoint]:
    """The curve stage: the max-damage ball attack at every budget (once: it does not depend on r), then p̂ at every
    curve radius and the degradation under each δ.

    Args:
        ctx: the unit's context.

    Returns:
        One :class:`CurvePoint` per budget (empty without curves).
    """
    s = ctx.spec
    if not s.curve_r:
        return []
    m = s.margin
    attack = MaxDamageAttack(
        ctx.model, eps=list(s.attack_eps), mode=m.mode, steps=m.steps, restarts=m.restarts,
        num_noise_samples=m.num_noise_samples, box=s.box, optimizer=m.optimizer, seed=curve_seed(s, ctx.unit.model),
    )  # fmt: skip
    adv = attack.attack(ctx.x, point_ids=ctx.ids, reference=ctx.enc.center)
    deltas = adv.delta.detach().reshape(len(s.attack_eps), *ctx.x.shape)
    radii = torch.tensor(s.curve_r, dtype=torch.float64)
    out = []
    for eps, d in zip(s.attack_eps, deltas, strict=True):
        est = estimate_validated(
            ctx.model, ctx.x, d, radii, ctx.ids, s.num_samples, ctx.seed, s.confidence, ctx.sampler,
            enc=encode(ctx.model, ctx.x, d, center=ctx.enc.center),
        )  # fmt: skip
        out.append(CurvePoint(eps, d, est, likelihood_degradation(ctx.model, ctx.x, d)))
    return out


@dataclass
class UnitOutcome:
    """Everything the stages computed for one work unit.

    Attributes:
        unit: the work unit.
        seed: its Monte-Carlo stream (:func:`mc_seed`).
        radii: the sweep's radii (the K axis of every ``[B, K]`` field).
        estimate, bounds, margin, evidence, certificates, curves: the stages' results.
        seconds: wall-clock seconds per stage, ``{"seconds_<stage>": s}`` including ``seconds_total``.
    """

    unit: WorkUnit
    seed: int
    radii: tuple[float, ...]
    estimate: RRobustnessResult
    bounds: list[MarginBound]
    margin: NumericalMargin
    evidence: Evidence
    certificates: Certificates
    curves: list[CurvePoint] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


@analysis
def run_stages(model: nn.Module, x: torch.Tensor, unit: WorkUnit, spec: SweepSpec) -> UnitOutcome:
    """Run the stages of one work unit in order, timing each.

    The clean point is decided once: the estimate feeds the bound, the margin search and the certificates.

    Args:
        model: a protocol model (in eval mode for the whole unit; the caller's mode is restored).
        x: the unit's points ``[n_points, *input_shape]`` on the model's device (validated by the sweep's plan).
        unit: the work unit.
        spec: the sweep specification.

    Returns:
        The stages' results and timings.
    """
    timer = StageTimer()
    with timer("total"):
        with timer("estimate"):
            ctx = UnitContext.build(model, x, unit, spec)
            est = estimate(ctx)
        with timer("bound"):
            mb = bound(ctx, est)
        with timer("margin"):
            nm = margin(ctx, est)
        with timer("evidence"):
            ev = evidence(ctx, nm)
        with timer("certify"):
            cert = certificates(ctx, est)
        with timer("curve"):
            cps = curves(ctx)
    return UnitOutcome(unit, ctx.seed, spec.radii, est, mb, nm, ev, cert, cps, timer.seconds)
