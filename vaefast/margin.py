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

- ``method="bisection"`` (fast, batched over all points): radii grow by doubling from ``start_radius`` (capped at
  ``max_radius``) until the attack breaks r-robustness, then each point's bracket ``[lower, upper]`` (robust at
  lower, broken at upper) is halved until ``upper - lower <= tol``; every round is one batched attack with
  per-point radii, warm-started from the point's previous / breaking perturbation (``warm_start``).
  The margin is ``upper``; a point still robust at ``max_radius`` gets ``margin = max_radius``,
  ``bracketed=False`` and no evidence.
- ``method="grid"`` (the original protocol): radii ``max_radius, max_radius - granularity, ...`` from large to
  small; the margin is the first (largest) radius at which the attacked input is still r-robust (``bracketed``
  is False when that is ``max_radius`` itself; 0 when no grid radius is robust); the evidence is the attack at
  the grid radius above it (``upper``).

Points whose clean point is not r-robust get margin 0. ``max_radius`` defaults to the largest L2 perturbation the
data box allows at each point (its farthest corner), or ``start_radius * 2**20`` without a box.
"""

from __future__ import annotations

import dataclasses
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
from vaefast.attacks.base import box_offsets
from vaefast.attacks.max_damage import MODES, MaxDamageAttack
from vaefast.attacks.projections import max_l2_norm
from vaefast.rng import id_runs
from vaefast.robustness import RRobustnessResult
from vaefast.stats import clopper_pearson

METHODS = ("bisection", "grid")
DECISIONS = ("sequential", "fixed")

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

    def __init__(self, model, x, r, attack, warm_attack, decision, num_samples, confidence, seed, offset):
        self.model, self.x, self.r, self.attack, self.warm_attack = model, x, r, attack, warm_attack
        self.decision, self.num_samples, self.confidence = decision, num_samples, confidence
        self.seed, self.offset = seed, offset

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
                res = is_r_robust(self.model, xs, self.r, max_samples=self.num_samples, **common)
                broken = res.decided & ~res.robust  # an undecided test is no evidence of a break
                out.robust[sl], out.hits[sl], out.samples[sl] = ~broken.cpu(), res.hits.cpu(), res.samples_used.cpu()
            else:
                res = estimate_r_robustness(self.model, xs, self.r, num_samples=self.num_samples, **common)
                out.robust[sl], out.hits[sl] = res.robust[:, 0].cpu(), res.hits[:, 0].cpu()
                out.samples[sl] = res.num_samples
        return out

    def at(
        self, idx: torch.Tensor, radii: torch.Tensor, init: torch.Tensor | None = None
    ) -> tuple[_Outcome, torch.Tensor]:
        """Attack points ``idx`` at ``radii`` (warm-started from ``init`` rescaled to the radii, if given) and
        decide; returns the outcome and the attack's perturbations."""
        sel = idx.to(self.x.device)
        radii = radii.to(self.x.device)
        if init is None:
            res = self.attack.attack(self.x[sel], eps=radii, point_ids=idx + self.offset)
        else:
            flat = init.reshape(init.shape[0], -1).to(torch.float64)
            scaled = flat * (radii / torch.linalg.vector_norm(flat, dim=1).clamp_min(1e-30)).unsqueeze(1)
            res = self.warm_attack.attack(
                self.x[sel], eps=radii, point_ids=idx + self.offset, init=scaled.to(self.x.dtype).view_as(init)
            )
        return self.decide(idx, res.delta), res.delta


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
) -> NumericalMargin:
    """Numerical margin ``R_num(x) = min{R : p_hat_r(x, delta*_R) <= 1/2}`` of every point, with its evidence.

    Args:
        model: a protocol model (run in eval mode; the caller's mode is restored).
        x: points ``[B, *input_shape]`` (an ``as_vae`` model learns its input shape from them).
        r: the reconstruction radius of r-robustness.
        method: ``"bisection"`` (batched bracketing and halving) or ``"grid"`` (the original protocol).
        tol: bisection stops when ``upper - lower <= tol``.
        max_radius: search limit, a float or ``[B]`` tensor (default: the largest L2 perturbation the box allows
            at each point, or ``start_radius * 2**20`` without a box).
        granularity: the grid step.
        num_samples: the sequential test's ``max_samples`` (or the fixed sample count).
        restarts, steps, num_noise_samples, mode, optimizer: the sphere attack (:class:`MaxDamageAttack`).
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
            perturbation rescaled to the new radius, with ``warm_steps`` steps (default ``max(5, steps // 3)``).
        seed, point_offset: Monte-Carlo and attack random numbers are keyed by ``(seed, point_offset + b)``.
        estimate: an :class:`~vaefast.robustness.RRobustnessResult` of these points at radius ``r`` (e.g. the one
            :func:`~vaefast.robustness.margin_bound` used): the clean point is then decided by it
            (``robust = p_hat > 1/2``), so the margin search and the bound decide the clean point identically.
            Without it the search decides the clean point with its own test (``decision``).
        progress: show a progress bar.

    Returns:
        A :class:`NumericalMargin`: per point the margin, the bracket, and the perturbation that broke
        r-robustness at its upper end with the ``p_hat`` (and interval) the search saw there.
    """
    x, _, _ = check_analysis_inputs(model, x)
    r = check_positive_float("r", r)
    tol = check_positive_float("tol", tol)
    box = check_box(box)
    clean = None if estimate is None else _clean_outcome(estimate, r, x)
    caps, start_radius = _limits(x, box, max_radius, start_radius, tol)
    attack, warm_attack = _sphere_attacks(
        model, box=box, mode=mode, restarts=restarts, num_noise_samples=num_noise_samples, optimizer=optimizer,
        seed=seed, steps=steps, warm_steps=warm_steps,
    )  # fmt: skip
    search = _SearchSettings(
        method=check_choice("method", method, METHODS),
        tol=tol,
        granularity=check_positive_float("granularity", granularity),
        start_radius=start_radius,
        warm_start=bool(warm_start) and optimizer != "lbfgsb",
        attack=attack,
        warm_attack=warm_attack,
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


def _sphere_attacks(
    model: Any, *, box, mode, restarts, num_noise_samples, optimizer, seed, steps, warm_steps
) -> tuple[MaxDamageAttack, MaxDamageAttack]:
    """The search's sphere attack (``||delta|| = R``) and its warm-started variant with ``warm_steps`` steps."""
    check_choice("mode", mode, MODES)
    seed = check_seed("seed", seed)
    steps = check_positive_int("steps", steps)
    warm_steps = max(5, steps // 3) if warm_steps is None else check_positive_int("warm_steps", warm_steps)
    kw = dict(
        norm="L2", constraint="sphere", mode=mode, restarts=restarts, num_noise_samples=num_noise_samples, box=box,
        optimizer=optimizer, seed=seed,
    )  # fmt: skip
    return MaxDamageAttack(model, 1.0, steps=steps, **kw), MaxDamageAttack(model, 1.0, steps=warm_steps, **kw)


@dataclasses.dataclass(frozen=True)
class _SearchSettings:
    method: str
    tol: float
    granularity: float
    start_radius: float
    warm_start: bool
    attack: MaxDamageAttack
    warm_attack: MaxDamageAttack
    decision: str
    num_samples: int
    confidence: float
    seed: int


def _clean_outcome(estimate: object, r: float, x: torch.Tensor) -> _Outcome:
    """The clean-point decision of an estimate at radius ``r``: ``robust = p_hat > 1/2`` from its hits."""
    from vaefast.robustness import _column_for

    col = _column_for(estimate, r, x)
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
    lo_box, hi_box = box_offsets(x, box)
    if lo_box is not None:
        feasible = max_l2_norm(lo_box, hi_box).cpu()
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


def max_decisions(method: str, caps: torch.Tensor, start_radius: float, tol: float, granularity: float) -> int:
    """The most r-robustness decisions a point's search can make (the clean point included).

    Bisection: ``1 + ceil(log2(cap / start)) + 1`` doubling rounds and ``ceil(log2(cap / tol)) + 1`` halvings
    (a bracket never exceeds the cap); grid: ``floor(cap / granularity) + 1`` radii, plus the clean point.

    Args:
        method: ``"bisection"`` or ``"grid"``.
        caps: ``[B]`` the search limits (the largest one counts).
        start_radius: the first radius of the bisection's doubling phase.
        tol: the bisection's final bracket width.
        granularity: the grid step.

    Returns:
        ``D``, the Bonferroni divisor of the search's per-decision level.
    """
    cap = float(caps.max())
    if method == "grid":
        return int(math.floor(cap / granularity + 1e-9)) + 2
    doubling = max(0, math.ceil(math.log2(max(cap / start_radius, 1.0)))) + 1
    halving = max(0, math.ceil(math.log2(max(cap / tol, 1.0)))) + 1
    return 1 + doubling + halving


def _run(model, x, r, caps, search: _SearchSettings, point_offset, clean, progress) -> NumericalMargin:
    decisions = max_decisions(search.method, caps, search.start_radius, search.tol, search.granularity)
    per_decision = 1.0 - (1.0 - search.confidence) / decisions  # Bonferroni over the search's decisions
    decider = _Decider(
        model, x, r, search.attack, search.warm_attack, search.decision, search.num_samples, per_decision,
        search.seed, point_offset,
    )  # fmt: skip
    if clean is None:
        clean = decider.decide(torch.arange(x.shape[0]), None)
    state = _Search.start(x, clean)
    if search.method == "bisection":
        _bisection(decider, clean.robust, caps, search, state, progress)
    else:
        _grid(decider, clean.robust, caps, search.granularity, state, progress)
    return _finish(state, clean.robust, caps, r, search, point_offset)


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
