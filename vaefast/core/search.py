"""The numerical margin search on validated tensors: one attack path per point that serves every radius r.

The maximum-damage objective ``E ||g(mu(x + delta) + eta sigma(x + delta)) - g(mu(x))||`` does not depend on r, so a
point's sphere attacks at radii ``R_1, R_2, ...`` (each warm-started from the stored perturbation nearest in radius)
form one path, and every attacked input is decided for all K radii r from one set of samples
(:func:`vaefast.core.decide.decide`). A point draws the same Monte-Carlo samples at every attacked input, so its
``p_hat_r(R)`` is a smooth curve along the path.

Per (point, r) the search keeps three numbers (SPEC §1):

- ``margin``, the estimate: where ``p_hat_r`` crosses 1/2 along the path, interpolated in probit space between the
  bracket ``a`` (the largest attacked radius below ``b`` with ``p_hat > 1/2``; the clean point at 0) and ``b`` (the
  smallest with ``p_hat <= 1/2``). It uses every count the search collected and converges to the path's crossing as
  the samples grow; with the fixed rule it is the original protocol's ``p_hat <= 1/2``.
- ``upper``, the evidence: the smallest attacked radius decided broken (its perturbation is stored).
- ``lower``: the largest attacked radius below ``b`` decided robust (0 if none). Undecided counts as neither.

Rounds (``method="bisection"``): every unresolved (point, r) proposes radii, the proposals of a point closer than
``tol / 4`` merge into one row, the rows of a round are attacked in one batched call per attack tier and decided in
one batched call. A (point, r) *grows* from ``start_radius`` (secant in ``(R, z = Phi^-1(p_hat))`` aimed past the
decidable-broken probit, at most doubling; raised to reach ``max_radius`` within its rounds) until a radius is decided
broken, then *refines* the bracket ``[a, b]`` of the crossing (regula falsi in ``z``, kept ``w / 8`` inside; a pair
``0.95 tol`` inside an end the root lies near; halving when its rounds run short) until ``b - a <= tol``, with
``tol`` at least half the crossing's Monte-Carlo standard error (:func:`_effective_tol`), then
spends at most one row each on tightening ``upper`` and ``lower`` (aimed, on a weighted least-squares line of ``z``
against ``R``, just past the probits where the test decides). ``method="grid"`` is the original protocol: radii
``max_radius - j granularity`` from the top until the attacked input is not decided broken.

Confidence: a (point, r) makes at most ``P = G + H + 2`` proposals (growth, refinement, ends), so a point has at
most ``K P`` rows, each a decision for every r; every decision runs at level ``(1 - confidence) / (K P)``, so by
Bonferroni all claims of a point (its ``upper`` and ``lower`` for every r) hold together with probability at least
``confidence``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from vaefast.attacks.max_damage import MaxDamageAttack
from vaefast.core.box import Box
from vaefast.core.decide import BROKEN, DECIDE, FUTILE, ROBUST, SIDE, UNDECIDED, Decisions, Rule, decide
from vaefast.core.encoding import Encoding, encode
from vaefast.core.options import MarginOptions
from vaefast.core.sampling import Sampler

__all__ = ["SearchInputs", "SearchResult", "budget", "search"]

FUTILITY = 1e-3  # level of the futility stop of the sequential test
OVERSHOOT = 1.5  # growth aims at lower + OVERSHOOT (secant root - lower) + tol ...
MAX_GROWTH = 2.0  # ... and at most doubles the largest attacked radius
MIN_DZ = 0.05  # a secant needs probits this far apart
NEAR_RATIO = 1.25  # a converged warm start rescaled by at most this: the near attack
NEAR_FRACTION, GROW_FRACTION = 0.25, 0.75  # the near and growth attacks' steps, as fractions of warm_steps
AIM = 0.2  # the ends rows aim this far (in probit) past the probit where the test decides
NOISE = 1.0  # a crossing's bracket need not be narrower than this fraction of the estimate's standard error
GROW, REFINE, ENDS, DONE = 0, 1, 2, 3


@dataclass(frozen=True)
class SearchInputs:
    """What a search needs, validated.

    Attributes:
        model: a protocol model in eval mode.
        x: points ``[B, *input_shape]`` on the model's device.
        enc: their clean :class:`Encoding`.
        ids: ``[B]`` int64 global point ids (CPU): they key every random number.
        radii: ``[K]`` float64 reconstruction radii (CPU).
        clean: ``[B, K]`` int8 clean decisions; ``clean_hits``, ``clean_n``: ``[B, K]`` their counts.
        caps: ``[B]`` float64 search limits.
        offsets: the box offsets ``(lo, hi)`` of x on its device, or None.
        options: the search settings.
        seed: the Monte-Carlo stream (the attacks' random numbers too).
        sampler: draws and counts.
    """

    model: object
    x: torch.Tensor
    enc: Encoding
    ids: torch.Tensor
    radii: torch.Tensor
    clean: torch.Tensor
    clean_hits: torch.Tensor
    clean_n: torch.Tensor
    caps: torch.Tensor
    offsets: tuple[torch.Tensor, torch.Tensor] | None
    options: MarginOptions
    seed: int
    sampler: Sampler


@dataclass
class SearchResult:
    """Per (point, radius), ``[B, K]`` on the CPU unless noted: ``margin`` (the estimate), ``lower``, ``upper`` (NaN
    without evidence), ``bracketed`` (evidence exists), ``delta`` ``[B, K, *input_shape]`` (the evidence; zeros
    without), ``hits``/``samples`` at the evidence, ``evaluations`` (``[B][K]`` lists of ``(radius, p_hat)``, the
    clean point first) and ``rows`` (attacked inputs per point, ``[B]``)."""

    margin: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    bracketed: torch.Tensor
    delta: torch.Tensor
    hits: torch.Tensor
    samples: torch.Tensor
    evaluations: list[list[list[tuple[float, float]]]]
    rows: torch.Tensor


def budget(options: MarginOptions, caps: torch.Tensor, start: float, k: int) -> tuple[int, int, int]:
    """The proposal budget of one (point, radius) and the Bonferroni divisor of a point's decisions.

    Args:
        options: the search settings.
        caps: ``[B]`` the search limits (the largest counts).
        start: the first growth radius.
        k: the number of radii.

    Returns:
        ``(G, H, D)``: growth proposals ``G = ceil(log2(cap / start)) + 1`` (doubling from ``start`` reaches the cap),
        refinement rounds ``H = ceil(log2(cap / tol)) + 1`` (halving closes any bracket), and ``D`` the most rows a
        point can have: ``K (G + H + 2)`` (bisection) or ``floor(cap / granularity) + 1`` (grid).
    """
    cap = float(caps.max())
    if options.method == "grid":
        return 0, 0, int(math.floor(cap / options.granularity + 1e-9)) + 1
    grow = max(0, math.ceil(math.log2(max(cap / start, 1.0)))) + 1
    refine = max(0, math.ceil(math.log2(max(cap / options.tol, 1.0)))) + 1
    return grow, refine, k * (grow + refine + 2)


def probit(p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``Phi^-1(p)`` with ``p`` clipped to ``[1 / (2n), 1 - 1 / (2n)]`` (finite at 0 or n hits).

    Args:
        p: probabilities (float64).
        n: the samples behind them (broadcast).

    Returns:
        The probits.
    """
    half = 0.5 / n.to(torch.float64).clamp_min(1)
    return torch.special.ndtri(p.to(torch.float64).clamp(half, 1 - half))


# --- the state ---------------------------------------------------------------------------------------------------
class _State:
    """Everything a search knows: the rows of every point (radius, and per radius r the counts and the decision),
    the status of every (point, r), its evidence and its latest perturbation (warm starts), on the CPU except the
    perturbations (on the model's device)."""

    def __init__(self, inp: SearchInputs, rows_max: int) -> None:
        b, k = inp.clean.shape
        shape = tuple(inp.x.shape[1:])
        self.ev_r = torch.full((b, rows_max), math.nan, dtype=torch.float64)
        self.ev_h = torch.zeros(b, rows_max, k, dtype=torch.int64)
        self.ev_n = torch.zeros(b, rows_max, k, dtype=torch.int64)
        self.ev_dec = torch.zeros(b, rows_max, k, dtype=torch.int8)
        self.count = torch.zeros(b, dtype=torch.int64)
        self.status = torch.where(inp.clean == ROBUST, GROW, DONE).to(torch.int8)
        self.grown = torch.zeros(b, k, dtype=torch.int64)  # growth proposals
        self.refined = torch.zeros(b, k, dtype=torch.int64)  # refinement rounds
        self.used = torch.zeros(b, k, dtype=torch.int64)  # proposals (rows) of every kind
        self.ends = torch.zeros(b, k, 2, dtype=torch.bool)  # the evidence / lower rows spent
        self.upper = torch.full((b, k), math.inf, dtype=torch.float64)
        self.up_hits = torch.zeros(b, k, dtype=torch.int64)
        self.up_n = torch.zeros(b, k, dtype=torch.int64)
        self.up_chain = torch.zeros(b, k, dtype=torch.int64)
        self.last_r = torch.zeros(b, k, dtype=torch.float64)
        self.last_chain = torch.zeros(b, k, dtype=torch.int64)
        self.evidence = torch.zeros((b, k, *shape), dtype=inp.x.dtype, device=inp.x.device)
        self.last = torch.zeros_like(self.evidence)
        self.z0 = probit(inp.clean_hits.to(torch.float64) / inp.clean_n.clamp_min(1), inp.clean_n)

    @property
    def active(self) -> torch.Tensor:
        """``[B, K]`` the (point, r) still searching."""
        return self.status < DONE

    def append(self, pb: torch.Tensor, radii: torch.Tensor, dec: Decisions) -> None:
        """Record rows (point ``pb``, radius) with their counts; rows of one point must be consecutive."""
        first = torch.ones_like(pb, dtype=torch.bool)
        first[1:] = pb[1:] != pb[:-1]
        start = torch.arange(pb.shape[0])[first].repeat_interleave(torch.bincount(pb)[pb[first]])
        pos = self.count[pb] + torch.arange(pb.shape[0]) - start
        self.ev_r[pb, pos] = radii
        self.ev_h[pb, pos], self.ev_n[pb, pos], self.ev_dec[pb, pos] = dec.hits, dec.samples, dec.decision
        self.count += torch.bincount(pb, minlength=self.count.shape[0])


@dataclass
class _Bracket:
    """Per (point, r) ``[B, K]``: the crossing bracket ``a < b`` with probits ``za``, ``zb`` (``b = inf`` before any
    ``p_hat <= 1/2``), the largest decided-robust radius ``lower`` below ``b``, and the point's largest attacked
    radius ``top`` ``[B]``."""

    a: torch.Tensor
    za: torch.Tensor
    b: torch.Tensor
    zb: torch.Tensor
    lower: torch.Tensor
    top: torch.Tensor
    tol: torch.Tensor | None = None  # [B, K] the effective tolerance (:func:`_effective_tol`)


def _bracket(st: _State) -> _Bracket:
    """The brackets of every (point, r) from the recorded rows (module docstring)."""
    b_, m = st.ev_r.shape
    k = st.ev_h.shape[2]
    radius = st.ev_r.unsqueeze(2).expand(b_, m, k)
    valid = (torch.arange(m).unsqueeze(0) < st.count.unsqueeze(1)).unsqueeze(2).expand(b_, m, k)
    p = st.ev_h.to(torch.float64) / st.ev_n.clamp_min(1)
    z = probit(p, st.ev_n)
    hi, jb = torch.where(valid & (p <= 0.5), radius, math.inf).min(dim=1)
    zb = z.gather(1, jb.unsqueeze(1)).squeeze(1)
    above = valid & (p > 0.5) & (radius < hi.unsqueeze(1))
    lo, ja = torch.where(above, radius, -1.0).max(dim=1)
    za = torch.where(lo >= 0, z.gather(1, ja.unsqueeze(1)).squeeze(1), st.z0)
    robust = valid & (st.ev_dec == ROBUST) & (radius < hi.unsqueeze(1)) & (radius < st.upper.unsqueeze(1))
    lower = torch.where(robust, radius, 0.0).max(dim=1).values
    top = torch.where(valid[:, :, 0], st.ev_r, 0.0).max(dim=1).values
    return _Bracket(lo.clamp_min(0.0), za, hi, zb, lower, top)


# --- proposals -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """Fixed per search: growth start and proposal budgets, the probit targets and the tolerance."""

    start: float
    grow: int
    refine: int
    z_grow: float  # growth aims past this probit (the decision flips to broken there)
    z_broken: float  # the evidence row aims here
    z_robust: float  # the lower row aims here
    tol: float
    halving: bool


def _top_two(st: _State) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per point its two largest attacked radii ``R1 >= R2`` and per (point, r) their probits (the clean point at
    radius 0 stands in for a missing second row)."""
    filled = torch.where(torch.isnan(st.ev_r), -math.inf, st.ev_r)
    vals, idx = filled.topk(min(2, filled.shape[1]), dim=1)
    p = st.ev_h.to(torch.float64) / st.ev_n.clamp_min(1)
    z = probit(p, st.ev_n)
    k = z.shape[2]
    z1 = z.gather(1, idx[:, :1].unsqueeze(2).expand(-1, 1, k)).squeeze(1)
    r1 = vals[:, 0].clamp_min(0.0)
    if vals.shape[1] < 2:
        return r1, z1, torch.zeros_like(r1), st.z0
    z2 = z.gather(1, idx[:, 1:2].unsqueeze(2).expand(-1, 1, k)).squeeze(1)
    second = torch.isfinite(vals[:, 1])
    r2 = torch.where(second, vals[:, 1], 0.0)
    return r1, z1, r2, torch.where(second.unsqueeze(1), z2, st.z0)


def _grow_radii(st: _State, caps: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``[B, K]`` the next growth radius of every (point, r): ``start`` first; then the secant of the point's two
    largest attacked radii aimed past ``z_grow`` (``OVERSHOOT``), within ``[R1 + tol, MAX_GROWTH R1]`` (``2 R1`` where
    the secant is unusable, and always with ``halving``); raised to ``cap / 2**(rounds left - 1)``; capped."""
    r1, z1, r2, z2 = _top_two(st)
    r1k, r2k = r1.unsqueeze(1).expand_as(z1), r2.unsqueeze(1).expand_as(z1)
    dr, dz = r1k - r2k, z1 - z2
    ok = (dr > 0) & (dz < -MIN_DZ) & (not plan.halving)
    root = r1k + (plan.z_grow - z1) * dr / torch.where(ok, dz, -torch.ones_like(dz))
    t = torch.where(ok & (root > r1k), r1k + OVERSHOOT * (root - r1k) + plan.tol, 2 * r1k)
    t = torch.minimum(torch.maximum(t, r1k + plan.tol), MAX_GROWTH * r1k)
    t = torch.where(r1k > 0, t, torch.full_like(t, plan.start))
    cap = caps.unsqueeze(1).expand_as(t)
    left = (plan.grow - st.grown).to(torch.float64)
    return torch.minimum(torch.maximum(t, cap / torch.pow(2.0, (left - 1).clamp_min(0))), cap)


def _refine_radii(st: _State, br: _Bracket, plan: _Plan) -> torch.Tensor:
    """``[B, K]`` the next refinement radius: regula falsi in probit ``t0 = a + za / (za - zb) (b - a)``, kept
    ``w / 8`` inside the bracket; where ``t0`` lies within the (effective) ``tol`` of an end, ``0.95 tol`` inside
    from that end (either outcome then closes the bracket or moves that end by almost ``tol``: regula falsi's
    one-sided creep is cut short); the midpoint with ``halving`` or once the rounds left only suffice for halving."""
    w, tol = br.b - br.a, br.tol
    frac = torch.where(br.za > br.zb, br.za / (br.za - br.zb).clamp_min(1e-300), torch.full_like(w, 0.5))
    t0 = br.a + frac.clamp(0.0, 1.0) * w
    t = torch.minimum(torch.maximum(t0, br.a + w / 8), br.b - w / 8)
    near_a, near_b = t0 - br.a < tol, br.b - t0 < tol
    t = torch.where(near_a & ~near_b, br.a + 0.95 * tol, torch.where(near_b & ~near_a, br.b - 0.95 * tol, t))
    t = torch.minimum(torch.maximum(t, br.a + 0.05 * w), br.b - 0.05 * w)
    need = torch.ceil(torch.log2((w / tol).clamp_min(1.0)) - 1e-9)
    halve = (need >= (plan.refine - st.refined).to(torch.float64)) | plan.halving
    return torch.where(halve, br.a + 0.5 * w, t)


def _line(st: _State, br: _Bracket) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (point, r) a weighted least-squares line ``z = alpha + beta R`` through the rows whose ``p_hat`` lies in
    (0.02, 0.98) (weights: their samples); the bracket ends' secant where fewer than two such rows exist."""
    b_, m = st.ev_r.shape
    radius = st.ev_r.unsqueeze(2).expand(b_, m, st.ev_h.shape[2])
    valid = (torch.arange(m).unsqueeze(0) < st.count.unsqueeze(1)).unsqueeze(2)
    p = st.ev_h.to(torch.float64) / st.ev_n.clamp_min(1)
    w = torch.where(valid & (p > 0.02) & (p < 0.98), st.ev_n.to(torch.float64), 0.0)
    r, z = torch.nan_to_num(radius), probit(p, st.ev_n)
    sw, sr, sz = w.sum(1), (w * r).sum(1), (w * z).sum(1)
    srr, srz = (w * r * r).sum(1), (w * r * z).sum(1)
    det = sw * srr - sr * sr
    rows = (w > 0).sum(1)
    ok = (rows >= 2) & (det > 1e-12 * sw * sw)
    beta = torch.where(ok, (sw * srz - sr * sz) / torch.where(ok, det, 1.0), 0.0)
    alpha = torch.where(ok, (sz - beta * sr) / sw.clamp_min(1e-300), 0.0)
    secant = (br.zb - br.za) / (br.b - br.a).clamp_min(1e-300)
    use_secant = ~ok & torch.isfinite(br.b) & (br.b > br.a)
    beta = torch.where(use_secant, secant, beta)
    alpha = torch.where(use_secant, br.za - secant * br.a, alpha)
    return alpha, beta


def _effective_tol(st: _State, br: _Bracket, plan: _Plan, samples: int) -> _Bracket:
    """``br`` with its effective tolerance: ``max(tol, NOISE * se)``, ``se = sqrt(pi / 2) / (sqrt(S) |beta|)`` the
    Monte-Carlo standard error of the crossing (``p_hat`` has standard error ``1 / (2 sqrt(S))`` at 1/2, the probit
    line's slope is ``beta``, :func:`_line`). A narrower bracket would only chase the noise of S samples; as S grows
    the effective tolerance falls to ``tol``."""
    _, beta = _line(st, br)
    se = math.sqrt(math.pi / 2) / (math.sqrt(samples) * beta.abs().clamp_min(1e-12))
    tol = torch.where(beta < 0, torch.maximum(torch.full_like(se, plan.tol), NOISE * se), plan.tol)
    return dataclasses.replace(br, tol=tol)


def _ends_radii(st: _State, br: _Bracket, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, K]`` the evidence row (aimed at ``z_broken`` inside ``(b + tol/2, upper - tol/2)``) and the lower row
    (aimed at ``z_robust`` inside ``(lower + tol/2, a - tol/2)``); NaN where not needed, spent or not placeable."""
    alpha, beta = _line(st, br)
    slope = beta < 0
    half = 0.5 * plan.tol
    root_b = (plan.z_broken - alpha) / torch.where(slope, beta, -1.0)
    root_r = (plan.z_robust - alpha) / torch.where(slope, beta, -1.0)
    ev_lo, ev_hi = br.b + half, st.upper - half
    evid = slope & torch.isfinite(st.upper) & ~st.ends[:, :, 0] & (ev_hi > ev_lo)
    t_ev = torch.where(evid, torch.minimum(torch.maximum(root_b, ev_lo), ev_hi), math.nan)
    lo_lo, lo_hi = br.lower + half, br.a - half
    low = slope & ~st.ends[:, :, 1] & (lo_hi > lo_lo)
    t_lo = torch.where(low, torch.minimum(torch.maximum(root_r, lo_lo), lo_hi), math.nan)
    return t_ev, t_lo


def _proposals(st: _State, br: _Bracket, caps: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, ...]:
    """Every active (point, r)'s proposed radii this round, counted against its budget.

    Returns:
        ``(points, radii, sources)``: CPU tensors, one entry per proposal, sorted by point then radius.
    """
    grow, refine, ends = st.status == GROW, st.status == REFINE, st.status == ENDS
    t_grow = _grow_radii(st, caps, plan)
    t_ref = _refine_radii(st, br, plan)
    t_ev, t_lo = _ends_radii(st, br, plan)
    st.ends[:, :, 0] |= ends
    st.ends[:, :, 1] |= ends
    candidates = [
        torch.where(grow, t_grow, math.nan),
        torch.where(refine, t_ref, math.nan),
        torch.where(ends, t_ev, math.nan),
        torch.where(ends, t_lo, math.nan),
    ]
    table = torch.stack(candidates, dim=2)  # [B, K, 4]
    has = torch.isfinite(table)
    st.status[ends & ~has.any(dim=2)] = DONE
    st.grown += grow.to(torch.int64)
    st.refined += refine.to(torch.int64)
    st.used += has.sum(dim=2)
    b, k, _ = has.nonzero(as_tuple=True)
    radii = table[has]
    order = torch.argsort(b.to(torch.float64) * (1.0 + float(caps.max()) * 4) + radii)
    return b[order], radii[order], k[order]


def _merge(points: torch.Tensor, radii: torch.Tensor, sources: torch.Tensor, k: int, tol: float):
    """Proposals of one point closer than ``tol / 4`` to the previous kept one (sorted) become one row: a greedy
    pass over each point's sorted radii, vectorised over points (at most ``4`` proposals per point and round, so a
    few passes).

    Returns:
        ``(points [N], radii [N], proposers [N, K] bool)``.
    """
    n = points.numel()
    keep = torch.ones(n, dtype=torch.bool)
    if n > 1:
        same_point = torch.zeros(n, dtype=torch.bool)
        same_point[1:] = points[1:] == points[:-1]
        anchor = radii.clone()  # the radius of the kept row each proposal would join
        for _ in range(n):  # converges in (proposals per point) passes; stops when nothing changes
            prev = torch.cat([anchor[:1], anchor[:-1]])
            join = same_point & (radii - prev < tol / 4)
            new_anchor = torch.where(join, prev, radii)
            if torch.equal(new_anchor, anchor):
                break
            anchor = new_anchor
        keep = ~(same_point & (radii - torch.cat([anchor[:1], anchor[:-1]]) < tol / 4))
    row = torch.cumsum(keep.to(torch.int64), 0) - 1
    proposers = torch.zeros(int(keep.sum()), k, dtype=torch.bool)
    proposers[row, sources] = True
    return points[keep], radii[keep], proposers


# --- attacking and deciding rows -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Attacks:
    """The sphere attacks of a search: ``cold`` (``steps`` steps from random starts), ``warm`` (``warm_steps``),
    ``grow`` (``GROW_FRACTION`` of it: warm starts scaled up) and ``near`` (``NEAR_FRACTION``: converged warm starts
    rescaled by at most ``NEAR_RATIO``)."""

    cold: MaxDamageAttack
    warm: MaxDamageAttack
    grow: MaxDamageAttack
    near: MaxDamageAttack
    rows: int  # rows per attack call (from the memory budget)

    @classmethod
    def build(cls, inp: SearchInputs, box: Box | None) -> _Attacks:
        o = inp.options

        def make(steps: int) -> MaxDamageAttack:
            return MaxDamageAttack(
                inp.model, 1.0, norm="L2", constraint="sphere", mode=o.mode, steps=steps, restarts=o.restarts,
                num_noise_samples=o.num_noise_samples, box=box, optimizer=o.optimizer, seed=inp.seed,
            )  # fmt: skip

        warm = o.warm
        return cls(
            make(o.steps), make(warm), make(max(3, round(warm * GROW_FRACTION))),
            make(max(3, round(warm * NEAR_FRACTION))), _attack_rows(inp),
        )  # fmt: skip


def _attack_rows(inp: SearchInputs) -> int:
    """Attack rows per call: a row's forward and backward keep about three times the activations of one encode and
    ``num_noise_samples`` decodes."""
    from vaefast._memory import activation_bytes, rows_that_fit

    enc = activation_bytes(inp.model.encode, inp.x[:1])
    dec = activation_bytes(inp.model.decode, inp.enc.mu[:1])
    return rows_that_fit(3 * (enc + inp.options.num_noise_samples * dec), inp.sampler.budget, "attacking one point")


def _warm_starts(st: _State, points: torch.Tensor, radii: torch.Tensor):
    """Per row the stored perturbation nearest in radius (``|log R / R0|``) among its point's latest and evidence
    perturbations: ``(which [N] index into the 2K candidates or -1, its radius, its chain of steps)``."""
    cand_r = torch.cat([st.last_r, torch.where(torch.isfinite(st.upper), st.upper, 0.0)], 1)[points]
    cand_chain = torch.cat([st.last_chain, st.up_chain], 1)[points]
    score = torch.where(cand_r > 0, (radii.unsqueeze(1) / cand_r.clamp_min(1e-300)).log().abs(), math.inf)
    best, which = score.min(dim=1)
    which = torch.where(torch.isfinite(best), which, -1)
    pick = which.clamp_min(0).unsqueeze(1)
    return which, cand_r.gather(1, pick).squeeze(1), cand_chain.gather(1, pick).squeeze(1)


def _attack(inp: SearchInputs, st: _State, attacks: _Attacks, points: torch.Tensor, radii: torch.Tensor):
    """Attack every row (one batched call per tier and memory chunk).

    Returns:
        ``(delta [N, *input_shape] on the device, chain [N])``: the perturbations and the optimisation steps along
        their chains of warm starts.
    """
    o = inp.options
    which, r0, chain0 = _warm_starts(st, points, radii)
    warm = (which >= 0) & o.warm_start & (o.optimizer != "lbfgsb")
    ratio = torch.maximum(radii / r0.clamp_min(1e-300), r0 / radii)
    near = warm & (chain0 >= o.steps) & (ratio <= NEAR_RATIO)
    up = warm & ~near & (radii > r0)
    tiers = [(attacks.near, near), (attacks.grow, up), (attacks.warm, warm & ~near & ~up), (attacks.cold, ~warm)]
    dev = inp.x.device
    delta = torch.empty((points.shape[0], *inp.x.shape[1:]), dtype=inp.x.dtype, device=dev)
    chain = torch.where(warm, chain0, 0)
    cands = torch.cat([st.last, st.evidence], 1)
    for attack, mask in tiers:
        rows = mask.nonzero().squeeze(1)
        chain[rows] += attack.cfg.steps
        for c0 in range(0, rows.numel(), attacks.rows):
            sel = rows[c0 : c0 + attacks.rows]
            start = None if attack is attacks.cold else which[sel]
            delta[sel.to(dev)] = _attack_chunk(inp, attack, points[sel], radii[sel], start, cands)
    return delta, chain


def _attack_chunk(inp, attack, points, radii, which, cands) -> torch.Tensor:
    """One attack call on rows ``points`` at ``radii``, warm-started from ``cands[point, which]`` rescaled to the
    radii (``which=None``: random starts)."""
    dev = inp.x.device
    pd = points.to(dev)
    init = None
    if which is not None:
        start = cands[pd, which.to(dev)]
        flat = start.reshape(start.shape[0], -1).to(torch.float64)
        scale = radii.to(dev) / torch.linalg.vector_norm(flat, dim=1).clamp_min(1e-30)
        init = (flat * scale.unsqueeze(1)).to(inp.x.dtype).view_as(start)
    offsets = None if inp.offsets is None else (inp.offsets[0][pd], inp.offsets[1][pd])
    result = attack.run_validated(
        inp.x[pd], radii.to(dev), inp.ids[points], init=init, offsets=offsets, reference=inp.enc.center[pd]
    )
    return result.delta


def _decide_rows(inp: SearchInputs, st: _State, points: torch.Tensor, delta: torch.Tensor, rule: Rule) -> Decisions:
    """Decide every row for every radius r (required: the point's radii still searching). Early stops by what each
    radius needs: growth a break (futility), refinement the side of 1/2 (the estimate's bracket), the ends rows a
    decision (none)."""
    dev = inp.x.device
    pd = points.to(dev)
    enc = encode(inp.model, inp.x[pd], delta, center=inp.enc.center[pd])
    radii = inp.radii.to(dev)
    status = st.status[points]
    stops = torch.where(status == GROW, FUTILE, torch.where(status == REFINE, SIDE, DECIDE)).to(torch.int8)
    return decide(inp.sampler, enc, inp.ids.to(dev)[pd], radii, rule, inp.seed, st.active[points], stops)


# --- the rounds ------------------------------------------------------------------------------------------------------
def _update(st: _State, points, radii, proposers, delta, chain, dec: Decisions) -> None:
    """Record a round: the rows' counts, new evidence (a radius decided broken below a (point, r)'s ``upper``) and
    every proposer's latest perturbation."""
    st.append(points, radii, dec)
    dev = delta.device
    broken = (dec.decision == BROKEN) & (radii.unsqueeze(1) < st.upper[points])
    for k in range(broken.shape[1]):
        rows = broken[:, k].nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        # the smallest broken radius per point wins (rows of a point are sorted by radius: its first broken row)
        pts = points[rows]
        first = torch.ones_like(pts, dtype=torch.bool)
        first[1:] = pts[1:] != pts[:-1]
        rows, pts = rows[first], pts[first]
        st.upper[pts, k] = radii[rows]
        st.up_hits[pts, k], st.up_n[pts, k] = dec.hits[rows, k], dec.samples[rows, k]
        st.up_chain[pts, k] = chain[rows]
        st.evidence[pts.to(dev), k] = delta[rows.to(dev)]
    for k in range(proposers.shape[1]):
        rows = proposers[:, k].nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        pts = points[rows]
        last = torch.ones_like(pts, dtype=torch.bool)
        last[:-1] = pts[1:] != pts[:-1]  # one row per point: its last (largest radius)
        rows, pts = rows[last], pts[last]
        st.last_r[pts, k], st.last_chain[pts, k] = radii[rows], chain[rows]
        st.last[pts.to(dev), k] = delta[rows.to(dev)]


def _advance(st: _State, br: _Bracket, caps: torch.Tensor, plan: _Plan) -> None:
    """Status changes: growth ends at a decided break (or at the cap: refine if some ``p_hat <= 1/2`` was seen, else
    done, unbracketed); refinement ends when the bracket is ``<= tol`` wide or its rounds are spent; a reopened
    bracket (the ends rows moved it) refines again while rounds are left."""
    reached = (br.top >= caps * (1 - 1e-12)).unsqueeze(1)
    grow = st.status == GROW
    broke = torch.isfinite(st.upper)
    stop_growing = grow & (broke | reached | (st.grown >= plan.grow))
    st.status[stop_growing] = torch.where(torch.isfinite(br.b), REFINE, DONE)[stop_growing].to(torch.int8)
    closed = (br.b - br.a <= br.tol) | (st.refined >= plan.refine)
    st.status[(st.status == REFINE) & closed] = ENDS
    st.status[(st.status == ENDS) & ~closed] = REFINE


def _bisection(inp: SearchInputs, st: _State, plan: _Plan, rule: Rule, attacks: _Attacks, bar) -> None:
    """The rounds of ``method="bisection"`` until no (point, r) is active."""
    caps = inp.caps
    while True:
        br = _effective_tol(st, _bracket(st), plan, inp.options.num_samples)
        _advance(st, br, caps, plan)
        if not bool(st.active.any()):
            return
        points, radii, sources = _proposals(st, br, caps, plan)
        if points.numel() == 0:
            continue
        points, radii, proposers = _merge(points, radii, sources, st.status.shape[1], plan.tol)
        delta, chain = _attack(inp, st, attacks, points, radii)
        dec = _decide_rows(inp, st, points, delta, rule)
        _update(st, points, radii, proposers, delta, chain, dec)
        if bar is not None:
            bar.update(1)


def _grid(inp: SearchInputs, st: _State, granularity: float, rule: Rule, attacks: _Attacks, bar) -> torch.Tensor:
    """The original protocol: radii ``cap - j granularity`` from the top; per (point, r) the first radius not decided
    broken is its margin (0 if none). Returns those margins ``[B, K]``."""
    margin = torch.zeros_like(st.upper)
    steps = int(math.floor(float(inp.caps.max()) / granularity + 1e-9))
    for j in range(steps + 1):
        radii_all = inp.caps - j * granularity
        points = (st.active.any(dim=1) & (radii_all > granularity * 1e-6)).nonzero().squeeze(1)
        if points.numel() == 0:
            break
        radii = radii_all[points]
        proposers = st.active[points]
        delta, chain = _attack(inp, st, _all_cold(attacks), points, radii)
        dec = _decide_rows(inp, st, points, delta, rule)
        _update(st, points, radii, proposers, delta, chain, dec)
        held = proposers & (dec.decision != BROKEN)
        margin[points] = torch.where(held, radii.unsqueeze(1), margin[points])
        st.status[points] = torch.where(held, DONE, st.status[points]).to(torch.int8)
        if bar is not None:
            bar.update(1)
    st.status[st.active] = DONE
    return margin


def _all_cold(attacks: _Attacks) -> _Attacks:
    """The grid's attacks: every radius from random starts (the protocol attacks each radius afresh)."""
    return _Attacks(attacks.cold, attacks.cold, attacks.cold, attacks.cold, attacks.rows)


# --- the search ------------------------------------------------------------------------------------------------------
def start_radius(options: MarginOptions, caps: torch.Tensor) -> float:
    """The first growth radius: ``options.start_radius`` or ``max(2 tol, min(1/4, min(caps) / 4))``."""
    if options.start_radius is not None:
        return options.start_radius
    return max(2 * options.tol, min(0.25, float(caps.min()) / 4))


def _rule_and_plan(inp: SearchInputs, k: int) -> tuple[Rule, _Plan, int]:
    """The decision rule at the search's per-decision level, the plan, and the most rows a point can have."""
    o = inp.options
    start = start_radius(o, inp.caps)
    grow, refine, rows = budget(o, inp.caps, start, k)
    if o.decision == "fixed":
        rule = Rule.fixed(o.num_samples)
    else:
        rule = Rule.sequential(o.num_samples, (1.0 - o.confidence) / rows, FUTILITY)
    p_broken, p_robust = rule.decidable()
    n = torch.tensor(o.num_samples)
    half = 0.5 / o.num_samples

    def z(p: float) -> float:
        return float(probit(torch.tensor(min(max(p, half), 1 - half), dtype=torch.float64), n))

    z_grow = z(p_broken + half) if p_broken >= 0 else 0.0  # between the last count decided broken and the next
    plan = _Plan(
        start, grow, refine, z_grow, z(p_broken) - AIM, z(min(p_robust, 1.0)) + AIM, o.tol, o.strategy == "halving"
    )
    return rule, plan, rows


def search(inp: SearchInputs, progress: bool = False, box: Box | None = None) -> SearchResult:
    """Run the margin search (module docstring) on validated inputs.

    Args:
        inp: the inputs.
        progress: a progress bar over rounds.
        box: the data box (for the attack objects; the offsets in ``inp`` constrain the perturbations).

    Returns:
        The :class:`SearchResult`.
    """
    k = inp.radii.shape[0]
    rule, plan, rows = _rule_and_plan(inp, k)
    st = _State(inp, rows + 1)
    attacks = _Attacks.build(inp, box)
    bar = None
    if progress:
        from vaefast._progress import progress_bar

        bar = progress_bar(desc=f"margin ({inp.options.method})", unit="round")
    try:
        if inp.options.method == "grid":
            grid_margin = _grid(inp, st, inp.options.granularity, rule, attacks, bar)
        else:
            _bisection(inp, st, plan, rule, attacks, bar)
            grid_margin = None
    finally:
        if bar is not None:
            bar.close()
    inp.sampler.check_finite()
    return _finish(inp, st, grid_margin)


def _estimate(br: _Bracket, caps: torch.Tensor) -> torch.Tensor:
    """The crossing of ``p_hat = 1/2``: linear in probit between the bracket ends; the cap where no ``p_hat <= 1/2``
    was seen."""
    w = br.b - br.a
    frac = torch.where(br.za > br.zb, br.za / (br.za - br.zb).clamp_min(1e-300), torch.full_like(w, 0.5))
    crossing = br.a + frac.clamp(0.0, 1.0) * torch.where(torch.isfinite(w), w, 0.0)
    return torch.where(torch.isfinite(br.b), crossing, caps.unsqueeze(1).expand_as(crossing))


def _finish(inp: SearchInputs, st: _State, grid_margin: torch.Tensor | None) -> SearchResult:
    """The three numbers of every (point, r) (module docstring): clean not robust -> all 0, the clean counts as the
    evidence; clean undecided -> margin and upper NaN, lower 0."""
    br = _bracket(st)
    robust, broken = inp.clean == ROBUST, inp.clean == BROKEN
    undecided = inp.clean == UNDECIDED
    margin = _estimate(br, inp.caps) if grid_margin is None else grid_margin
    found = torch.isfinite(st.upper) & robust
    nan = torch.full_like(margin, math.nan)
    margin = torch.where(robust, margin, torch.where(undecided, nan, 0.0))
    upper = torch.where(found, st.upper, torch.where(broken, 0.0, nan))
    lower = torch.where(robust, br.lower, 0.0)
    hits = torch.where(found, st.up_hits, torch.where(broken, inp.clean_hits, 0))
    samples = torch.where(found, st.up_n, torch.where(broken, inp.clean_n, 0))
    keep = found.to(st.evidence.dtype).to(st.evidence.device).view(*found.shape, *[1] * (st.evidence.dim() - 2))
    evaluations = _evaluations(st, inp)
    return SearchResult(margin, lower, upper, found | broken, st.evidence * keep, hits, samples, evaluations, st.count)


def _evaluations(st: _State, inp: SearchInputs) -> list[list[list[tuple[float, float]]]]:
    """``[B][K]`` lists of ``(radius, p_hat)``: the clean point, then the point's rows in the order attacked."""
    p = (st.ev_h.to(torch.float64) / st.ev_n.clamp_min(1)).tolist()
    radii = st.ev_r.tolist()
    p0 = (inp.clean_hits.to(torch.float64) / inp.clean_n.clamp_min(1)).tolist()
    counts = st.count.tolist()
    k = inp.clean.shape[1]
    return [
        [[(0.0, p0[b][j])] + [(radii[b][i], p[b][i][j]) for i in range(counts[b])] for j in range(k)]
        for b in range(len(counts))
    ]
