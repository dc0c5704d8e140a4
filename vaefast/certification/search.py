"""The certified lower bound of ``p_r(x, delta)`` over a ball, and the largest radius it certifies.

With ``q = Phi^-1(p_low)`` and constants valid on the ball of radius R (``||diag(w)(mu(x') - mu(x))|| <= L_w R +
E_w``, ``||log sigma(x') - log sigma(x)|| <= L_s R + E_s``), every ``||delta|| <= R`` has

    ``p_r(x, delta) >= Phi(q - (L_w R + E_w)) - sqrt(1 - exp(-(L_s R + E_s)^2 / 2))``

(:mod:`vaefast.certification` derives it). R is certified when this exceeds 1/2. The bound decreases in R for fixed
constants, so with global constants the largest R is found by bisection (48 halvings, float64). With local
constants (which grow with R) a bracketing fixed-point search (:func:`local_radii`) evaluates one ball per point and
radius per round (after a grid of balls shared by a point's radii when it has several); the returned radius is
always one that was verified.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["R_MAX", "certified_p", "global_radii", "local_radii"]

R_MAX = 1e6  # the largest radius reported (a constant encoder is certified everywhere)
TV_LIMIT = math.sqrt(2 * math.log(4 / 3))  # t with sqrt(1 - exp(-t^2/2)) = 1/2: no radius beyond t / L_s
ROUNDS = 4  # balls per point and radius of the local search (one radius per point)
GRID = 6  # with several radii per point: balls per point shared by all of them in a first round
SHARED_ROUNDS = 1  # then balls per point and radius
STEP = 0.25  # the next radius tried, as a fraction of the bracket above the verified one
RTOL = 1e-2  # the search stops once every bracket is this narrow (relative)
BISECTIONS = 48  # halvings of the global search (relative precision 2^-48 of the bracket)

Constants = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (L_w, E_w, L_s, E_s)


def certified_p(q: torch.Tensor, constants: Constants, radius: torch.Tensor) -> torch.Tensor:
    """The certified lower bound of ``p_r`` over the ball (module docstring), elementwise (broadcast)."""
    lw, ew, ls, es = constants
    t = ls * radius + es
    return torch.special.ndtr(q - (lw * radius + ew)) - torch.sqrt(-torch.expm1(-(t * t) / 2))


def upper_radius(q: torch.Tensor, lw: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
    """A radius no certificate with these constants (or larger ones) reaches: ``min(q / L_w, TV_LIMIT / L_s)``."""
    big = torch.full_like(q, R_MAX)
    mean = torch.where(lw > 0, q.clamp_min(0) / lw.clamp_min(1e-300), big)
    scale = torch.where(ls > 0, TV_LIMIT / ls.clamp_min(1e-300), big)
    return torch.minimum(torch.minimum(mean, scale), big)


def global_radii(q: torch.Tensor, constants: Constants) -> torch.Tensor:
    """The largest certified radius with fixed constants, by bisection.

    Args:
        q: ``[B, K]`` ``Phi^-1(p_low)``.
        constants: ``(L_w, E_w, L_s, E_s)`` broadcastable to ``[B, K]``.

    Returns:
        ``[B, K]`` float64 (0 where even R = 0 is not certified).
    """
    constants = tuple(torch.as_tensor(c, dtype=torch.float64, device=q.device).expand_as(q) for c in constants)
    lo = torch.zeros_like(q)
    hi = upper_radius(q, constants[0], constants[2])
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        good = certified_p(q, constants, mid) > 0.5
        lo, hi = torch.where(good, mid, lo), torch.where(good, hi, mid)
    return torch.where(certified_p(q, constants, lo) > 0.5, lo, torch.zeros_like(lo))


def _shared_round(q: torch.Tensor, lo: torch.Tensor, best: list, hi: torch.Tensor, local) -> tuple:
    """``GRID`` balls per point, geometric up to its largest ``hi``, shared by its K columns: each column keeps the
    largest radius a grid ball verifies (the ball's radius if its constants certify it, else their inner root)."""
    b, k = q.shape
    top = hi.amax(1)
    floor = torch.maximum(lo.amin(1), top * 1e-3).clamp_max(top)
    steps = torch.arange(1, GRID + 1, dtype=q.dtype, device=q.device) / GRID
    grid = floor[:, None] * (top / floor.clamp_min(1e-300))[:, None] ** steps  # [B, G]
    constants = tuple(c[:, None, :].expand(b, k, GRID) for c in local(grid))
    radius = grid[:, None, :].expand(b, k, GRID)
    qe = q[:, :, None].expand(b, k, GRID)
    accepted = certified_p(qe, constants, radius) > 0.5
    found = torch.where(accepted, radius, torch.minimum(global_radii(qe, constants), radius))
    pick = found.argmax(-1, keepdim=True)
    value = found.gather(-1, pick)[..., 0]
    better = value > lo
    lo = torch.where(better, value, lo)
    best = [torch.where(better, c.gather(-1, pick)[..., 0], old) for c, old in zip(constants, best, strict=True)]
    rejected = ~accepted & (radius > lo[..., None])
    hi = torch.minimum(hi, torch.where(rejected, radius, torch.full_like(radius, math.inf)).amin(-1))
    return lo, best, torch.maximum(hi, lo)


def local_radii(
    q: torch.Tensor, start: torch.Tensor, start_constants: Constants, hi: torch.Tensor,
    local: Callable[[torch.Tensor], Constants],
) -> tuple[torch.Tensor, Constants]:  # fmt: skip
    """The largest radius verified with constants over its own ball.

    ``lo`` is always verified, ``hi`` never exceeded. With K > 1 columns a first round evaluates ``GRID`` balls per
    point shared by them (:func:`_shared_round`); then each round evaluates one ball per point and column, of
    radius ``c`` in ``(lo, hi]``: if its constants certify ``c``, ``lo = c``; else ``hi = c``, and the largest radius
    they certify, ``c' < c``, is verified too (constants valid on the ball of radius c hold on the smaller one):
    ``lo = max(lo, c')``. The next ``c`` is ``lo + STEP (hi - lo)``.

    Args:
        q: ``[B, K]``.
        start: ``[B, K]`` a verified radius to start from (the global one, or 0).
        start_constants: the constants that verified it, each ``[B, K]``.
        hi: ``[B, K]`` a radius not to search beyond.
        local: ``radius [B, J] -> constants [B, J]`` on the balls of those radii around each point.

    Returns:
        ``(radius, constants)`` ``[B, K]``: the largest verified radius and the constants that verified it.
    """
    lo, best, hi = start.clone(), list(start_constants), torch.maximum(hi, start)
    if q.shape[1] > 1:  # several radii per point: a grid of balls they share comes first
        lo, best, hi = _shared_round(q, lo, best, hi, local)
    for _ in range(ROUNDS if q.shape[1] == 1 else SHARED_ROUNDS):
        if bool(((hi - lo) <= RTOL * hi).all()):
            break
        cand = lo + STEP * (hi - lo)
        constants = local(cand)
        accepted = certified_p(q, constants, cand) > 0.5
        inner = torch.minimum(global_radii(q, constants), cand)  # verified on the ball of radius cand
        found = torch.where(accepted, cand, inner)
        better = found > lo
        lo = torch.where(better, found, lo)
        best = [torch.where(better, c, old) for c, old in zip(constants, best, strict=True)]
        hi = torch.where(accepted, hi, torch.minimum(hi, cand))
    return lo, tuple(best)
