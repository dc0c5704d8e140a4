"""Exact Euclidean projections onto norm balls / spheres intersected with a box, batched over points.

All functions work on flattened perturbations ``v[B, D]`` with per-point radii ``eps[B]`` and optional
per-coordinate bounds ``lo[B, D] <= 0 <= hi[B, D]`` on the perturbation itself (for a data box
``[a, b]`` and a clean input ``x`` in it: ``lo = a - x``, ``hi = b - x``). Arithmetic is in float64.

L2 ball ∩ box (convex). KKT of ``min ||d - v||^2 s.t. ||d|| <= eps, lo <= d <= hi`` gives
``d = clamp(t v, lo, hi)`` with ``t = 1 / (1 + lambda) in (0, 1]``; ``||clamp(t v, lo, hi)||`` is continuous and
non-decreasing in t, so t is the root of ``||clamp(t v, lo, hi)|| = eps`` (or t = 1 when ``clamp(v)`` is
already inside the ball). The root is found exactly: coordinate i saturates at ``s_i = bound_i / v_i``; between
sorted breakpoints ``||clamp(t v)||^2 = P_k + t^2 Q_k`` (``P_k``: squared bounds of the saturated coordinates,
``Q_k``: squared entries of the free ones), a quadratic solved in closed form.

L2 sphere ∩ box (non-convex). ``||d - v||^2 = eps^2 - 2<d, v> + ||v||^2`` on the sphere, so the projection
maximises ``<d, v>`` over the sphere ∩ box. The maximiser of ``<d, v>`` over ball ∩ box is again
``clamp(t v, lo, hi)`` (now any ``t > 0``); when some t reaches norm eps that point lies on the sphere and is
the exact projection. Otherwise the free-direction corner ``clamp(inf * v)`` is too short: coordinates with
``v_i = 0`` (which do not change ``<d, v>``) are then pushed toward their farther bound (still exact), and if even
that is too short, coordinates are flipped to their opposite (farther) bound greedily by objective lost per unit
of squared norm gained, the last one fractionally (the exact optimum of the relaxation in squared-norm
variables; near-exact). Requires ``eps <= ||max(|lo|, |hi|)||`` (the sphere must meet the box).

L-inf: ``clamp(v, max(lo, -eps), min(hi, eps))`` is the exact projection onto ball ∩ box; for the sphere
(``||d||_inf = eps``) the one coordinate whose move to ``±eps`` costs least is additionally pinned (exact).
"""

from __future__ import annotations

import torch

_TINY = 1e-300


def _as64(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(torch.float64) for t in ts]


def _ray_scale(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Smallest ``t >= 0`` with ``||clamp(t v, lo, hi)|| = eps`` per row (``inf`` where unreachable)."""
    bound = torch.where(v > 0, hi, lo)
    nz = v != 0
    s = torch.where(nz, bound / torch.where(nz, v, torch.ones_like(v)), torch.full_like(v, float("inf")))
    s = s.clamp_min(0.0)
    order = torch.argsort(s, dim=1)
    s_sorted = torch.gather(s, 1, order)
    b2 = torch.gather(torch.where(nz, bound.pow(2), torch.zeros_like(v)), 1, order)
    w = torch.gather(v.pow(2), 1, order)
    zeros = torch.zeros_like(eps).unsqueeze(1)
    # segment k (k = 0..D): coordinates 1..k saturated, t in [s_k, s_{k+1}], s_0 = 0
    p = torch.cat([zeros, b2.cumsum(1)], 1)  # P_k
    q = torch.cat([w.flip(1).cumsum(1).flip(1), zeros], 1)  # Q_k
    left = torch.cat([zeros, s_sorted], 1)
    right = torch.cat([s_sorted, torch.full_like(zeros, float("inf"))], 1)
    finite_left = torch.isfinite(left)
    f_left = torch.where(finite_left, p + torch.where(finite_left, left, 0.0).pow(2) * q, torch.inf)
    e2 = eps.pow(2).unsqueeze(1)
    k = (f_left <= e2).sum(1, keepdim=True) - 1  # f_left is non-decreasing in k
    pk, qk = p.gather(1, k), q.gather(1, k)
    t = torch.where(qk > 0, torch.sqrt((e2 - pk).clamp_min(0.0) / qk.clamp_min(_TINY)), torch.full_like(qk, torch.inf))
    t = torch.minimum(torch.maximum(t, left.gather(1, k)), right.gather(1, k))
    return t.squeeze(1)


def project_l2_ball(
    v: torch.Tensor, eps: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact Euclidean projection of each row onto the L2 ball intersected with a box.

    Args:
        v: ``[B, D]`` points to project.
        eps: ``[B]`` radii.
        lo, hi: ``[B, D]`` bounds with ``lo <= 0 <= hi``, or None (no box).

    Returns:
        ``argmin_d ||d - v_b||_2`` s.t. ``||d||_2 <= eps_b``, ``lo_b <= d <= hi_b``: ``clamp(t v, lo, hi)`` with the
        largest ``t in [0, 1]`` of norm ``<= eps`` (module docstring); ``[B, D]`` in v's dtype.
    """
    dtype = v.dtype
    v, eps, lo, hi = _as64(v, eps, lo, hi)
    simple = v * (eps / torch.linalg.vector_norm(v, dim=1).clamp_min(_TINY)).clamp(max=1.0).unsqueeze(1)
    if lo is None:
        return simple.to(dtype)
    inside = ((simple >= lo) & (simple <= hi)).all(1)  # the ball's projection already in the box: exact
    if bool(inside.all()):
        return simple.to(dtype)
    out = simple
    rest = ~inside
    v, eps, lo, hi = v[rest], eps[rest], lo[rest], hi[rest]
    t = _ray_scale(v, lo, hi, eps).clamp(max=1.0)
    out[rest] = torch.minimum(torch.maximum(t.unsqueeze(1) * v, lo), hi)
    return out.to(dtype)


def max_l2_norm(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Largest L2 norm inside a box, per row.

    Args:
        lo, hi: ``[B, D]`` bounds.

    Returns:
        ``[B]`` float64: ``||max(|lo|, |hi|)||_2`` (the farthest corner).
    """
    return torch.linalg.vector_norm(torch.maximum(lo.abs(), hi.abs()).to(torch.float64), dim=1)


def project_l2_sphere(
    v: torch.Tensor, eps: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> torch.Tensor:
    """Projection of each row onto the L2 sphere intersected with a box.

    Args:
        v: ``[B, D]`` points to project.
        eps: ``[B]`` radii, at most the box's largest norm (the sphere must meet the box).
        lo, hi: ``[B, D]`` bounds with ``lo <= 0 <= hi``, or None (no box).

    Returns:
        ``argmin_d ||d - v_b||_2`` s.t. ``||d||_2 = eps_b``, ``lo_b <= d <= hi_b`` (exact where ``clamp(t v)`` reaches
        the sphere, else the greedy near-exact fallback of the module docstring; ``eps v / ||v||`` without a box,
        ``eps / sqrt(D)`` in every coordinate for ``v = 0``); ``[B, D]`` in v's dtype.
    """
    dtype = v.dtype
    v, eps, lo, hi = _as64(v, eps, lo, hi)
    if lo is None:
        n = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        fallback = torch.full_like(v, v.shape[1] ** -0.5)
        u = torch.where(n > 0, v / n.clamp_min(_TINY), fallback)
        return (u * eps.unsqueeze(1)).to(dtype)
    n = torch.linalg.vector_norm(v, dim=1)
    simple = v * (eps / n.clamp_min(_TINY)).unsqueeze(1)
    inside = (n > 0) & ((simple >= lo) & (simple <= hi)).all(1)  # the sphere's projection in the box: exact
    if bool(inside.all()):
        return simple.to(dtype)
    out = simple
    rest = (~inside).nonzero().squeeze(1)
    out[rest] = _project_sphere_box(v[rest], eps[rest], lo[rest], hi[rest])
    return out.to(dtype)


def _project_sphere_box(v: torch.Tensor, eps: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(v)
    t = _ray_scale(v, lo, hi, eps)
    ok = torch.isfinite(t)
    if bool(ok.any()):
        out[ok] = torch.minimum(torch.maximum(t[ok].unsqueeze(1) * v[ok], lo[ok]), hi[ok])
    bad = ~ok
    if bool(bad.any()):
        out[bad] = _sphere_fallback(v[bad], eps[bad], lo[bad], hi[bad])
    return out


def _sphere_fallback(v: torch.Tensor, eps: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Sphere ∩ box projection when ``clamp(t v)`` never reaches norm eps (see module docstring)."""
    same = torch.where(v > 0, hi, lo)  # the bound in v's direction
    opp = torch.where(v > 0, lo, hi)
    far = torch.where(hi >= -lo, hi, lo)  # farther bound, for coordinates with v_i = 0
    zero = v == 0
    d = torch.where(zero, torch.zeros_like(v), same)
    e2 = eps.pow(2)
    base = d.pow(2).sum(1)
    free = torch.where(zero, far.pow(2), torch.zeros_like(v)).sum(1)
    scale = torch.sqrt(((e2 - base) / free.clamp_min(_TINY)).clamp(0.0, 1.0))
    d = torch.where(zero, scale.unsqueeze(1) * far, d)
    deficit = (e2 - d.pow(2).sum(1)).clamp_min(0.0)
    need = deficit > 1e-12 * e2.clamp_min(1.0)
    if not bool(need.any()):
        return d
    # greedy (fractional) flips: gain in squared norm vs loss in <d, v> per coordinate
    gain = torch.where(~zero, opp.pow(2) - same.pow(2), torch.zeros_like(v))
    loss = v.abs() * (same.abs() + opp.abs())
    ratio = torch.where(gain > 0, loss / gain.clamp_min(_TINY), torch.full_like(v, torch.inf))
    order = torch.argsort(ratio, dim=1)
    g_sorted = torch.where(torch.isfinite(ratio), gain, 0.0).gather(1, order)
    cum = g_sorted.cumsum(1)
    before = cum - g_sorted
    full = cum <= deficit.unsqueeze(1)  # flipped completely
    partial = (~full) & (before < deficit.unsqueeze(1)) & (g_sorted > 0)
    flip_full = torch.zeros_like(full).scatter(1, order, full & (g_sorted > 0))
    flip_part = torch.zeros_like(partial).scatter(1, order, partial)
    rest = (deficit.unsqueeze(1) - before).clamp_min(0.0)
    rest_unsorted = torch.zeros_like(v).scatter(1, order, rest)
    mag = torch.sqrt(same.pow(2) + rest_unsorted)
    sign_opp = torch.sign(opp)
    flipped = torch.where(flip_full, opp, d)
    flipped = torch.where(flip_part, sign_opp * torch.minimum(mag, opp.abs()), flipped)
    return torch.where(need.unsqueeze(1), flipped, d)


def project_linf(
    v: torch.Tensor,
    eps: torch.Tensor,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
    sphere: bool = False,
) -> torch.Tensor:
    """Exact Euclidean projection of each row onto the L-inf ball (or sphere) intersected with a box.

    Args:
        v: ``[B, D]`` points to project.
        eps: ``[B]`` radii.
        lo, hi: ``[B, D]`` bounds, or None (no box).
        sphere: project onto ``||d||_inf = eps`` instead of ``<= eps``.

    Returns:
        Ball: ``clamp(v, max(lo, -eps), min(hi, eps))``; sphere: the same with the one coordinate whose move to
        ``+-eps`` costs least pinned there when no coordinate already is; ``[B, D]`` in v's dtype.
    """
    dtype = v.dtype
    v, eps, lo, hi = _as64(v, eps, lo, hi)
    e = eps.unsqueeze(1).expand_as(v)
    low = -e if lo is None else torch.maximum(lo, -e)
    high = e if hi is None else torch.minimum(hi, e)
    p = torch.minimum(torch.maximum(v, low), high)
    if not sphere:
        return p.to(dtype)
    on = (p.abs() >= e * (1 - 1e-12)).any(1)
    base = (p - v).pow(2)
    up_ok = high >= e * (1 - 1e-12)
    dn_ok = low <= -e * (1 - 1e-12)
    cost_up = torch.where(up_ok, (e - v).pow(2) - base, torch.inf)
    cost_dn = torch.where(dn_ok, (-e - v).pow(2) - base, torch.inf)
    cost = torch.minimum(cost_up, cost_dn)
    j = cost.argmin(1, keepdim=True)
    val = torch.where(cost_up.gather(1, j) <= cost_dn.gather(1, j), e.gather(1, j), -e.gather(1, j))
    pinned = p.scatter(1, j, val)
    return torch.where(on.unsqueeze(1), p, pinned).to(dtype)


def project(
    v: torch.Tensor, eps: torch.Tensor, norm: str, constraint: str, lo: torch.Tensor | None, hi: torch.Tensor | None
) -> torch.Tensor:
    """Project perturbations onto their feasible set.

    Args:
        v: ``[B, D]`` perturbations.
        eps: ``[B]`` radii (unused for ``constraint="none"``).
        norm: "L2" or "Linf".
        constraint: "ball" (``||d|| <= eps``), "sphere" (``||d|| = eps``) or "none" (box only).
        lo, hi: ``[B, D]`` box bounds on d, or None.

    Returns:
        ``[B, D]``: the projection onto ``{norm constraint} ∩ {lo <= d <= hi}`` (``clamp(v, lo, hi)`` for "none").
    """
    if constraint == "none":
        if lo is None:
            return v
        return torch.minimum(torch.maximum(v, lo.to(v.dtype)), hi.to(v.dtype))
    if norm == "L2":
        fn = project_l2_sphere if constraint == "sphere" else project_l2_ball
        return fn(v, eps, lo, hi)
    return project_linf(v, eps, lo, hi, sphere=constraint == "sphere")


def max_norm(norm: str, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Largest norm a perturbation inside a box can have, per row (for sphere feasibility).

    Args:
        norm: "L2" or "Linf".
        lo, hi: ``[B, D]`` bounds.

    Returns:
        ``[B]`` float64: ``||max(|lo|, |hi|)||_2`` or ``max_i max(|lo_i|, |hi_i|)``.
    """
    if norm == "L2":
        return max_l2_norm(lo, hi)
    return torch.maximum(lo.abs(), hi.abs()).to(torch.float64).amax(1)
