"""Numerical robustness margin: the smallest ``||delta||_2`` at which a maximum-damage attack breaks r-robustness,
``R_num(x) = min{R : p_hat_r(x, delta*_R) <= 1/2}``, ``delta*_R`` the sphere attack ``||delta|| = R``, returned
with its evidence (the breaking ``delta`` and the ``p_hat`` seen there) so that anyone can replay it.

Decision at a radius R: attack with :class:`~vaefast.attacks.MaxDamageAttack` (``constraint="sphere"``,
``eps=R``), then decide r-robustness of the attacked input with the sequential test
:func:`vaefast.robustness.is_r_robust` (``decision="sequential"``: broken only when the test decides
``p <= 1/2``) or with a fixed number of samples (``decision="fixed"``: broken when ``p_hat <= 1/2``).

The clean point (radius 0) is decided once: by ``estimate`` when given (the same
:class:`~vaefast.robustness.RRobustnessResult` that :func:`~vaefast.robustness.margin_bound` certifies from, so
the two never disagree: certified exactly when ``hits > S/2``), else by the search's own test. Borderline points
(``p_hat`` near 1/2) are therefore certified or not by that one estimate, and a certified point always gets a
positive margin.

- ``method="bisection"`` (fast, batched over all points): each point's bracket ``[lower, upper]`` (robust at
  lower, broken at upper) is grown from ``start_radius`` (capped at ``max_radius``) until the attack breaks
  r-robustness, then shrunk until ``upper - lower <= tol``; every round is one batched attack with per-point radii,
  warm-started from the point's previous / breaking perturbation (``warm_start``), and one batched decision. The
  margin is ``upper``; a point still robust at ``max_radius`` gets ``margin = max_radius``, ``bracketed=False``
  and no evidence. Two strategies choose the radii:

  - ``strategy="secant"`` (default): the probit ``z = Phi^-1(p_hat)`` of each point's decisions is close to
    linear in the radius (exactly so for the worst-case decoder of the first-order bound) and, as every decision of a
    point uses the same Monte-Carlo samples, a smooth curve; the next radius is where the secant through the last two
    evaluations (regula falsi on the bracket ends, Illinois-scaled, when it is ill-conditioned) reaches ``z*``, the
    probit at which the decision flips (half a count above the largest ``p_hat`` the test can call broken).
    The first round is the cold attack (``steps`` steps from random starts, as in halving: a chain of short warm
    starts from a short first attack can stay in a poor direction); growth overshoots the secant root (at most
    doubling, so warm starts stay near their radius); refinement tests at least ``tol`` inside the bracket, closes a
    bracket ``<= 2 tol`` wide in one round, and halves once the rounds left demand it. Warm starts rescaled by at most
    ``NEAR_RATIO`` whose chain of warm starts has had the cold attack's ``steps`` run a few steps only; tests that
    cannot be decided broken stop early (futility, ``FUTILITY``). Fewer decisions and attack steps per point than
    halving at the same attack strength (measured: benchmarks/README.md, numerical margin).
  - ``strategy="halving"``: doubling from ``start_radius``, then halving (the search before issue 12).

  Both stay within the same budget of ``D = max_decisions(...)`` decisions per point, the Bonferroni divisor.
- ``method="grid"`` (the original protocol): radii ``max_radius, max_radius - granularity, ...`` from large to
  small; the margin is the first (largest) radius at which the attacked input is still r-robust (``bracketed``
  is False when that is ``max_radius`` itself; 0 when no grid radius is robust); the evidence is the attack at
  the grid radius above it (``upper``).

Points whose clean point is not r-robust get margin 0. ``max_radius`` defaults to the largest L2 perturbation the
data box allows at each point (its farthest corner), or ``start_radius * 2**20`` without a box.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import torch
from tqdm.auto import tqdm

from vaefast._checks import (
    analysis,
    check_analysis_inputs,
    check_box,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_probability,
    check_seed,
)
from vaefast._results import ResultMixin
from vaefast.attacks.base import max_perturbation
from vaefast.attacks.max_damage import MODES, MaxDamageAttack
from vaefast.rng import id_runs
from vaefast.robustness import RRobustnessResult
from vaefast.stats import clopper_pearson, largest_decidable_not_robust, sequential_schedule

METHODS = ("bisection", "grid")
STRATEGIES = ("secant", "halving")
DECISIONS = ("sequential", "fixed")
# The secant strategy's settings (measured on an MNIST-sized MLP VAE, benchmarks/README.md, numerical margin):
FUTILITY = 1e-3  # level of its futility stop (vaefast.stats.futile): stop testing a radius that cannot break
OVERSHOOT = 1.5  # growth rounds test at lower + OVERSHOOT * (secant root - lower) + tol ...
MAX_GROWTH = 2.0  # ... and at most MAX_GROWTH * lower: warm starts stay within 2x of their own radius, as in halving
MAX_SHRINK = 2.0  # refinement rounds test at least upper / MAX_SHRINK
MIN_DZ = 0.05  # the secant needs probits this far apart (about 20 counts of 1000 near p = 1/2), else regula falsi
NEAR_RATIO = 1.25  # a warm start rescaled by at most this is nearly optimal already: the near attack
NEAR_FRACTION = 0.25  # the near attack's steps, as a fraction of warm_steps (at least 3)
GROW_FRACTION = 0.75  # growth rounds (warm starts scaled up by more than NEAR_RATIO): this fraction of warm_steps

__all__ = ["NumericalMargin", "numerical_margin"]


@dataclasses.dataclass
class NumericalMargin(ResultMixin):
    """Numerical margins with their evidence, per point ``b`` of a batch of ``B``.

    Attributes:
        margin: ``[B]`` the numerical margin (bisection: the upper end of the final bracket; grid: the first grid
            radius, from the top, at which the attacked input is still r-robust, as in the original protocol).
            0 where the clean point is not r-robust.
        lower: ``[B]`` the largest radius at which the attack failed to break r-robustness (0 if none).
        upper: ``[B]`` the radius of the evidence: ``||delta_b||_2 = upper_b`` (bisection: ``= margin``; grid:
            the smallest grid radius that broke r-robustness). 0 where there is no evidence.
        bracketed: ``[B]`` False where the point was still r-robust at ``max_radius`` (the margin is then only the
            search limit, a lower estimate, and there is no evidence).
        delta: ``[B, *input_shape]`` the perturbation that broke r-robustness at ``upper`` (inside the box);
            zeros where the margin is 0 (the clean point is its own evidence) or the search did not bracket.
        p_hat_delta: ``[B]`` the estimate of ``p_r(x, delta)`` the search saw there, ``hits_delta /
            samples_delta`` (``<= 1/2`` by construction); for margin 0 the clean ``p_r(x, 0)``; NaN where unbracketed.
        hits_delta, samples_delta: ``[B]`` the counts behind ``p_hat_delta`` (0, 0 where unbracketed).
        ci_low_delta, ci_high_delta: ``[B]`` two-sided Clopper–Pearson interval of ``p_hat_delta`` at
            ``confidence`` (NaN where unbracketed).
        evaluations: per point the ``(radius, p_hat)`` pairs evaluated (radius 0: the clean input).
        max_radius: ``[B]`` the search limit (default: the largest L2 perturbation the box allows).
        r, method, confidence: the settings; ``point_index``: the global point ids keying the random numbers.
    """

    margin: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    bracketed: torch.Tensor
    delta: torch.Tensor
    p_hat_delta: torch.Tensor
    hits_delta: torch.Tensor
    samples_delta: torch.Tensor
    ci_low_delta: torch.Tensor
    ci_high_delta: torch.Tensor
    evaluations: list[list[tuple[float, float]]]
    max_radius: torch.Tensor
    r: float
    method: str
    confidence: float
    point_index: torch.Tensor

    _PER_POINT = (
        "margin", "lower", "upper", "bracketed", "p_hat_delta", "hits_delta", "samples_delta", "ci_low_delta",
        "ci_high_delta", "max_radius",
    )  # fmt: skip

    def to_rows(self) -> list[dict[str, Any]]:
        """Plain-Python rows.

        Returns:
            One dict per point: ``point, r, method``, the per-point fields above (``delta`` left out) and the number
            of evaluations.
        """
        rows = []
        for b in range(len(self)):
            row: dict[str, Any] = {"point": int(self.point_index[b]), "r": self.r, "method": self.method}
            row.update({name: getattr(self, name)[b].item() for name in self._PER_POINT})
            row["evaluations"] = len(self.evaluations[b])
            rows.append(row)
        return rows

    @staticmethod
    def concat(parts: list[NumericalMargin]) -> NumericalMargin:
        """The results of consecutive point blocks as one result.

        Args:
            parts: results with the same r, method and confidence, in point order.

        Returns:
            Their per-point fields concatenated (tensors along the point axis, evaluations as one list).
        """
        first = parts[0]
        fields = {
            f.name: torch.cat([getattr(p, f.name) for p in parts])
            for f in dataclasses.fields(first)
            if isinstance(getattr(first, f.name), torch.Tensor)
        }
        fields.update(
            evaluations=[e for p in parts for e in p.evaluations],
            r=first.r,
            method=first.method,
            confidence=first.confidence,
        )
        return NumericalMargin(**fields)


@dataclasses.dataclass
class _Outcome:
    """Decisions at one set of attacked inputs: ``robust[n]``, ``hits[n]`` of ``samples[n]`` (int64, CPU)."""

    robust: torch.Tensor
    hits: torch.Tensor
    samples: torch.Tensor

    @property
    def p_hat(self) -> torch.Tensor:
        return self.hits.to(torch.float64) / self.samples.to(torch.float64)


class _Decider:
    """Attack at per-point radii, then decide r-robustness of the attacked inputs."""

    def __init__(self, model, x, r, attacks, decision, num_samples, confidence, seed, offset, futility=None):
        self.model, self.x, self.r, self.attacks = model, x, r, attacks
        self.decision, self.num_samples, self.confidence = decision, num_samples, confidence
        self.seed, self.offset, self.futility = seed, offset, futility

    def decide(self, idx: torch.Tensor, delta: torch.Tensor | None) -> _Outcome:
        """r-robustness of ``x[idx] + delta`` (``delta=None``: the clean points), on the Monte-Carlo stream keyed
        by ``(seed, offset + idx)``. Sequential: not robust only when the test *decides* ``p <= 1/2`` at the
        decider's confidence (an undecided test at ``max_samples`` counts as robust, so every breaking perturbation
        is backed by a decision); fixed: ``p_hat <= 1/2`` with ``num_samples`` samples."""
        from vaefast.robustness import estimate_r_robustness, is_r_robust

        n = idx.shape[0]
        out = _Outcome(
            torch.empty(n, dtype=torch.bool), torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
        )
        for pos, length, first in id_runs(idx):  # runs of consecutive point ids share one call (RNG keyed by id)
            sl = slice(pos, pos + length)
            xs = self.x[first : first + length]
            d = None if delta is None else delta[sl]
            common = dict(delta=d, seed=self.seed, confidence=self.confidence, point_offset=self.offset + first)
            if self.decision == "sequential":
                res = is_r_robust(
                    self.model, xs, self.r, max_samples=self.num_samples, futility=self.futility, **common
                )
                broken = res.decided & ~res.robust  # an undecided test is no evidence of a break
                out.robust[sl], out.hits[sl], out.samples[sl] = ~broken.cpu(), res.hits.cpu(), res.samples_used.cpu()
            else:
                res = estimate_r_robustness(self.model, xs, self.r, num_samples=self.num_samples, **common)
                out.robust[sl], out.hits[sl] = res.robust[:, 0].cpu(), res.hits[:, 0].cpu()
                out.samples[sl] = res.num_samples
        return out

    def at(
        self, idx: torch.Tensor, radii: torch.Tensor, init: torch.Tensor | None = None, attack=None
    ) -> tuple[_Outcome, torch.Tensor]:
        """Attack points ``idx`` at ``radii`` (warm-started from ``init`` rescaled to the radii, if given) and
        decide; returns the outcome and the attack's perturbations. The attack: ``attack`` if given, else the cold
        one (random starts) or, with ``init``, the warm one."""
        attack = attack or (self.attacks.cold if init is None else self.attacks.warm)
        delta = self._attack(attack, idx, radii, init)
        return self.decide(idx, delta), delta

    def at_tiers(
        self, idx: torch.Tensor, radii: torch.Tensor, init: torch.Tensor, init_radii: torch.Tensor, chain: torch.Tensor
    ) -> tuple[_Outcome, torch.Tensor, torch.Tensor]:
        """:meth:`at` with every warm start ``init`` (found at ``init_radii`` after ``chain`` optimisation steps along
        its chain of warm starts) attacked by the attack of its tier (:meth:`_Attacks.tiers`), one call per tier.

        Returns:
            The outcome, the perturbations and their chains' steps (``chain`` plus the steps of this round).
        """
        delta, steps = torch.empty_like(init), chain.clone()
        converged = chain >= self.attacks.cold.cfg.steps
        for attack, mask in self.attacks.tiers(radii, init_radii, converged):
            rows = mask.nonzero().squeeze(1)
            if rows.numel():
                dev = rows.to(delta.device)
                delta[dev] = self._attack(attack, idx[rows], radii[rows], init[dev])
                steps[rows] += attack.cfg.steps
        return self.decide(idx, delta), delta, steps

    def _attack(self, attack: MaxDamageAttack, idx, radii, init) -> torch.Tensor:
        """The attack's perturbations of points ``idx`` at ``radii``, warm-started from ``init`` rescaled to them."""
        sel = idx.to(self.x.device)
        radii = radii.to(self.x.device)
        if init is not None:
            flat = init.reshape(init.shape[0], -1).to(torch.float64)
            scaled = flat * (radii / torch.linalg.vector_norm(flat, dim=1).clamp_min(1e-30)).unsqueeze(1)
            init = scaled.to(self.x.dtype).view_as(init)
        return attack.attack(self.x[sel], eps=radii, point_ids=idx + self.offset, init=init).delta


@dataclasses.dataclass
class _Search:
    """The state of a margin search over ``B`` points: bracket ends, evidence and evaluations."""

    lower: torch.Tensor
    upper: torch.Tensor  # inf until the attack broke r-robustness
    delta: torch.Tensor  # [B, *input_shape] the perturbation that broke r-robustness at upper
    hits: torch.Tensor
    samples: torch.Tensor
    evaluations: list[list[tuple[float, float]]]

    @classmethod
    def start(cls, x: torch.Tensor, clean: _Outcome) -> _Search:
        b = x.shape[0]
        evaluations = [[(0.0, float(p))] for p in clean.p_hat.tolist()]
        return cls(
            lower=torch.zeros(b, dtype=torch.float64),
            upper=torch.full((b,), math.inf, dtype=torch.float64),
            delta=torch.zeros_like(x),
            hits=clean.hits.clone(),
            samples=clean.samples.clone(),
            evaluations=evaluations,
        )

    def record(self, idx: torch.Tensor, radii: torch.Tensor, out: _Outcome, delta: torch.Tensor) -> None:
        """Log the evaluations; a point broken at a radius below its upper end takes it (and its δ) as evidence."""
        for j, i in enumerate(idx.tolist()):
            self.evaluations[i].append((float(radii[j]), float(out.p_hat[j])))
        broken = ~out.robust & (radii < self.upper[idx])
        held = out.robust & (radii > self.lower[idx])
        self.lower[idx[held]] = radii[held]
        sel = idx[broken]
        self.upper[sel] = radii[broken]
        self.delta[sel.to(self.delta.device)] = delta[broken.to(delta.device)].to(self.delta.dtype)
        self.hits[sel], self.samples[sel] = out.hits[broken], out.samples[broken]


def _check_max_radius(max_radius, b, device) -> torch.Tensor | None:
    if max_radius is None:
        return None
    if isinstance(max_radius, torch.Tensor) and max_radius.dim() == 1:
        if max_radius.shape[0] != b or bool((max_radius <= 0).any()) or not bool(torch.isfinite(max_radius).all()):
            raise ValueError(f"max_radius as a tensor must have {b} finite entries > 0")
        return max_radius.to(torch.float64).cpu()
    return torch.full((b,), check_positive_float("max_radius", float(max_radius)), dtype=torch.float64)


@analysis
def numerical_margin(
    model: torch.nn.Module,
    x: torch.Tensor,
    r: float,
    method: str = "bisection",
    tol: float = 0.01,
    max_radius: float | torch.Tensor | None = None,
    granularity: float = 0.01,
    num_samples: int = 1000,
    restarts: int = 1,
    steps: int = 50,
    num_noise_samples: int = 8,
    mode: str = "mean_var",
    optimizer: str = "pgd",
    box: tuple[float, float] | None = (0.0, 1.0),
    decision: str = "sequential",
    confidence: float = 0.95,
    start_radius: float | None = None,
    one_at_a_time: bool = False,
    warm_start: bool = True,
    warm_steps: int | None = None,
    seed: int = 0,
    point_offset: int = 0,
    estimate: RRobustnessResult | None = None,
    progress: bool = True,
    strategy: str = "secant",
) -> NumericalMargin:
    """Numerical margin ``R_num(x) = min{R : p_hat_r(x, delta*_R) <= 1/2}`` of every point, with its evidence.

    Args:
        model: a protocol model (run in eval mode; the caller's mode is restored).
        x: points ``[B, *input_shape]`` (an ``as_vae`` model learns its input shape from them).
        r: the reconstruction radius of r-robustness.
        method: ``"bisection"`` (batched bracketing and shrinking) or ``"grid"`` (the original protocol).
        tol: bisection stops when ``upper - lower <= tol``.
        max_radius: search limit, a float or ``[B]`` tensor (default: the largest L2 perturbation the box allows
            at each point, or ``start_radius * 2**20`` without a box).
        granularity: the grid step.
        num_samples: the sequential test's ``max_samples`` (or the fixed sample count).
        restarts, steps, num_noise_samples, mode, optimizer: the sphere attack (:class:`MaxDamageAttack`); ``steps``
            is the cold attack's (the first round of either strategy, every grid radius, every round without warm
            starts).
        box: the data range ``(low, high)`` or None.
        decision: how r-robustness of an attacked input is decided: ``"sequential"``
            (:func:`~vaefast.robustness.is_r_robust`: a radius breaks r-robustness only when the test decides
            ``p_r <= 1/2``, each decision at level ``(1 - confidence) / D`` with ``D`` the most decisions a point's
            search can make (:func:`max_decisions`), so by Bonferroni the stored breaking δ of a point is wrong with
            probability at most ``1 - confidence`` although the search tests many radii near the boundary) or
            ``"fixed"`` (:func:`~vaefast.robustness.estimate_r_robustness`: ``p_hat <= 1/2`` from ``num_samples``
            samples, the original protocol's rule).
        confidence: the search's family-wise confidence (see ``decision``) and that of the evidence's
            Clopper–Pearson interval.
        start_radius: first radius of the bisection's doubling phase.
        one_at_a_time: run the points one by one (the original protocol's execution).
        warm_start, warm_steps: bisection rounds after the first start from the point's previous (or breaking)
            perturbation rescaled to the new radius, with ``warm_steps`` steps (default ``max(5, steps // 3)``). The
            secant strategy's later rounds run ``warm_steps``, ``GROW_FRACTION`` of it (growth) or, once a warm
            start's chain has had ``steps`` steps and it is rescaled by at most ``NEAR_RATIO``, ``NEAR_FRACTION`` of
            it.
        seed, point_offset: Monte-Carlo and attack random numbers are keyed by ``(seed, point_offset + b)``.
        estimate: an :class:`~vaefast.robustness.RRobustnessResult` of these points at radius ``r`` (e.g. the one
            :func:`~vaefast.robustness.margin_bound` used): the clean point is then decided by it
            (``robust = p_hat > 1/2``), so the margin search and the bound decide the clean point identically.
            Without it the search decides the clean point with its own test (``decision``).
        progress: show a progress bar.
        strategy: how ``"bisection"`` chooses its radii: ``"secant"`` (default; module docstring) or
            ``"halving"`` (doubling, then halving).

    Returns:
        A :class:`NumericalMargin`: per point the margin, the bracket, and the perturbation that broke
        r-robustness at its upper end with the ``p_hat`` (and interval) the search saw there.
    """
    x, _, _ = check_analysis_inputs(model, x)
    r = check_positive_float("r", r)
    tol = check_positive_float("tol", tol)
    box = check_box(box)
    clean = None if estimate is None else _clean_outcome(estimate, r, x, model)
    caps, start_radius = _limits(x, box, max_radius, start_radius, tol)
    attacks = _sphere_attacks(
        model, box=box, mode=mode, restarts=restarts, num_noise_samples=num_noise_samples, optimizer=optimizer,
        seed=seed, steps=steps, warm_steps=warm_steps,
    )  # fmt: skip
    search = _SearchSettings(
        method=check_choice("method", method, METHODS),
        strategy=check_choice("strategy", strategy, STRATEGIES),
        tol=tol,
        granularity=check_positive_float("granularity", granularity),
        start_radius=start_radius,
        warm_start=bool(warm_start) and optimizer != "lbfgsb",
        attacks=attacks,
        decision=check_choice("decision", decision, DECISIONS),
        num_samples=check_positive_int("num_samples", num_samples),
        confidence=check_probability("confidence", confidence),
        seed=check_seed("seed", seed),
    )
    point_offset = check_seed("point_offset", point_offset)
    if not one_at_a_time:
        return _run(model, x, r, caps, search, point_offset, clean, progress)
    parts = [
        _run(model, x[i : i + 1], r, caps[i : i + 1], search, point_offset + i, _slice(clean, i), False)
        for i in tqdm(range(x.shape[0]), desc=f"margin ({search.method}, per point)", disable=not progress)
    ]
    return NumericalMargin.concat(parts)


@dataclasses.dataclass(frozen=True)
class _Attacks:
    """The search's sphere attacks (``||delta|| = R``), one object per step count.

    Attributes:
        cold: ``steps`` steps from random starts (the first round of either strategy; every grid radius).
        warm: ``warm_steps`` steps (the halving strategy's warm starts; the secant strategy's warm starts scaled down
            by more than ``NEAR_RATIO``).
        grow: ``GROW_FRACTION * warm_steps`` steps (secant growth rounds: warm starts scaled up by more than
            ``NEAR_RATIO``).
        near: ``NEAR_FRACTION * warm_steps`` steps (secant rounds whose warm start comes from a radius within a
            factor ``NEAR_RATIO`` and has had ``steps`` steps along its chain of warm starts: rescaled, it is already
            nearly optimal).
    """

    cold: MaxDamageAttack
    warm: MaxDamageAttack
    grow: MaxDamageAttack
    near: MaxDamageAttack

    def tiers(
        self, radii: torch.Tensor, init_radii: torch.Tensor, converged: torch.Tensor
    ) -> list[tuple[MaxDamageAttack, torch.Tensor]]:
        """The attack of each warm start found at ``init_radii`` and rescaled to ``radii``.

        Args:
            radii, init_radii: ``[n]`` the new radii and those the warm starts were found at.
            converged: ``[n]`` whether a warm start has had at least the cold attack's steps along its chain of
                warm starts.

        Returns:
            ``(attack, mask)`` pairs whose masks partition the points: ``near`` where the warm start has converged
            and ``max(R / R0, R0 / R) <= NEAR_RATIO``, else ``grow`` where ``R > R0`` and ``warm`` where ``R <= R0``.
        """
        near = converged & (torch.maximum(radii / init_radii, init_radii / radii) <= NEAR_RATIO)
        up = radii > init_radii
        return [(self.near, near), (self.grow, ~near & up), (self.warm, ~near & ~up)]


def _sphere_attacks(
    model: Any, *, box, mode, restarts, num_noise_samples, optimizer, seed, steps, warm_steps
) -> _Attacks:
    """The search's sphere attacks (see :class:`_Attacks`)."""
    check_choice("mode", mode, MODES)
    seed = check_seed("seed", seed)
    steps = check_positive_int("steps", steps)
    warm_steps = max(5, steps // 3) if warm_steps is None else check_positive_int("warm_steps", warm_steps)
    kw = dict(
        norm="L2", constraint="sphere", mode=mode, restarts=restarts, num_noise_samples=num_noise_samples, box=box,
        optimizer=optimizer, seed=seed,
    )  # fmt: skip

    def make(n: int) -> MaxDamageAttack:
        return MaxDamageAttack(model, 1.0, steps=n, **kw)

    return _Attacks(
        cold=make(steps),
        warm=make(warm_steps),
        grow=make(max(3, round(warm_steps * GROW_FRACTION))),
        near=make(max(3, round(warm_steps * NEAR_FRACTION))),
    )


@dataclasses.dataclass(frozen=True)
class _SearchSettings:
    method: str
    strategy: str
    tol: float
    granularity: float
    start_radius: float
    warm_start: bool
    attacks: _Attacks
    decision: str
    num_samples: int
    confidence: float
    seed: int


def _clean_outcome(estimate: object, r: float, x: torch.Tensor, model: Any) -> _Outcome:
    """The clean-point decision of an estimate at radius ``r``: ``robust = p_hat > 1/2`` from its hits."""
    from vaefast.robustness import column_for

    col = column_for(estimate, r, x, model=model)
    hits = col.hits[:, 0].cpu()
    samples = torch.full_like(hits, col.num_samples)
    return _Outcome(2 * hits > samples, hits, samples)


def _slice(clean: _Outcome | None, i: int) -> _Outcome | None:
    if clean is None:
        return None
    return _Outcome(clean.robust[i : i + 1], clean.hits[i : i + 1], clean.samples[i : i + 1])


def _limits(x, box, max_radius, start_radius, tol) -> tuple[torch.Tensor, float]:
    """Per-point search limits (checked against the box's largest perturbation) and the first bracketing radius."""
    caps = _check_max_radius(max_radius, x.shape[0], x.device)
    if start_radius is not None:
        start_radius = check_positive_float("start_radius", start_radius)
    feasible = max_perturbation(x, box)
    if feasible is not None:
        if caps is None:
            caps = feasible
        elif bool((caps > feasible * (1 + 1e-9)).any()):
            i = int((caps > feasible * (1 + 1e-9)).nonzero()[0])
            raise ValueError(
                f"max_radius={caps[i].item():.4g} exceeds the largest perturbation the box allows at "
                f"point {i} ({feasible[i].item():.4g})"
            )
    if start_radius is None:
        start_radius = max(2 * tol, 0.25) if caps is None else max(2 * tol, min(0.25, float(caps.min()) / 4))
    if caps is None:
        caps = torch.full((x.shape[0],), start_radius * 2.0**20, dtype=torch.float64)
    return caps, start_radius


def max_decisions(
    method: str, caps: torch.Tensor, start_radius: float, tol: float, granularity: float, part: str = "all"
) -> int:
    """The most r-robustness decisions a point's search can make (the clean point included).

    Bisection (either strategy): ``G = ceil(log2(cap / start)) + 1`` growth rounds (doubling from ``start``
    reaches the cap in G rounds; the secant search grows at least that fast once its rounds run short) and
    ``H = ceil(log2(cap / tol)) + 1`` refinement rounds (halving closes any bracket ``<= cap`` in H; the secant
    search halves once its rounds left are only enough for that); grid: ``floor(cap / granularity) + 1`` radii, plus
    the clean point.

    Args:
        method: ``"bisection"`` or ``"grid"``.
        caps: ``[B]`` the search limits (the largest one counts).
        start_radius: the first radius of the bisection's doubling phase.
        tol: the bisection's final bracket width.
        granularity: the grid step.
        part: ``"all"`` (``1 + G + H``), ``"grow"`` (``G``) or ``"refine"`` (``H``).

    Returns:
        ``D``, the Bonferroni divisor of the search's per-decision level (or the part asked for).
    """
    cap = float(caps.max())
    if method == "grid":
        return int(math.floor(cap / granularity + 1e-9)) + 2
    doubling = max(0, math.ceil(math.log2(max(cap / start_radius, 1.0)))) + 1
    halving = max(0, math.ceil(math.log2(max(cap / tol, 1.0)))) + 1
    return {"all": 1 + doubling + halving, "grow": doubling, "refine": halving}[part]


def _run(model, x, r, caps, search: _SearchSettings, point_offset, clean, progress) -> NumericalMargin:
    decisions = max_decisions(search.method, caps, search.start_radius, search.tol, search.granularity)
    per_decision = 1.0 - (1.0 - search.confidence) / decisions  # Bonferroni over the search's decisions
    secant = search.method == "bisection" and search.strategy == "secant"
    futility = FUTILITY if secant and search.decision == "sequential" else None
    decider = _Decider(
        model, x, r, search.attacks, search.decision, search.num_samples, per_decision, search.seed, point_offset,
        futility,
    )  # fmt: skip
    if clean is None:
        clean = decider.decide(torch.arange(x.shape[0]), None)
    state = _Search.start(x, clean)
    if secant:
        z_target = _z_target(search.decision, search.num_samples, per_decision)
        _secant(decider, clean, caps, search, state, z_target, progress)
    elif search.method == "bisection":
        _bisection(decider, clean.robust, caps, search, state, progress)
    else:
        _grid(decider, clean.robust, caps, search.granularity, state, progress)
    return _finish(state, clean.robust, caps, r, search, point_offset)


def _z_target(decision: str, num_samples: int, level: float) -> float:
    """The probit the secant search aims its radii at: ``Phi^-1(p*)`` with ``p*`` half a count above the largest
    ``p_hat`` a decision at ``level`` calls broken (sequential: :func:`vaefast.stats.largest_decidable_not_robust` of
    the test's last round at its per-round level; fixed: 1/2). The decisions of one point use the same Monte-Carlo
    samples at every radius, so its ``p_hat(R)`` is a smooth curve and its decision flips where it crosses ``p*``."""
    if decision == "fixed":
        return 0.0
    schedule = sequential_schedule(num_samples)
    n = schedule[-1]
    p_star = largest_decidable_not_robust(n, (1.0 - level) / len(schedule))
    p_star = p_star + 0.5 / n if p_star >= 0 else 0.5  # between the last count decided broken and the next
    return float(torch.special.ndtri(torch.tensor(p_star, dtype=torch.float64)))


def _finish(state: _Search, robust0, caps, r, search: _SearchSettings, point_offset) -> NumericalMargin:
    """Margins from the final brackets; evidence NaN/zero where the search did not bracket."""
    found = torch.isfinite(state.upper)
    bracketed = ~robust0 | found
    upper = torch.where(found & robust0, state.upper, torch.zeros_like(state.upper))
    if search.method == "bisection":
        margin = torch.where(robust0, torch.where(found, state.upper, caps), torch.zeros_like(caps))
    else:  # the protocol's answer: the first grid radius (from the top) still r-robust
        margin = torch.where(robust0, state.lower, torch.zeros_like(caps))
    hits = torch.where(bracketed, state.hits, torch.zeros_like(state.hits))
    samples = torch.where(bracketed, state.samples, torch.zeros_like(state.samples))
    p_hat = torch.where(bracketed, hits.to(torch.float64) / samples.clamp_min(1), torch.full_like(upper, math.nan))
    ci_low, ci_high = clopper_pearson(hits, samples.clamp_min(1), search.confidence)
    nan = torch.full_like(upper, math.nan)
    delta = state.delta * (found & robust0).to(state.delta.dtype).view(-1, *[1] * (state.delta.dim() - 1)).to(
        state.delta.device
    )
    return NumericalMargin(
        margin=margin,
        lower=torch.where(robust0, state.lower, torch.zeros_like(caps)),
        upper=upper,
        bracketed=bracketed,
        delta=delta,
        p_hat_delta=p_hat,
        hits_delta=hits,
        samples_delta=samples,
        ci_low_delta=torch.where(bracketed, ci_low, nan),
        ci_high_delta=torch.where(bracketed, ci_high, nan),
        evaluations=state.evaluations,
        max_radius=caps,
        r=r,
        method=search.method,
        confidence=search.confidence,
        point_index=torch.arange(point_offset, point_offset + caps.shape[0]),
    )


def _bisection(decider: _Decider, robust0, caps, search: _SearchSettings, state: _Search, progress: bool) -> None:
    """Bracket by doubling from ``start_radius`` (capped), then halve every open bracket at once."""
    b = robust0.shape[0]
    radius = torch.minimum(torch.full((b,), search.start_radius, dtype=torch.float64), caps)
    growing = robust0.clone()
    bar = tqdm(desc="margin (bisection)", unit="round", disable=not progress)
    last = torch.zeros_like(decider.x)  # the latest attack per point (warm start of the next doubling)
    first = True
    while bool(growing.any()):
        idx = growing.nonzero().squeeze(1)
        dev = idx.to(last.device)
        init = None if first or not search.warm_start else last[dev]
        out, delta = decider.at(idx, radius[idx], init=init)
        first = False
        last[dev] = delta
        state.record(idx, radius[idx], out, delta)
        growing[idx[~out.robust]] = False
        held = idx[out.robust]
        growing[held[radius[held] >= caps[held]]] = False
        radius = torch.minimum(2 * radius, caps)
        bar.update(1)
    while True:
        open_ = torch.isfinite(state.upper) & (state.upper - state.lower > search.tol) & robust0
        if not bool(open_.any()):
            break
        idx = open_.nonzero().squeeze(1)
        mid = 0.5 * (state.lower[idx] + state.upper[idx])
        init = state.delta[idx.to(state.delta.device)] if search.warm_start else None
        out, delta = decider.at(idx, mid, init=init)
        state.record(idx, mid, out, delta)
        bar.update(1)
    bar.close()


def _grid(decider: _Decider, robust0, caps, granularity, state: _Search, progress: bool) -> None:
    """Radii ``caps, caps - granularity, ...`` until the attacked input is r-robust (points with margin 0 and
    non-robust clean points are never attacked)."""
    active = robust0.clone()
    steps = int(math.floor(float(caps.max()) / granularity + 1e-9))
    bar = tqdm(total=steps, desc="margin (grid)", unit="radius", disable=not progress)
    for k in range(steps + 1):
        radius = caps - k * granularity
        todo = active & (radius > granularity * 1e-6)
        if not bool(todo.any()):
            break
        idx = todo.nonzero().squeeze(1)
        out, delta = decider.at(idx, radius[idx])
        state.record(idx, radius[idx], out, delta)
        active[idx[out.robust]] = False
        bar.update(1)
    bar.close()


# --- the secant search -------------------------------------------------------------------------------------------
def _probit(p_hat: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """``z = Phi^-1(p_hat)`` with ``p_hat`` clipped to ``[1 / (2n), 1 - 1 / (2n)]`` (finite for 0 or n hits)."""
    half = 0.5 / samples.to(torch.float64).clamp_min(1)
    return torch.special.ndtri(p_hat.to(torch.float64).clamp(half, 1 - half))


@dataclasses.dataclass
class _Secant:
    """Per-point state of the secant search besides the bracket (``_Search``): the probits ``z = Phi^-1(p_hat)``
    at the bracket ends (Illinois-scaled), the last two evaluations ``(radius, z)`` (``prev`` before ``last``; both
    the clean point at the start), which end moved last (+1 upper, -1 lower, 0 none) and the rounds left per phase.
    """

    z_lower: torch.Tensor
    z_upper: torch.Tensor
    last: torch.Tensor
    z_last: torch.Tensor
    prev: torch.Tensor
    z_prev: torch.Tensor
    side: torch.Tensor
    grow_left: torch.Tensor
    refine_left: torch.Tensor

    @classmethod
    def start(cls, clean: _Outcome, grow: int, refine: int) -> _Secant:
        z0 = _probit(clean.p_hat, clean.samples)
        b, zero = z0.shape[0], torch.zeros_like(z0)
        return cls(
            z_lower=z0, z_upper=torch.full_like(z0, math.nan), last=zero, z_last=z0.clone(), prev=zero.clone(),
            z_prev=z0.clone(), side=torch.zeros(b, dtype=torch.int64), grow_left=torch.full((b,), grow),
            refine_left=torch.full((b,), refine),
        )  # fmt: skip


def _secant_root(sec: _Secant, idx: torch.Tensor, z_target: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The secant through the last two evaluations, ``R = last + (z* - z_last) (last - prev) / (z_last - z_prev)``,
    and where it is usable (two distinct radii, probit falling with the radius)."""
    a, za, b, zb = sec.last[idx], sec.z_last[idx], sec.prev[idx], sec.z_prev[idx]
    dr, dz = a - b, za - zb
    ok = (dr.abs() > 0) & (dz * dr.sign() < 0) & (dz.abs() >= MIN_DZ)
    root = a + (z_target - za) * dr / torch.where(ok, dz, -torch.ones_like(dz))
    return root, ok


def _grow_radii(idx, state: _Search, sec: _Secant, caps, first, z_target, tol) -> torch.Tensor:
    """Next radii of points without a broken radius yet: the first round at ``first``; then
    ``t = lower + OVERSHOOT (R_s - lower) + tol`` with ``R_s`` the root of the secant through the last two (robust)
    evaluations in ``(R, z)`` (so the test most likely breaks; ``2 lower`` where the secant is unusable), within
    ``[lower + tol, MAX_GROWTH lower]``; raised to ``cap / 2**(rounds left - 1)`` so that the phase reaches the cap
    within its budget, and capped.

    Returns:
        ``[len(idx)]`` float64 radii.
    """
    a = state.lower[idx]
    root, ok = _secant_root(sec, idx, z_target)
    ok &= (a > 0) & (root > a)
    t = torch.where(ok, a + OVERSHOOT * (root - a) + tol, 2 * a)
    t = torch.minimum(torch.maximum(t, a + tol), MAX_GROWTH * a)
    t = torch.where(a > 0, t, first[idx])
    left = sec.grow_left[idx].to(torch.float64)
    t = torch.maximum(t, caps[idx] / torch.pow(2.0, (left - 1).clamp_min(0)))
    return torch.minimum(t, caps[idx])


def _refine_radii(idx, state: _Search, sec: _Secant, z_target: float, tol: float) -> torch.Tensor:
    """Next radii inside open brackets ``[lower, upper]``: the root of the secant through the last two evaluations
    in ``(R, z)`` where it lands inside the bracket, else regula falsi on the (Illinois-scaled) bracket ends
    ``lower + (z_lower - z*) / (z_lower - z_upper) (upper - lower)`` (the midpoint where their probits do not straddle
    ``z*``); at least ``upper / MAX_SHRINK`` and kept ``tol`` inside the bracket; a bracket of width ``<= 2 tol`` is
    tested inside ``[upper - tol, lower + tol]`` (closed by either outcome); the midpoint once the phase's rounds
    left only suffice for halving (``ceil(log2(width / tol)) >= rounds left``).

    Returns:
        ``[len(idx)]`` float64 radii, strictly inside the brackets.
    """
    lo, up, zl, zu = state.lower[idx], state.upper[idx], sec.z_lower[idx], sec.z_upper[idx]
    w, step = up - lo, tol * (1 - 1e-9)  # a hair under tol: a bracket closed by one step is <= tol in floats
    straddle = (zl > z_target) & (zu < z_target)
    frac = torch.where(straddle, (zl - z_target) / (zl - zu).clamp_min(1e-300), torch.full_like(w, 0.5))
    root, ok = _secant_root(sec, idx, z_target)
    m = torch.where(ok & (root > lo) & (root < up), root, lo + frac * w)
    m = torch.maximum(m, up / MAX_SHRINK)
    narrow = w <= 2 * step
    t = torch.where(narrow, m.clamp(up - step, lo + step), torch.minimum(torch.maximum(m, lo + step), up - step))
    need = torch.ceil(torch.log2(w / tol) - 1e-9)  # halvings left to close the bracket (slack: float rounding)
    return torch.where(need >= sec.refine_left[idx].to(torch.float64), lo + 0.5 * w, t)


def _secant_update(idx, radii, out: _Outcome, state: _Search, sec: _Secant, z_target: float) -> None:
    """Probits, last evaluations and Illinois scaling after a round (call before ``state.record``): when the same
    bracket end moves twice in a row, the other end's distance ``z - z*`` is halved (Illinois), so regula falsi does
    not stall on a stale end."""
    z = _probit(out.p_hat, out.samples)
    held = out.robust & (radii > state.lower[idx])
    broken = ~out.robust & (radii < state.upper[idx])
    refining = torch.isfinite(state.upper[idx])
    sec.grow_left[idx[~refining]] -= 1
    sec.refine_left[idx[refining]] -= 1
    sec.prev[idx], sec.z_prev[idx] = sec.last[idx], sec.z_last[idx]
    sec.last[idx], sec.z_last[idx] = radii, z
    h, b = idx[held], idx[broken]
    sec.z_lower[h], sec.z_upper[b] = z[held], z[broken]
    au, al = idx[broken & refining & (sec.side[idx] == 1)], idx[held & refining & (sec.side[idx] == -1)]
    sec.z_lower[au] = z_target + 0.5 * (sec.z_lower[au] - z_target)
    sec.z_upper[al] = z_target + 0.5 * (sec.z_upper[al] - z_target)
    sec.side[b], sec.side[h] = 1, -1


def _secant(decider: _Decider, clean: _Outcome, caps, search, state: _Search, z_target, progress) -> None:
    """The secant strategy: per point, grow from ``start_radius`` until the attack breaks r-robustness
    (:func:`_grow_radii`), then shrink the bracket (:func:`_refine_radii`) until it is ``<= tol`` wide; every round
    is one batched attack (per-point radii and step counts) and one batched decision, within the budget of
    :func:`max_decisions` (``1 + grow + refine`` decisions per point). Warm starts: growth rounds from the point's
    latest perturbation, refinement rounds from its breaking one (found at a larger radius, which rescales down
    best); the steps along each perturbation's chain of warm starts are counted (:meth:`_Decider.at_tiers`)."""
    budget = dict(caps=caps, start_radius=search.start_radius, tol=search.tol, granularity=search.granularity)
    sec = _Secant.start(
        clean, max_decisions("bisection", part="grow", **budget), max_decisions("bisection", part="refine", **budget)
    )
    first = torch.minimum(torch.full_like(caps, search.start_radius), caps)
    last = torch.zeros_like(decider.x)  # the latest attack per point (warm start of the next growth round)
    chain_last = torch.zeros_like(caps, dtype=torch.int64)  # optimisation steps along last's chain of warm starts
    chain_upper = torch.zeros_like(chain_last)  # ... and along the breaking perturbation's
    active = clean.robust.clone()
    bar = tqdm(desc="margin (secant)", unit="round", disable=not progress)
    for rnd in itertools.count():
        if not bool(active.any()):
            break
        idx = active.nonzero().squeeze(1)
        refining = torch.isfinite(state.upper[idx])
        radii = torch.where(
            refining,
            _refine_radii(idx, state, sec, z_target, search.tol),
            _grow_radii(idx, state, sec, caps, first, z_target, search.tol),
        )
        dev = idx.to(last.device)
        if search.warm_start and rnd > 0:
            init = torch.where(refining.to(last.device).view(-1, *[1] * (last.dim() - 1)), state.delta[dev], last[dev])
            init_radii = torch.where(refining, state.upper[idx], sec.last[idx])
            chain = torch.where(refining, chain_upper[idx], chain_last[idx])
            out, delta, chain = decider.at_tiers(idx, radii, init, init_radii, chain)
        else:  # the first round (or every round without warm starts): the cold attack from random starts
            attack = decider.attacks.cold
            out, delta = decider.at(idx, radii, attack=attack)
            chain = torch.full_like(idx, attack.cfg.steps)
        last[dev], chain_last[idx] = delta, chain
        new_upper = ~out.robust & (radii < state.upper[idx])
        chain_upper[idx[new_upper]] = chain[new_upper]
        _secant_update(idx, radii, out, state, sec, z_target)
        state.record(idx, radii, out, delta)
        closed = torch.isfinite(state.upper) & (state.upper - state.lower <= search.tol)
        active &= ~(closed | (~torch.isfinite(state.upper) & (state.lower >= caps)))
        bar.update(1)
    bar.close()
