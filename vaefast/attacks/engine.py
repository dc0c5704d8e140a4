"""The optimisation engine every attack shares: normalised-gradient PGD, Adam, or scipy's L-BFGS-B over
perturbations constrained to a norm ball or sphere intersected with the data box, batched over points.

The engine maximises a per-point objective ``f_b(x_b + delta_b)``; points never interact (the batch objective is
a sum), so every point follows its own trajectory and keeps its best iterate over steps and restarts. Its random
numbers (random starts, the attacks' common random numbers) come from :func:`vaefast.rng.normals`, keyed by the
points' global ids, so a point gets the same attack in any batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vaefast import rng
from vaefast._checks import check_choice, check_positive_float, check_positive_int, check_seed
from vaefast._progress import progress_bar
from vaefast.attacks.projections import project

NORMS = ("L2", "Linf")
CONSTRAINTS = ("ball", "sphere")
OPTIMIZERS = ("pgd", "adam", "lbfgsb")

Objective = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
"""``f(x_adv[b, *shape], restart, rows[b]) -> [b]``, to be maximised (rows: the points' rows in the batch)."""


@dataclass
class LoopConfig:
    """How the engine searches.

    Attributes:
        norm: "L2" or "Linf", the norm of the budget ``||delta|| <= eps``.
        constraint: "ball" (``||delta|| <= eps``), "sphere" (``||delta|| = eps``) or "none" (box only).
        steps: iterations per restart (L-BFGS-B: at most that many iterations).
        step_size: initial step length, or None for the default of :func:`default_step`.
        restarts: independent starts per point; the best iterate over all of them is kept.
        optimizer: "pgd", "adam" or "lbfgsb".
        seed: keys the random starts (stream ``"attack-start"``).
        progress: show a progress bar.
        random_start: start every restart from a random feasible point (else from ``delta = 0``).
    """

    norm: str
    constraint: str
    steps: int
    step_size: float | None
    restarts: int
    optimizer: str
    seed: int
    progress: bool
    random_start: bool = True


def check_loop_args(norm: str, steps: int, step_size: float | None, restarts: int, optimizer: str, seed: int) -> None:
    """Validate the engine's settings.

    Args:
        norm: one of ``NORMS``.
        steps: int >= 1.
        step_size: None or a float > 0.
        restarts: int >= 1.
        optimizer: one of ``OPTIMIZERS``.
        seed: int in ``[0, 2**63)``.

    Raises:
        ValueError / TypeError: naming the first bad argument.
    """
    check_choice("norm", norm, NORMS)
    check_positive_int("steps", steps)
    if step_size is not None:
        check_positive_float("step_size", step_size)
    check_positive_int("restarts", restarts)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_seed("seed", seed)


# --- random numbers ----------------------------------------------------------------------------------------------
def restart_noise(
    point_ids: torch.Tensor,
    restarts: int,
    num_samples: int,
    dim: int,
    seed: int,
    stream: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Common random numbers: fixed standard normals per point, restart and sample.

    Args:
        point_ids: ``[B]`` global point ids.
        restarts: R, number of restarts.
        num_samples: S, draws per restart.
        dim: d, coordinates per draw (the latent dimension).
        seed: the attack's seed.
        stream: the stream's name (e.g. ``"attack-noise"``, ``"elbo-noise"``).
        dtype, device: of the result.

    Returns:
        ``eta[b, r, s, :] = rng.normals(point_ids, R S, d, seed, stream)[b, r S + s]``, shape ``[B, R, S, d]``:
        restart ``r`` owns the sample block ``[r S, (r + 1) S)``, so the numbers of a point depend only on its id.
    """
    eta = rng.normals(point_ids, restarts * num_samples, dim, seed, stream, dtype=dtype, device=device)
    return eta.view(eta.shape[0], restarts, num_samples, dim)


def random_start(
    cfg: LoopConfig,
    eps: torch.Tensor,
    lo: torch.Tensor | None,
    hi: torch.Tensor | None,
    point_ids: torch.Tensor,
    restart: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """A random feasible starting perturbation per point, keyed by (seed, point id, restart).

    With ``g = rng.normals(point_ids, 1, D + 1, cfg.seed, "attack-start", sample_offset=restart)``,
    ``v = g[:D]`` and ``u = Phi(g[D])`` uniform on (0, 1):

    - L2 ball: ``eps u^(1/D) v / ||v||`` (uniform in the ball); L2 sphere: ``eps v / ||v||`` (uniform on it);
    - L-inf: ``eps (2 Phi(v) - 1)`` (uniform in the cube);
    - no norm constraint: ``1e-3 v / sqrt(D)``;

    each then projected onto the feasible set (box included).

    Args:
        cfg: the engine's settings.
        eps: ``[B]`` radii.
        lo, hi: ``[B, D]`` box offsets of delta, or None.
        point_ids: ``[B]`` global point ids.
        restart: the restart index.
        dim: D, the flattened input size.
        dtype, device: of the result.

    Returns:
        ``delta[B, D]``.
    """
    g = rng.normals(
        point_ids, 1, dim + 1, cfg.seed, "attack-start", sample_offset=restart, dtype=torch.float64, device=device
    )[:, 0]  # drawn where the attack runs (no host-to-device copy)
    direction, u = g[:, :dim], torch.special.ndtr(g[:, dim])
    if cfg.constraint == "none":
        start = 1e-3 * direction / math.sqrt(dim)
        return project(start, eps, cfg.norm, "none", lo, hi).to(dtype)
    if cfg.norm == "Linf":
        start = eps.unsqueeze(1) * (2 * torch.special.ndtr(direction) - 1)
    else:
        unit = direction / torch.linalg.vector_norm(direction, dim=1, keepdim=True).clamp_min(1e-300)
        radius = eps if cfg.constraint == "sphere" else eps * u.pow(1.0 / dim)
        start = unit * radius.unsqueeze(1)
    return project(start, eps, cfg.norm, cfg.constraint, lo, hi).to(dtype)


# --- steps -------------------------------------------------------------------------------------------------------
def default_step(cfg: LoopConfig, eps: torch.Tensor, dim: int) -> torch.Tensor:
    """Initial per-point step length (decayed by :func:`step_schedule`).

    Args:
        cfg: the engine's settings.
        eps: ``[B]`` radii.
        dim: D, the flattened input size.

    Returns:
        ``[B]``: ``step_size`` when given; else 0.01 per coordinate without a norm constraint; PGD ``eps`` (L2
        length) or ``eps / 2`` (L-inf, per coordinate); Adam ``eps / sqrt(D)`` (L2) or ``eps / 2`` (L-inf).
    """
    if cfg.step_size is not None:
        return torch.full_like(eps, cfg.step_size)
    if cfg.constraint == "none":
        return torch.full_like(eps, 0.01)
    if cfg.optimizer == "adam":
        return eps / (math.sqrt(dim) if cfg.norm == "L2" else 2.0)
    return eps if cfg.norm == "L2" else 0.5 * eps


def step_schedule(it: int, steps: int) -> float:
    """Cosine decay of the step length.

    Args:
        it: the iteration, ``0 <= it <= steps``.
        steps: the number of iterations.

    Returns:
        ``0.05 + 0.95 (1 + cos(pi it / steps)) / 2``: 1 at the first step, 0.05 at the last.
    """
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * it / max(steps, 1)))


def _ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit norm: ``sign(g)`` (L-inf) or ``g / ||g||_2`` (L2)."""
    if norm == "Linf":
        return grad.sign()
    return grad / torch.linalg.vector_norm(grad, dim=1, keepdim=True).clamp_min(1e-30)


@dataclass
class _Adam:
    """Adam moments of one restart (L2: one second moment per point, the mean over coordinates, so the
    preconditioned step is parallel to the momentum and projected fixed points are KKT points of the L2 problem;
    per-coordinate Adam with a Euclidean projection converges to sign(g)-like, L-inf solutions)."""

    m: torch.Tensor
    v: torch.Tensor

    def step(self, grad: torch.Tensor, it: int, norm: str) -> torch.Tensor:
        b1, b2 = 0.9, 0.999
        self.m = b1 * self.m + (1 - b1) * grad
        g2 = grad.pow(2) if norm == "Linf" else grad.pow(2).mean(1, keepdim=True).expand_as(grad)
        self.v = b2 * self.v + (1 - b2) * g2
        mhat, vhat = self.m / (1 - b1 ** (it + 1)), self.v / (1 - b2 ** (it + 1))
        return mhat / (vhat.sqrt() + 1e-12)


# --- the loop ----------------------------------------------------------------------------------------------------
def _start(cfg, x, eps, lo, hi, point_ids, restart, init, init_scale) -> tuple[torch.Tensor, float]:
    """The first iterate of a restart and its step scale (``init_scale`` for a warm start, else 1)."""
    b, dim = x.shape[0], x[0].numel()
    if init is not None and restart == 0:
        return project(init.to(torch.float64), eps, cfg.norm, cfg.constraint, lo, hi).to(x.dtype), init_scale
    if cfg.random_start or cfg.constraint == "sphere":
        return random_start(cfg, eps, lo, hi, point_ids, restart, dim, x.dtype, x.device), 1.0
    return torch.zeros(b, dim, dtype=x.dtype, device=x.device), 1.0


def optimise(
    objective: Objective,
    x: torch.Tensor,
    eps: torch.Tensor,
    lo: torch.Tensor | None,
    hi: torch.Tensor | None,
    cfg: LoopConfig,
    point_ids: torch.Tensor,
    desc: str = "attack",
    init: torch.Tensor | None = None,
    init_step_scale: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximise ``objective`` per point over the feasible set ``{||delta|| <= eps (or = eps)} ∩ box``.

    PGD: ``delta <- P(delta + lr_t d(grad))`` with ``d`` the unit ascent direction; Adam: the same with the
    bias-corrected Adam direction; ``lr_t = default_step * step_schedule(t)``, ``P`` the exact projection. The
    best iterate over all steps and restarts is kept per point.

    Args:
        objective: ``f(x_adv, restart, rows) -> [b]`` to maximise.
        x: clean points ``[B, *shape]``.
        eps: ``[B]`` radii (inf without a norm constraint).
        lo, hi: ``[B, D]`` box offsets of delta, or None.
        cfg: the engine's settings.
        point_ids: ``[B]`` global point ids (key the random starts).
        desc: progress-bar label.
        init: ``[B, D]`` warm start of the first restart (projected onto the feasible set).
        init_step_scale: factor on the warm-started restart's step length, so the schedule refines rather than
            leaves the warm start.

    Returns:
        ``(delta[B, D], value[B])``: the best flat perturbation and its objective value (float64).
    """
    if cfg.optimizer == "lbfgsb":
        return _optimise_lbfgsb(objective, x, eps, lo, hi, cfg, point_ids, desc)
    best = _Best.empty(x)
    bar = progress_bar(total=cfg.restarts * cfg.steps, desc=desc, unit="step", enabled=cfg.progress, leave=False)
    for restart in range(cfg.restarts):
        delta, scale = _start(cfg, x, eps, lo, hi, point_ids, restart, init, init_step_scale)
        _ascend(objective, x, delta, scale * default_step(cfg, eps, x[0].numel()), lo, hi, eps, cfg, restart, best, bar)
    bar.close()
    return best.delta, best.value


@dataclass
class _Best:
    """The best flat perturbation ``[B, D]`` and objective value ``[B]`` (float64) seen so far, per point."""

    delta: torch.Tensor
    value: torch.Tensor

    @classmethod
    def empty(cls, x: torch.Tensor) -> _Best:
        b, dim = x.shape[0], x[0].numel()
        zeros = torch.zeros(b, dim, dtype=x.dtype, device=x.device)
        return cls(zeros, torch.full((b,), -math.inf, dtype=torch.float64, device=x.device))

    def update(self, delta: torch.Tensor, value: torch.Tensor) -> None:
        better = value > self.value
        self.value = torch.where(better, value, self.value)
        self.delta = torch.where(better.unsqueeze(1), delta, self.delta)


def _ascend(objective, x, delta, step, lo, hi, eps, cfg: LoopConfig, restart: int, best: _Best, bar) -> None:
    """One restart of PGD/Adam from ``delta`` with initial step lengths ``step[B]``, recording every iterate."""
    b, dim = delta.shape
    rows = torch.arange(b, device=x.device)
    zeros = torch.zeros(b, dim, dtype=torch.float64, device=x.device)
    adam = _Adam(zeros, zeros)
    step = step.to(torch.float64).unsqueeze(1)
    for it in range(cfg.steps + 1):
        d = delta.detach().requires_grad_(True)
        val = objective(x + d.view_as(x), restart, rows)
        grad = torch.autograd.grad(val.sum(), d)[0].to(torch.float64)
        with torch.no_grad():
            best.update(delta, val.detach().to(torch.float64))
            if it == cfg.steps:
                return
            grad = torch.nan_to_num(grad)
            lr = step * step_schedule(it, cfg.steps)
            ascent = adam.step(grad, it, cfg.norm) if cfg.optimizer == "adam" else _ascent_direction(grad, cfg.norm)
            delta = project(delta.to(torch.float64) + lr * ascent, eps, cfg.norm, cfg.constraint, lo, hi)
            delta = delta.to(x.dtype)
        bar.update(1)


# --- L-BFGS-B, one point at a time -----------------------------------------------------------------------------
def _optimise_lbfgsb(objective: Objective, x, eps, lo, hi, cfg: LoopConfig, point_ids, desc):
    """One scipy L-BFGS-B run per point and restart (the original protocol's optimiser).

    Variables ``u`` have the box offsets as L-BFGS-B bounds; the norm constraint is a reparametrisation:
    ``delta(u) = eps * u / ||u||`` (sphere) or ``u * min(1, eps / ||u||)`` (ball), with a quadratic penalty
    ``1e3 * ||delta(u) - clamp(delta(u), box)||^2`` on any box violation the rescaling creates. At most ``steps``
    L-BFGS-B iterations. The final perturbation is the exact projection of ``delta(u)`` onto the feasible set,
    re-scored; the best restart per point is kept. Every evaluation sees one point only, so the result of a point
    does not depend on the batch it is in.
    """
    b, dim = x.shape[0], x[0].numel()
    best_delta = torch.zeros(b, dim, dtype=x.dtype, device=x.device)
    best_val = torch.full((b,), -math.inf, dtype=torch.float64, device=x.device)
    bar = progress_bar(total=b * cfg.restarts, desc=desc, unit="run", enabled=cfg.progress, leave=False)
    for i in range(b):
        sl = slice(i, i + 1)
        lo_i = None if lo is None else lo[sl]
        hi_i = None if hi is None else hi[sl]
        for restart in range(cfg.restarts):
            u0 = random_start(cfg, eps[sl], lo_i, hi_i, point_ids[sl], restart, dim, torch.float64, x.device)[0]
            d, val = _lbfgsb_point(objective, x[sl], i, restart, u0, eps[sl], lo_i, hi_i, cfg)
            if val > best_val[i]:
                best_val[i] = val
                best_delta[i] = d[0]
            bar.update(1)
    bar.close()
    return best_delta, best_val


def _lbfgsb_point(
    objective: Objective,
    xi: torch.Tensor,
    i: int,
    restart: int,
    u0: torch.Tensor,
    eps: torch.Tensor,
    lo: torch.Tensor | None,
    hi: torch.Tensor | None,
    cfg: LoopConfig,
) -> tuple[torch.Tensor, float]:
    """L-BFGS-B on point ``i`` from ``u0``; returns its projected perturbation ``[1, D]`` and objective value."""
    from scipy.optimize import minimize

    row = torch.tensor([i], device=xi.device)
    e = float(eps[0])
    bounds = None if lo is None else list(zip(lo[0].tolist(), hi[0].tolist(), strict=True))

    def reparam(u: torch.Tensor) -> torch.Tensor:
        n = torch.linalg.vector_norm(u).clamp_min(1e-12)
        if cfg.constraint == "sphere":
            return u * (e / n)
        if cfg.constraint == "ball":
            return u * torch.clamp(e / n, max=1.0)
        return u

    def fun(u_np: np.ndarray) -> tuple[float, np.ndarray]:
        u = torch.tensor(u_np, dtype=torch.float64, device=xi.device, requires_grad=True)
        d = reparam(u)
        loss = -objective(xi + d.to(xi.dtype).view_as(xi), restart, row)[0].to(torch.float64)
        if lo is not None:
            loss = loss + 1e3 * ((d - lo[0]).clamp(max=0).pow(2).sum() + (d - hi[0]).clamp(min=0).pow(2).sum())
        (g,) = torch.autograd.grad(loss, u)
        return float(loss.detach()), g.cpu().numpy()

    options = {"maxiter": cfg.steps, "maxfun": 2 * cfg.steps}
    res = minimize(fun, u0.cpu().numpy(), jac=True, method="L-BFGS-B", bounds=bounds, options=options)
    with torch.no_grad():
        d = reparam(torch.tensor(res.x, dtype=torch.float64, device=xi.device)).unsqueeze(0)
        d = project(d, eps, cfg.norm, cfg.constraint, lo, hi).to(xi.dtype)
    with torch.enable_grad():  # objectives may call autograd-only code paths; the value is detached
        val = float(objective(xi + d.view_as(xi), restart, row)[0].detach())
    return d, val


def lp_norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-point norms of perturbations.

    Args:
        delta: ``[B, ...]``.
        norm: "L2" or "Linf".

    Returns:
        ``[B]``: ``||delta_b||_2`` or ``||delta_b||_inf`` over the flattened point.
    """
    flat = delta.reshape(delta.shape[0], -1)
    return torch.linalg.vector_norm(flat, ord=2 if norm == "L2" else math.inf, dim=1)
