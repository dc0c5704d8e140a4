"""Shared pieces of every attack: the result type, input checks, common random numbers, and the optimisation
loop (normalised-gradient PGD, Adam, or scipy's L-BFGS-B) over perturbations constrained to a norm ball or
sphere intersected with the data box, batched over points.

The loop maximises a per-point objective ``f_b(x_b + delta_b)``; points never interact (the batch objective is
a sum), so every point follows its own trajectory and keeps its best iterate over steps and restarts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vaefast._checks import (
    check_box,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_seed,
    check_tensor,
)
from vaefast.attacks.projections import max_l2_norm, max_norm, project

NORMS = ("L2", "Linf")
CONSTRAINTS = ("ball", "sphere")
OPTIMIZERS = ("pgd", "adam", "lbfgsb")
_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant for seed mixing

Objective = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
"""``f(x_adv[b, *shape], restart, point_index[b]) -> [b]``, to be maximised (point_index: rows of the batch)."""


@dataclass
class AttackResult:
    """Per-point outcome of an attack. For a list of eps every field gains a leading eps axis.

    ``x_adv = x + delta``; ``norms`` in the attack's norm; ``objective`` the attack objective at delta (the one
    the attack optimises, e.g. expected reconstruction distance for max-damage, loss for targeted attacks);
    ``initial_objective`` the same at ``delta = 0``; ``extra`` holds attack-specific per-point tensors.
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
        """One dict of python scalars per point (and per eps for curves): eps, norm, objective, extras."""
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
    """Stack per-eps results along a new leading axis (foolbox-style curves)."""
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


# --- the data box ------------------------------------------------------------------------------------------
def max_perturbation(x: torch.Tensor, box: tuple[float, float] | None) -> torch.Tensor | None:
    """Per point the largest ``||delta||_2`` with ``x + delta`` inside the box (the distance to its farthest corner).

    Args:
        x: points ``[B, *shape]`` inside the box.
        box: ``(low, high)`` or None.

    Returns:
        ``[B]`` float64 on the CPU, or None without a box. A margin or bound above it is larger than the input
        space allows.
    """
    lo, hi = box_offsets(x, check_box(box))
    return None if lo is None else max_l2_norm(lo, hi).cpu()


def box_offsets(
    x: torch.Tensor, box: tuple[float, float] | None, name: str = "x"
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-coordinate bounds on delta (``box - x``, flattened); raises if x lies outside the box."""
    if box is None:
        return None, None
    flat = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    tol = 1e-6 * max(1.0, box[1] - box[0])
    if bool((flat < box[0] - tol).any()) or bool((flat > box[1] + tol).any()):
        lo_v, hi_v = flat.min().item(), flat.max().item()
        raise ValueError(f"{name} has entries outside box={box} (min {lo_v:.4g}, max {hi_v:.4g})")
    return (box[0] - flat).clamp(max=0.0), (box[1] - flat).clamp(min=0.0)


def parse_eps(eps: object, batch: int, device: torch.device) -> tuple[list[torch.Tensor], bool]:
    """eps: float (same for all points), 1-D tensor [B] (per point), or list of floats (a curve).

    Returns a list of per-point float64 radii tensors and whether the result is a curve."""
    if isinstance(eps, torch.Tensor):
        if eps.dim() == 0:
            eps = float(eps)
        else:
            t = check_tensor("eps", eps, ndim=1).to(torch.float64).to(device)
            if t.shape[0] != batch:
                raise ValueError(f"eps as a tensor must have one entry per point ({batch}), got {tuple(t.shape)}")
            if bool((t <= 0).any()):
                raise ValueError("eps must be > 0 everywhere")
            return [t], False
    if isinstance(eps, (list, tuple)):
        if len(eps) == 0:
            raise ValueError("eps is an empty list")
        vals = [check_positive_float("eps", e) for e in eps]
        return [torch.full((batch,), v, dtype=torch.float64, device=device) for v in vals], True
    value = check_positive_float("eps", eps)
    return [torch.full((batch,), value, dtype=torch.float64, device=device)], False


def check_eps_feasible(eps: torch.Tensor, norm: str, lo: torch.Tensor | None, hi: torch.Tensor | None) -> None:
    """For sphere constraints the sphere must meet the box."""
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


# --- common random numbers -------------------------------------------------------------------------------
def _mix(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * _MIX + int(p) + 0x632BE59BD9B4E019) % (2**63)
    return h


def point_normals(
    shape: tuple[int, ...], point_ids: torch.Tensor, seed: int, stream: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Standard normals ``[len(point_ids), *shape]`` keyed by (seed, stream, global point id): the numbers for a
    point do not depend on the batch it is in."""
    out = torch.empty((len(point_ids), *shape), dtype=torch.float64)
    for row, pid in enumerate(point_ids.tolist()):
        gen = torch.Generator().manual_seed(_mix(seed, stream, pid))
        out[row] = torch.randn(shape, generator=gen, dtype=torch.float64)
    return out.to(dtype=dtype, device=device)


def latent_noise(
    point_ids: torch.Tensor,
    num_samples: int,
    latent_dim: int,
    seed: int,
    restart: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Fixed encoder noise ``eta[b, S, d]`` for one restart (common random numbers; batch-invariant)."""
    return point_normals((num_samples, latent_dim), point_ids, _mix(seed, 1), restart, dtype, device)


# --- the optimisation loop -------------------------------------------------------------------------------
@dataclass
class LoopConfig:
    norm: str
    constraint: str  # "ball", "sphere" or "none" (box only; penalised attacks)
    steps: int
    step_size: float | None
    restarts: int
    optimizer: str
    seed: int
    progress: bool
    random_start: bool = True


def default_step(cfg: LoopConfig, eps: torch.Tensor, dim: int) -> torch.Tensor:
    """Initial per-point step length (decayed by a cosine schedule to 5% over the steps): PGD ``eps`` (L2 length)
    or ``eps / 2`` (L-inf, per coordinate); Adam ``eps / sqrt(D)`` (L2) or ``eps / 2`` (L-inf) per
    coordinate. An absolute ``step_size`` replaces the initial length. Penalised attacks (no norm budget) use
    ``step_size`` or 0.01 per coordinate."""
    if cfg.step_size is not None:
        return torch.full_like(eps, cfg.step_size)
    if cfg.constraint == "none":
        return torch.full_like(eps, 0.01)
    if cfg.optimizer == "adam":
        return eps / (math.sqrt(dim) if cfg.norm == "L2" else 2.0)
    return eps if cfg.norm == "L2" else 0.5 * eps


def step_schedule(it: int, steps: int) -> float:
    """Cosine decay from 1 to 0.05 over the steps."""
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * it / max(steps, 1)))


def random_start(
    cfg: LoopConfig,
    eps: torch.Tensor,
    lo,
    hi,
    point_ids: torch.Tensor,
    restart: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """A random feasible starting perturbation per point (uniform-radius in the ball, uniform on the sphere)."""
    g = point_normals((dim + 1,), point_ids, _mix(cfg.seed, 2), restart, torch.float64, device)
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


def _ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "Linf":
        return grad.sign()
    return grad / torch.linalg.vector_norm(grad, dim=1, keepdim=True).clamp_min(1e-30)


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
    """Maximise ``objective`` over feasible delta per point; returns (best delta [B, D] flat, best value [B]).

    ``init[B, D]`` (optional, flat): warm start of the first restart (projected onto the feasible set; its step
    length is scaled by ``init_step_scale`` so the schedule refines rather than leaves it)."""
    if cfg.optimizer == "lbfgsb":
        return _optimise_lbfgsb(objective, x, eps, lo, hi, cfg, point_ids, desc)
    b = x.shape[0]
    dim = x[0].numel()
    best_delta = torch.zeros(b, dim, dtype=x.dtype, device=x.device)
    best_val = torch.full((b,), -math.inf, dtype=torch.float64, device=x.device)
    rows = torch.arange(b, device=x.device)
    step = default_step(cfg, eps, dim).to(torch.float64).unsqueeze(1)
    total = cfg.restarts * cfg.steps
    bar = tqdm(total=total, desc=desc, disable=not cfg.progress, leave=False)
    for restart in range(cfg.restarts):
        scale = 1.0
        if init is not None and restart == 0:
            delta = project(init.to(torch.float64), eps, cfg.norm, cfg.constraint, lo, hi).to(x.dtype)
            scale = init_step_scale
        elif cfg.random_start:
            delta = random_start(cfg, eps, lo, hi, point_ids, restart, dim, x.dtype, x.device)
        else:
            delta = torch.zeros(b, dim, dtype=x.dtype, device=x.device)
            if cfg.constraint == "sphere":
                delta = random_start(cfg, eps, lo, hi, point_ids, restart, dim, x.dtype, x.device)
        m = torch.zeros(b, dim, dtype=torch.float64, device=x.device)
        v = torch.zeros_like(m)
        for it in range(cfg.steps + 1):
            d = delta.detach().requires_grad_(True)
            val = objective(x + d.view_as(x), restart, rows)
            grad = torch.autograd.grad(val.sum(), d)[0].to(torch.float64)
            with torch.no_grad():
                val64 = val.detach().to(torch.float64)
                better = val64 > best_val
                best_val = torch.where(better, val64, best_val)
                best_delta = torch.where(better.unsqueeze(1), delta, best_delta)
                if it == cfg.steps:
                    break
                grad = torch.nan_to_num(grad)
                cur = delta.to(torch.float64)
                lr = scale * step * step_schedule(it, cfg.steps)
                if cfg.optimizer == "adam":
                    b1, b2 = 0.9, 0.999
                    m = b1 * m + (1 - b1) * grad
                    # L2: one second moment per point (mean over coordinates), so the preconditioned step is
                    # parallel to the momentum and projected fixed points are KKT points of the L2 problem
                    # (per-coordinate Adam + Euclidean projection converges to sign(g)-like, L-inf solutions)
                    g2 = grad.pow(2) if cfg.norm == "Linf" else grad.pow(2).mean(1, keepdim=True).expand_as(grad)
                    v = b2 * v + (1 - b2) * g2
                    mhat, vhat = m / (1 - b1 ** (it + 1)), v / (1 - b2 ** (it + 1))
                    cur = cur + lr * mhat / (vhat.sqrt() + 1e-12)
                else:
                    cur = cur + lr * _ascent_direction(grad, cfg.norm)
                delta = project(cur, eps, cfg.norm, cfg.constraint, lo, hi).to(x.dtype)
            bar.update(1)
    bar.close()
    return best_delta, best_val


def _optimise_lbfgsb(objective: Objective, x, eps, lo, hi, cfg: LoopConfig, point_ids, desc):
    """One scipy L-BFGS-B run per point and restart (the original protocol's optimiser).

    Variables ``u`` have the box offsets as L-BFGS-B bounds; the norm constraint is a reparametrisation:
    ``delta(u) = eps * u / ||u||`` (sphere) or ``u * min(1, eps / ||u||)`` (ball), with a quadratic penalty
    ``1e3 * ||delta(u) - clamp(delta(u), box)||^2`` on any box violation the rescaling creates. At most ``steps``
    L-BFGS-B iterations. The final perturbation is the exact projection of ``delta(u)`` onto the feasible set,
    re-scored; the best restart per point is kept.
    """
    b = x.shape[0]
    dim = x[0].numel()
    best_delta = torch.zeros(b, dim, dtype=x.dtype, device=x.device)
    best_val = torch.full((b,), -math.inf, dtype=torch.float64, device=x.device)
    bar = tqdm(total=b * cfg.restarts, desc=desc, disable=not cfg.progress, leave=False)
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

    res = minimize(
        fun,
        u0.cpu().numpy(),
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": cfg.steps, "maxfun": 2 * cfg.steps},
    )
    with torch.no_grad():
        d = reparam(torch.tensor(res.x, dtype=torch.float64, device=xi.device)).unsqueeze(0)
        d = project(d, eps, cfg.norm, cfg.constraint, lo, hi).to(xi.dtype)
    with torch.enable_grad():  # objectives may call autograd-only code paths; the value is detached
        val = float(objective(xi + d.view_as(xi), restart, row)[0].detach())
    return d, val


def lp_norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.reshape(delta.shape[0], -1)
    return torch.linalg.vector_norm(flat, ord=2 if norm == "L2" else math.inf, dim=1)


def check_loop_args(norm: str, steps: int, step_size: float | None, restarts: int, optimizer: str, seed: int) -> None:
    check_choice("norm", norm, NORMS)
    check_positive_int("steps", steps)
    if step_size is not None:
        check_positive_float("step_size", step_size)
    check_positive_int("restarts", restarts)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_seed("seed", seed)
