"""r-robustness estimators (SPEC §1): Monte-Carlo ``p_r``, the smallest robust radius ``r*``, a sequential
r-robustness test, and the input-space margin bound with its variants.

Notation as in SPEC §1: ``z = mu(x+delta) + sigma(x+delta) * eps`` with ``eps ~ N(0, I_d)`` drawn by
:func:`vaefast.ops.reparam_sample` (Philox keyed by ``(seed, point_offset + b, sample index, latent index)``),
distortion ``||g(z) - g(mu(x))||_2`` on flattened decoder means (the reference is always the *clean* x),
``p_r = P(distortion <= r)``, r-robust iff ``p_r > 1/2``.

Streaming: decoder batches hold at most ``max_batch_elements`` output numbers (points x samples x D); the samples
of a point are processed in chunks of ``sample_chunk`` and points in chunks of ``point_chunk``. Because eps is keyed
by global (point, sample) indices, every result is independent of the chunking. For ``r*`` the S distances of the
points of one point chunk are kept (``point_chunk x S`` floats) and reduced with ``kthvalue`` before the next chunk.

Every entry point is an analysis of a trained model (:func:`vaefast._checks.analysis`): the model runs in eval mode
(dropout off, batch norm on its running statistics) and every submodule's own training flag is restored afterwards;
a model that does not know its input shape yet (an ``as_vae`` adapter built without one) learns it from ``x``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from scipy import stats as sps
from torch import nn

from vaefast import ops
from vaefast._checks import (
    analysis,
    as_radii,
    check_positive_float,
    check_positive_int,
    check_probability,
    check_seed,
    check_tensor,
    model_input_shape,
)
from vaefast._results import ResultMixin
from vaefast.rng import id_runs
from vaefast.stats import clopper_pearson, sequential_decision, sequential_schedule

__all__ = [
    "RRobustnessResult",
    "RobustnessDecision",
    "MarginBound",
    "estimate_r_robustness",
    "is_r_robust",
    "margin_bound",
    "DEFAULT_MAX_BATCH_ELEMENTS",
]

DEFAULT_MAX_BATCH_ELEMENTS = 2**24  # decoder outputs per batch: 64 MB of float32


# --- results ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RRobustnessResult(ResultMixin):
    """Per point b and radius k: ``hits[b,k] = #{s: ||Delta_s|| <= radii[k]}`` of ``num_samples``, ``p_hat = hits/S``,
    two-sided Clopper–Pearson ``[ci_low, ci_high]`` at ``confidence``, ``robust = p_hat > 1/2``; per point
    ``r_star = d_(floor(S/2)+1)`` (the smallest r with ``p_hat_r > 1/2``). ``point_index``: global RNG key per point.
    """

    p_hat: torch.Tensor
    ci_low: torch.Tensor
    ci_high: torch.Tensor
    hits: torch.Tensor
    num_samples: int
    robust: torch.Tensor
    r_star: torch.Tensor
    radii: torch.Tensor
    confidence: float
    point_index: torch.Tensor

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per (point, radius) — one row per point when a single radius was asked."""
        rows = []
        for b in range(len(self)):
            for k in range(self.radii.shape[0]):
                rows.append(
                    {
                        "point": int(self.point_index[b]),
                        "r": float(self.radii[k]),
                        "hits": int(self.hits[b, k]),
                        "num_samples": int(self.num_samples),
                        "p_hat": float(self.p_hat[b, k]),
                        "ci_low": float(self.ci_low[b, k]),
                        "ci_high": float(self.ci_high[b, k]),
                        "robust": bool(self.robust[b, k]),
                        "r_star": float(self.r_star[b]),
                    }
                )
        return rows


@dataclasses.dataclass
class RobustnessDecision(ResultMixin):
    """Outcome of the sequential test: ``robust`` (the decision; ``p_hat > 1/2`` where undecided), ``decided`` (the
    confidence bound excluded 1/2 before ``max_samples``), samples used, ``hits`` and ``p_hat = hits/samples_used``."""

    robust: torch.Tensor
    decided: torch.Tensor
    samples_used: torch.Tensor
    p_hat: torch.Tensor
    hits: torch.Tensor
    r: float
    confidence: float
    point_index: torch.Tensor

    def to_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "point": int(self.point_index[b]),
                "r": self.r,
                "robust": bool(self.robust[b]),
                "decided": bool(self.decided[b]),
                "samples_used": int(self.samples_used[b]),
                "hits": int(self.hits[b]),
                "p_hat": float(self.p_hat[b]),
            }
            for b in range(len(self))
        ]


@dataclasses.dataclass
class MarginBound(ResultMixin):
    """The SPEC §1 lower bounds on the margin ``R^r_X(x)`` and their components (see :func:`margin_bound`)."""

    bound: torch.Tensor
    certified_bound: torch.Tensor
    spectral_bound: torch.Tensor
    whitened_bound: torch.Tensor
    latent_margin: torch.Tensor
    sigma_min: torch.Tensor
    jac_frobenius: torch.Tensor
    jac_spectral: torch.Tensor
    jac_whitened_spectral: torch.Tensor
    p_hat: torch.Tensor
    ci_low: torch.Tensor
    hits: torch.Tensor
    certified: torch.Tensor
    saturated: torch.Tensor
    r: float
    num_samples: int
    confidence: float
    point_index: torch.Tensor

    _PER_POINT = (
        "bound", "certified_bound", "spectral_bound", "whitened_bound", "latent_margin", "sigma_min",
        "jac_frobenius", "jac_spectral", "jac_whitened_spectral", "p_hat", "ci_low", "hits", "certified", "saturated",
    )  # fmt: skip

    def to_rows(self) -> list[dict[str, Any]]:
        rows = []
        for b in range(len(self)):
            row: dict[str, Any] = {"point": int(self.point_index[b]), "r": self.r, "num_samples": self.num_samples}
            for name in self._PER_POINT:
                row[name] = getattr(self, name)[b].item()
            rows.append(row)
        return rows


# --- input handling --------------------------------------------------------------------------------------------------
def _model_float(model: Any, x: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's parameters (x's own for parameterless models)."""
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    params += list(model.buffers()) if isinstance(model, nn.Module) else []
    for p in params:
        if p.is_floating_point():
            return p.device, p.dtype
    return x.device, x.dtype


def _prepare(model: Any, x: object, delta: object | None) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """Validate ``x[B, *input_shape]`` (and ``delta`` of x's shape or ``input_shape``); cast to the model's dtype."""
    x = check_tensor("x", x)
    shape = model_input_shape(model, x)
    if tuple(x.shape[1:]) != shape or x.dim() != len(shape) + 1:
        raise ValueError(
            f"x must have shape [B, {', '.join(map(str, shape))}] (model.input_shape), got {tuple(x.shape)}"
        )
    device, dtype = _model_float(model, x)
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the model is on {device}")
    x = x.to(dtype)
    if delta is not None:
        delta = check_tensor("delta", delta)
        if tuple(delta.shape) not in (tuple(x.shape), shape):
            raise ValueError(
                f"delta must have the shape of x {tuple(x.shape)} or of one input {shape}, got {tuple(delta.shape)}"
            )
        if delta.device != device:
            raise ValueError(f"delta is on {delta.device} but the model is on {device}")
        delta = delta.to(dtype).expand_as(x)
    return x, delta, shape


def _check_max_batch_elements(value: int | None) -> int:
    """The decoder batch bound (output numbers per decoder call); ``None`` is the default."""
    return DEFAULT_MAX_BATCH_ELEMENTS if value is None else check_positive_int("max_batch_elements", value)


def _check_offset(point_offset: object) -> int:
    return check_seed("point_offset", point_offset)


def _chunks(num_points: int, num_samples: int, out_dim: int, max_elements: int) -> tuple[int, int]:
    """``(point_chunk, sample_chunk)`` with ``point_chunk * sample_chunk * out_dim <= max_elements`` when possible
    (at least one sample of one point per batch)."""
    sample_chunk = max(1, min(num_samples, max_elements // out_dim))
    point_chunk = max(1, min(num_points, max_elements // (sample_chunk * out_dim)))
    return point_chunk, sample_chunk


def _encode(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu, logvar = model.encode(x)
    if mu.dim() != 2 or logvar.shape != mu.shape or mu.shape[0] != x.shape[0]:
        raise ValueError(
            f"model.encode must return mu, logvar of shape [B, d], got {tuple(mu.shape)}, {tuple(logvar.shape)}"
        )
    return mu, logvar


def _sample(
    mu: torch.Tensor, logvar: torch.Tensor, ids: torch.Tensor, num: int, seed: int, sample_offset: int
) -> torch.Tensor:
    """``z[b, s] = mu[b] + sigma[b] * eps(seed, ids[b], sample_offset + s)`` for arbitrary (sorted) global ids."""
    mu, logvar = mu.contiguous(), logvar.contiguous()  # e.g. halves of one Linear's output
    parts = [
        ops.reparam_sample(mu[p : p + n], logvar[p : p + n], num, seed=seed, offset=first, sample_offset=sample_offset)
        for p, n, first in id_runs(ids)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def _count_hits(
    model: Any,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    center: torch.Tensor,
    radii: torch.Tensor,
    ids: torch.Tensor,
    num_samples: int,
    sample_offset: int,
    sample_chunk: int,
    seed: int,
    keep_distances: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hits ``[b, K]`` (int64) of samples ``sample_offset .. sample_offset+num_samples-1`` for one point chunk, and
    their distances ``[b, num_samples]`` if asked (``radii``: float64, any order)."""
    b, d = mu.shape
    hits = torch.zeros(b, radii.shape[0], dtype=torch.int64, device=mu.device)
    dist_dtype = torch.float64 if center.dtype == torch.float64 else torch.float32  # sphere_hits distance dtype
    dist = torch.empty(b, num_samples, dtype=dist_dtype, device=mu.device) if keep_distances else None
    for s0 in range(0, num_samples, sample_chunk):
        n = min(sample_chunk, num_samples - s0)
        z = _sample(mu, logvar, ids, n, seed, sample_offset + s0)
        y = model.decode(z.reshape(b * n, d)).reshape(b, n, -1)
        if keep_distances:
            h, dd = ops.sphere_hits(y, center, radii, return_distances=True)
            dist[:, s0 : s0 + n] = dd  # type: ignore[index]
        else:
            h = ops.sphere_hits(y, center, radii)
        hits += h
    return hits, dist


# --- the estimator ---------------------------------------------------------------------------------------------------
@analysis
def estimate_r_robustness(
    model: nn.Module,
    x: torch.Tensor,
    radii: float | list[float] | torch.Tensor,
    num_samples: int = 1000,
    delta: torch.Tensor | None = None,
    seed: int = 0,
    confidence: float = 0.95,
    max_batch_elements: int | None = None,
    point_offset: int = 0,
    progress: bool = False,
) -> RRobustnessResult:
    """Monte-Carlo r-robustness of ``model`` at ``x`` (optionally perturbed by ``delta``) for every radius.

    ``z_s ~ q(z | x + delta)`` (S = ``num_samples``), ``d_s = ||g(z_s) - g(mu(x))||_2``; per radius
    ``p_hat = #{d_s <= r} / S`` with a two-sided Clopper–Pearson interval at ``confidence``; ``robust = p_hat > 1/2``;
    ``r_star = d_(floor(S/2)+1)``. Point ``b`` uses RNG key ``point_offset + b`` (pass the global index when a data
    set is split across calls). Decoder batches hold ``<= max_batch_elements`` output numbers (default 2**24); the
    samples are bit-identical for any value, so hits are too and r* differs at most by the decoder's own
    batch-size-dependent rounding. x (and delta) are cast to the model's parameter dtype and must be on its device;
    distances are float32 (float64 for float64 models). ``progress`` shows a tqdm bar over point chunks.
    """
    radii_t = as_radii("radii", radii)
    num_samples = check_positive_int("num_samples", num_samples)
    seed = check_seed("seed", seed)
    confidence = check_probability("confidence", confidence)
    point_offset = _check_offset(point_offset)
    max_elems = _check_max_batch_elements(max_batch_elements)
    x, delta, shape = _prepare(model, x, delta)
    num_points, out_dim = x.shape[0], math.prod(shape)
    point_chunk, sample_chunk = _chunks(num_points, num_samples, out_dim, max_elems)
    radii_dev = radii_t.to(x.device)  # compared in float64 with the distances (float32 for float32 decoders)
    ids_all = torch.arange(point_offset, point_offset + num_points, dtype=torch.int64)
    hits = torch.empty(num_points, radii_t.shape[0], dtype=torch.int64)
    r_star = torch.empty(num_points, dtype=torch.float64)
    kth = num_samples // 2 + 1
    starts = range(0, num_points, point_chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="r-robustness", unit="chunk")
    with torch.no_grad():
        for b0 in starts:
            b1 = min(b0 + point_chunk, num_points)
            xc = x[b0:b1]
            mu, logvar = _encode(model, xc)
            center = model.decode(mu).reshape(b1 - b0, -1)
            if delta is not None:
                mu, logvar = _encode(model, xc + delta[b0:b1])
            h, dist = _count_hits(
                model, mu, logvar, center, radii_dev, ids_all[b0:b1], num_samples, 0, sample_chunk, seed, True
            )
            hits[b0:b1] = h.cpu()
            r_star[b0:b1] = dist.kthvalue(kth, dim=1).values.to(torch.float64).cpu()  # type: ignore[union-attr]
    low, high = clopper_pearson(hits, num_samples, confidence)
    return RRobustnessResult(
        p_hat=hits.to(torch.float64) / num_samples,
        ci_low=low,
        ci_high=high,
        hits=hits,
        num_samples=num_samples,
        robust=2 * hits > num_samples,
        r_star=r_star,
        radii=radii_t,
        confidence=confidence,
        point_index=ids_all,
    )


# --- the sequential test ---------------------------------------------------------------------------------------------
@analysis
def is_r_robust(
    model: nn.Module,
    x: torch.Tensor,
    r: float,
    delta: torch.Tensor | None = None,
    confidence: float = 0.95,
    max_samples: int = 10000,
    seed: int = 0,
    point_offset: int = 0,
    max_batch_elements: int | None = None,
) -> RobustnessDecision:
    """Decide ``p_r(x, delta) > 1/2`` per point with a group-sequential Clopper–Pearson test (:mod:`vaefast.stats`).

    Rounds reach 32, 64, 128, ... (capped at ``max_samples``) samples per point; after round j of J a point is decided
    robust if the one-sided CP lower limit at level ``(1 - confidence) / J`` exceeds 1/2, not robust if the upper one
    is ``<= 1/2``; only undecided points draw more samples. By Bonferroni the probability of a wrong decision is
    ``<= 1 - confidence`` for every point. Points still undecided at ``max_samples`` get ``decided = False`` and
    ``robust = p_hat > 1/2``. Sample s of point b is the same draw as in :func:`estimate_r_robustness` (same seed and
    point_offset), so ``p_hat`` equals the fixed-S estimate with ``S = samples_used``.
    """
    r = check_positive_float("r", r)
    confidence = check_probability("confidence", confidence)
    max_samples = check_positive_int("max_samples", max_samples)
    seed = check_seed("seed", seed)
    point_offset = _check_offset(point_offset)
    max_elems = _check_max_batch_elements(max_batch_elements)
    x, delta, shape = _prepare(model, x, delta)
    num_points, out_dim = x.shape[0], math.prod(shape)
    schedule = sequential_schedule(max_samples)
    round_alpha = (1.0 - confidence) / len(schedule)
    hits = torch.zeros(num_points, dtype=torch.int64)
    used = torch.zeros(num_points, dtype=torch.int64)
    decided = torch.zeros(num_points, dtype=torch.bool)
    robust = torch.zeros(num_points, dtype=torch.bool)
    ids_all = torch.arange(point_offset, point_offset + num_points, dtype=torch.int64)
    with torch.no_grad():
        mu0, logvar0 = _encode(model, x)
        center = model.decode(mu0).reshape(num_points, -1)
        mu, logvar = _encode(model, x + delta) if delta is not None else (mu0, logvar0)
        radius = torch.tensor([r], dtype=torch.float64, device=center.device)
        active = torch.arange(num_points)
        done = 0
        for n in schedule:
            point_chunk, sample_chunk = _chunks(active.shape[0], n - done, out_dim, max_elems)
            for c0 in range(0, active.shape[0], point_chunk):
                idx = active[c0 : c0 + point_chunk]
                dev_idx = idx.to(mu.device)
                h, _ = _count_hits(
                    model,
                    mu[dev_idx],
                    logvar[dev_idx],
                    center[dev_idx],
                    radius,
                    ids_all[idx],
                    n - done,
                    done,
                    sample_chunk,
                    seed,
                    False,
                )
                hits[idx] += h[:, 0].cpu()
            used[active] = n
            yes, no = sequential_decision(hits[active], n, round_alpha)
            decided[active] = yes | no
            robust[active[yes]] = True
            active = active[~(yes | no)]
            done = n
            if active.numel() == 0:
                break
    undecided = ~decided
    robust[undecided] = 2 * hits[undecided] > used[undecided]
    return RobustnessDecision(
        robust=robust,
        decided=decided,
        samples_used=used,
        p_hat=hits.to(torch.float64) / used.to(torch.float64),
        hits=hits,
        r=r,
        confidence=confidence,
        point_index=ids_all,
    )


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with ``0 / 0 = 0`` (no certificate stays 0 even for a constant encoder)."""
    return torch.where(num == 0, torch.zeros_like(num), num / den)


def _column_for(estimate: object, r: float, x: object) -> RRobustnessResult:
    """The single-radius view of ``estimate`` at radius ``r`` (checked against x's batch size)."""
    if not isinstance(estimate, RRobustnessResult):
        raise TypeError(f"estimate must be an RRobustnessResult, got {type(estimate).__name__}")
    match = (estimate.radii == r).nonzero().flatten()
    if match.numel() == 0:
        raise ValueError(f"estimate has no column for r={r} (radii {estimate.radii.tolist()})")
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] != len(estimate):
        raise ValueError(f"estimate covers {len(estimate)} points but x has {x.shape[0]}")
    k = int(match[0])
    return dataclasses.replace(
        estimate,
        p_hat=estimate.p_hat[:, k : k + 1],
        ci_low=estimate.ci_low[:, k : k + 1],
        ci_high=estimate.ci_high[:, k : k + 1],
        hits=estimate.hits[:, k : k + 1],
        robust=estimate.robust[:, k : k + 1],
        radii=estimate.radii[k : k + 1],
    )


# --- the margin bound ------------------------------------------------------------------------------------------------
@analysis
def margin_bound(
    model: nn.Module,
    x: torch.Tensor,
    r: float,
    num_samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    point_offset: int = 0,
    max_batch_elements: int | None = None,
    estimate: RRobustnessResult | None = None,
) -> MarginBound:
    """First-order lower bounds on the input-space margin ``R^r_X(x)`` (SPEC §1), from ``p_hat = p_hat_r(x, 0)``:

    - ``latent_margin = sigma_min * Phi^-1(p_hat)``, ``sigma_min = min_i sigma(x)_i``;
    - ``bound = latent_margin / ||J_mu(x)||_F`` (the paper's bound);
    - ``spectral_bound = latent_margin / ||J_mu(x)||_2`` (>= bound);
    - ``whitened_bound = Phi^-1(p_hat) / ||diag(sigma(x))^-1 J_mu(x)||_2`` (>= spectral_bound);
    - ``certified_bound = sigma_min * Phi^-1(ci_low) / ||J||_F`` with the two-sided Clopper–Pearson lower limit
      ``ci_low`` at ``confidence`` (the p-part then holds with that confidence, not only for the point estimate;
      it is still a first-order bound); 0 when ``ci_low <= 1/2``.

    Where ``p_hat <= 1/2`` there is no certificate: ``certified = False`` and all bounds are 0.
    ``p_hat = 1`` (every sample inside the sphere) would make ``Phi^-1`` infinite although only ``p >= ci_low`` is
    known; there the point bounds use the half-count rule ``p_hat -> 1 - 1/(2S)`` (as if ``S - 1/2`` samples hit) and
    ``saturated = True`` flags it; ``certified_bound`` is always finite. A zero Jacobian gives an infinite bound.

    ``estimate``: an :class:`RRobustnessResult` already computed for these points at radius ``r`` (e.g. by a sweep)
    is reused instead of sampling again; ``num_samples``, ``seed`` and ``confidence`` are then taken from it.
    """
    r = check_positive_float("r", r)
    if estimate is None:
        est = estimate_r_robustness(
            model, x, r, num_samples=num_samples, seed=seed, confidence=confidence,
            max_batch_elements=max_batch_elements, point_offset=point_offset,
        )  # fmt: skip
    else:
        est = _column_for(estimate, r, x)
    from vaefast.jacobian import jacobian_frobenius, jacobian_spectral

    x, _, _ = _prepare(model, x, None)
    with torch.no_grad():
        _, logvar = _encode(model, x)
        sigma = torch.exp(0.5 * logvar)
    encoder = model.mean_encoder()
    fro = jacobian_frobenius(encoder, x).detach().to(torch.float64).cpu()
    spec = jacobian_spectral(encoder, x).detach().to(torch.float64).cpu()
    white = jacobian_spectral(encoder, x, row_scale=1.0 / sigma).detach().to(torch.float64).cpu()
    sigma = sigma.to(torch.float64).cpu()
    sigma_min = sigma.min(dim=1).values

    hits, p_hat, ci_low = est.hits[:, 0], est.p_hat[:, 0], est.ci_low[:, 0]
    s = est.num_samples
    certified = 2 * hits > s
    saturated = hits == s
    p_eff = torch.where(saturated, torch.full_like(p_hat, 1.0 - 0.5 / s), p_hat)
    q = torch.from_numpy(sps.norm.ppf(p_eff.numpy())).where(certified, torch.zeros_like(p_hat))
    q_low = torch.from_numpy(sps.norm.ppf(ci_low.numpy())).where(ci_low > 0.5, torch.zeros_like(ci_low))
    latent_margin = sigma_min * q
    return MarginBound(
        bound=_ratio(latent_margin, fro),
        certified_bound=_ratio(sigma_min * q_low, fro),
        spectral_bound=_ratio(latent_margin, spec),
        whitened_bound=_ratio(q, white),
        latent_margin=latent_margin,
        sigma_min=sigma_min,
        jac_frobenius=fro,
        jac_spectral=spec,
        jac_whitened_spectral=white,
        p_hat=p_hat,
        ci_low=ci_low,
        hits=hits,
        certified=certified,
        saturated=saturated,
        r=r,
        num_samples=s,
        confidence=est.confidence,
        point_index=est.point_index,
    )
