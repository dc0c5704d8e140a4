"""r-robustness estimators: Monte-Carlo ``p_r``, the smallest robust radius ``r*``, a sequential r-robustness test,
and the first-order lower bounds on the input-space margin.

Notation: ``z = mu(x + delta) + sigma(x + delta) * eps`` with ``eps ~ N(0, I_d)`` drawn by
:func:`vaefast.ops.reparam_sample` (Philox keyed by ``(seed, point_offset + b, sample index, latent index)``), the
distortion ``||g(z) - g(mu(x))||_2`` between flattened decoder means (the reference is always the *clean* x),
``p_r = P(distortion <= r)``; the model is r-robust at ``(x, delta)`` iff ``p_r > 1/2``.

Streaming: decoder batches hold at most ``max_batch_elements`` output numbers (points x samples x D), chunked by
:func:`vaefast._chunks.chunk_sizes`. Because eps is keyed by global (point, sample) indices, every result is
independent of the chunking. For ``r*`` the S distances of the points of one point chunk are kept
(``point_chunk x S`` floats) and reduced with ``kthvalue`` before the next chunk.

Every entry point is an analysis of a trained model (:func:`vaefast._checks.analysis`): the model runs in eval mode
(dropout off, batch norm on its running statistics) and every submodule's own training flag is restored afterwards;
a model that does not know its input shape yet (an ``as_vae`` adapter built without one) learns it from ``x``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from scipy import stats as sps
from torch import nn

from vaefast import ops
from vaefast._checks import (
    analysis,
    as_radii,
    check_analysis_inputs,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_probability,
    check_seed,
)
from vaefast._chunks import chunk_sizes, spans
from vaefast._memory import check_max_memory
from vaefast._results import ResultMixin
from vaefast.rng import id_runs
from vaefast.stats import (
    clopper_pearson,
    futile,
    largest_decidable_not_robust,
    sequential_decision,
    sequential_schedule,
)

__all__ = [
    "RRobustnessResult",
    "RobustnessDecision",
    "MarginBound",
    "estimate_r_robustness",
    "is_r_robust",
    "margin_bound",
    "DEFAULT_MAX_BATCH_ELEMENTS",
    "DEFAULT_MAX_BATCH_ELEMENTS_CPU",
    "default_max_batch_elements",
]

DEFAULT_MAX_BATCH_ELEMENTS = 2**24  # decoder outputs per batch on a GPU: 64 MB of float32
# On a CPU 8 MB batches run 1.06-1.3x faster (the decoder's intermediates stay in cache and the allocator reuses them
# instead of mapping fresh pages each call; measured: benchmarks/README.md, r-robustness estimator):
DEFAULT_MAX_BATCH_ELEMENTS_CPU = 2**21


# --- results ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RRobustnessResult(ResultMixin):
    """Monte-Carlo r-robustness of ``B`` points at ``K`` radii from ``S = num_samples`` samples each.

    Attributes:
        p_hat: ``[B, K]`` ``hits / S``, the estimate of ``p_r(x, delta)``.
        ci_low, ci_high: ``[B, K]`` the two-sided Clopper–Pearson interval of ``p_hat`` at ``confidence``.
        hits: ``[B, K]`` int64 ``#{s : ||Delta_s|| <= radii[k]}``.
        num_samples: ``S``.
        robust: ``[B, K]`` ``p_hat > 1/2``.
        r_star: ``[B]`` ``d_(floor(S/2)+1)``, the smallest radius with ``p_hat_r > 1/2`` (sorted distances ``d``).
        radii: ``[K]`` float64, in the order asked.
        confidence: the interval's confidence.
        point_index: ``[B]`` the global point ids keying the random numbers.
        source: what it estimated: :func:`estimate_source` of the model, the points and the perturbation (a reused
            estimate is checked against it by :func:`column_for`); None for results built by hand.
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
    source: str | None = None

    def to_rows(self) -> list[dict[str, Any]]:
        """Plain-Python rows.

        Returns:
            One dict per (point, radius), points outer: ``point, r, hits, num_samples, p_hat, ci_low, ci_high,
            robust, r_star``.
        """
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
    """Outcome of the sequential test of ``p_r(x, delta) > 1/2`` for ``B`` points.

    Attributes:
        robust: ``[B]`` the decision (``p_hat > 1/2`` where undecided).
        decided: ``[B]`` whether the confidence bound excluded 1/2 before ``max_samples``.
        samples_used: ``[B]`` int64 samples drawn for the point.
        p_hat: ``[B]`` ``hits / samples_used``.
        hits: ``[B]`` int64 samples within the radius.
        r: the radius.
        confidence: the family-wise confidence of the decisions.
        point_index: ``[B]`` the global point ids keying the random numbers.
    """

    robust: torch.Tensor
    decided: torch.Tensor
    samples_used: torch.Tensor
    p_hat: torch.Tensor
    hits: torch.Tensor
    r: float
    confidence: float
    point_index: torch.Tensor

    def to_rows(self) -> list[dict[str, Any]]:
        """Plain-Python rows.

        Returns:
            One dict per point: ``point, r, robust, decided, samples_used, hits, p_hat``.
        """
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
    """First-order lower bounds on the margin ``R^r_X(x)`` of ``B`` points and their components.

    With ``q = Phi^-1(p_hat)`` (``p_hat = p_hat_r(x, 0)``) and ``sigma_min = min_i sigma(x)_i``. The Jacobian norms
    are exact (``jac_method`` "fused" or "exact") or randomized (:func:`vaefast.jacobian.jacobian_norms`): then
    ``jac_frobenius`` is an estimate, and ``jac_frobenius_upper``, ``jac_spectral`` and ``jac_whitened_spectral`` are
    upper confidence limits that hold together with probability ``>= jac_confidence`` (equal to the exact norms
    otherwise).

    Attributes:
        bound: ``[B]`` ``sigma_min q / ||J_mu(x)||_F`` (the paper's bound; with a randomized ``||J||_F`` an estimate
            of it).
        certified_bound: ``[B]`` ``sigma_min Phi^-1(ci_low) / jac_frobenius_upper`` (0 where ``ci_low <= 1/2``):
            with the one-sided ``ci_low`` at level ``(1 - confidence) / 2`` and ``jac_confidence = (1 + confidence) /
            2``, both parts hold together with probability ``>= confidence`` (still a first-order bound).
        spectral_bound: ``[B]`` ``sigma_min q / jac_spectral``.
        whitened_bound: ``[B]`` ``q / jac_whitened_spectral``.
        latent_margin: ``[B]`` ``sigma_min q``.
        sigma_min: ``[B]`` the smallest encoder standard deviation.
        jac_frobenius: ``[B]`` ``||J_mu(x)||_F``, exact or estimated.
        jac_frobenius_upper: ``[B]`` its upper confidence limit (= ``jac_frobenius`` when exact).
        jac_spectral: ``[B]`` ``||J_mu(x)||_2``, exact or its upper confidence limit.
        jac_whitened_spectral: ``[B]`` ``||diag(sigma(x))^-1 J_mu(x)||_2``, exact or its upper confidence limit.
        p_hat, ci_low, hits: ``[B]`` the clean estimate the bounds use.
        certified: ``[B]`` ``p_hat > 1/2`` (all bounds are 0 elsewhere).
        saturated: ``[B]`` ``p_hat = 1``, where ``q`` uses the half-count rule ``p_hat -> 1 - 1/(2S)``.
        r, num_samples, confidence: the settings; ``point_index``: the global point ids.
        jac_method: "fused", "exact" or "randomized".
        jac_confidence: the probability that the Jacobian limits hold (1.0 when exact).
    """

    bound: torch.Tensor
    certified_bound: torch.Tensor
    spectral_bound: torch.Tensor
    whitened_bound: torch.Tensor
    latent_margin: torch.Tensor
    sigma_min: torch.Tensor
    jac_frobenius: torch.Tensor
    jac_frobenius_upper: torch.Tensor
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
    jac_method: str = "exact"
    jac_confidence: float = 1.0

    _PER_POINT = (
        "bound", "certified_bound", "spectral_bound", "whitened_bound", "latent_margin", "sigma_min",
        "jac_frobenius", "jac_frobenius_upper", "jac_spectral", "jac_whitened_spectral", "p_hat", "ci_low", "hits",
        "certified", "saturated",
    )  # fmt: skip

    def to_rows(self) -> list[dict[str, Any]]:
        """Plain-Python rows.

        Returns:
            One dict per point: ``point, r, num_samples, jac_method, jac_confidence`` and every per-point attribute.
        """
        rows = []
        for b in range(len(self)):
            row: dict[str, Any] = {"point": int(self.point_index[b]), "r": self.r, "num_samples": self.num_samples}
            row.update(jac_method=self.jac_method, jac_confidence=self.jac_confidence)
            for name in self._PER_POINT:
                row[name] = getattr(self, name)[b].item()
            rows.append(row)
        return rows


# --- sampling and counting -------------------------------------------------------------------------------------------
def default_max_batch_elements(device: torch.device | str) -> int:
    """The default decoder batch bound on a device.

    Args:
        device: where the decoder runs.

    Returns:
        Output numbers per decoder call: ``DEFAULT_MAX_BATCH_ELEMENTS_CPU`` (2**21) on a CPU, else
        ``DEFAULT_MAX_BATCH_ELEMENTS`` (2**24).
    """
    cpu = torch.device(device).type == "cpu"
    return DEFAULT_MAX_BATCH_ELEMENTS_CPU if cpu else DEFAULT_MAX_BATCH_ELEMENTS


def _check_max_batch_elements(value: int | None, device: torch.device) -> int:
    """The decoder batch bound (output numbers per decoder call); ``None`` is the device's default."""
    return default_max_batch_elements(device) if value is None else check_positive_int("max_batch_elements", value)


@dataclasses.dataclass(frozen=True)
class _Draw:
    """Samples ``start .. start + count - 1`` of every point on the stream ``seed``, ``chunk`` samples per decode,
    decoded at ``precision`` (None, "bf16" or "tf32": :func:`_decoder_precision`)."""

    seed: int
    start: int
    count: int
    chunk: int
    precision: str | None = None


AUTOCAST_MODES = ("bf16", "tf32")


def _check_autocast(autocast: object, device: torch.device) -> str | None:
    """``autocast`` checked: None, "bf16" (any device) or "tf32" (CUDA only)."""
    if autocast is None:
        return None
    if autocast not in AUTOCAST_MODES:
        raise ValueError(f"autocast must be None or one of {AUTOCAST_MODES}, got {autocast!r}")
    if autocast == "tf32" and device.type != "cuda":
        raise ValueError(
            f"autocast='tf32' needs a CUDA device (TF32 is a tensor-core matmul mode), the model is on {device}; "
            "use autocast='bf16' on the CPU"
        )
    return autocast


@contextlib.contextmanager
def _decoder_precision(precision: str | None, device: torch.device) -> Iterator[None]:
    """The decoder's reduced precision: "bf16" runs it under ``torch.autocast(device, torch.bfloat16)``, "tf32"
    lets float32 matmuls use TF32 (``torch.backends.cuda.matmul.allow_tf32`` and cuDNN's, restored afterwards)."""
    if precision is None:
        yield
    elif precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _encode(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.encode(x)``, checked to be ``(mu, logvar)`` of shape ``[B, d]``."""
    mu, logvar = model.encode(x)
    if mu.dim() != 2 or logvar.shape != mu.shape or mu.shape[0] != x.shape[0]:
        raise ValueError(
            f"model.encode must return mu, logvar of shape [B, d], got {tuple(mu.shape)}, {tuple(logvar.shape)}"
        )
    return mu, logvar


def _posterior_and_center(
    model: Any, x: torch.Tensor, delta: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mu, logvar)`` of ``q(z | x + delta)`` and the flattened reference reconstruction ``g(mu(x))`` ``[B, D]``."""
    mu, logvar = _encode(model, x)
    center = model.decode(mu).reshape(x.shape[0], -1)
    if delta is not None:
        mu, logvar = _encode(model, x + delta)
    return mu, logvar, center


def _sample(mu: torch.Tensor, logvar: torch.Tensor, ids: torch.Tensor, num: int, seed: int, start: int) -> torch.Tensor:
    """``z[b, s] = mu[b] + sigma[b] * eps(seed, ids[b], start + s)`` for arbitrary global ids ``[B, num, d]``."""
    mu, logvar = mu.contiguous(), logvar.contiguous()  # e.g. halves of one Linear's output
    parts = [
        ops.reparam_sample(mu[p : p + n], logvar[p : p + n], num, seed=seed, offset=first, sample_offset=start)
        for p, n, first in id_runs(ids)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def _count_hits(
    model: Any,
    posterior: tuple[torch.Tensor, torch.Tensor],
    center: torch.Tensor,
    radii: torch.Tensor,
    ids: torch.Tensor,
    draw: _Draw,
    keep_distances: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hits ``[b, K]`` (int64) of the samples ``draw`` for one point chunk, and their distances ``[b, count]``.

    ``hits[b, k] = #{s : ||g(z_bs) - center_b||_2 <= radii[k]}`` (radii float64, any order); the distances (float32,
    float64 for a float64 decoder) only with ``keep_distances``.
    """
    mu, logvar = posterior
    b, d = mu.shape
    hits = torch.zeros(b, radii.shape[0], dtype=torch.int64, device=mu.device)
    dist_dtype = torch.float64 if center.dtype == torch.float64 else torch.float32  # sphere_hits distance dtype
    dist = torch.empty(b, draw.count, dtype=dist_dtype, device=mu.device) if keep_distances else None
    for s0, s1 in spans(draw.count, draw.chunk):
        z = _sample(mu, logvar, ids, s1 - s0, draw.seed, draw.start + s0)
        with _decoder_precision(draw.precision, z.device):
            y = model.decode(z.reshape(b * (s1 - s0), d)).reshape(b, s1 - s0, -1)
        y = y.to(center.dtype)  # distances accumulate in the model's own precision (float32 under bf16 autocast)
        if keep_distances:
            h, dist[:, s0:s1] = ops.sphere_hits(y, center, radii, return_distances=True)  # type: ignore[index]
        else:
            h = ops.sphere_hits(y, center, radii)
        hits += h
    return hits, dist


# --- the estimator ---------------------------------------------------------------------------------------------------
def _estimate(
    model: Any,
    x: torch.Tensor,
    delta: torch.Tensor | None,
    radii: torch.Tensor,
    ids: torch.Tensor,
    num_samples: int,
    seed: int,
    max_elements: int,
    progress: bool,
    precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hits ``[B, K]`` and ``r* [B]`` (CPU) of all points, point chunk by point chunk."""
    num_points = x.shape[0]
    point_chunk, sample_chunk = chunk_sizes(num_points, num_samples, x[0].numel(), max_elements)
    draw = _Draw(seed, 0, num_samples, sample_chunk, precision)
    radii_dev = radii.to(x.device)  # compared in float64 with the distances (float32 for float32 decoders)
    hits = torch.empty(num_points, radii.shape[0], dtype=torch.int64)
    r_star = torch.empty(num_points, dtype=torch.float64)
    chunks = spans(num_points, point_chunk)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, total=math.ceil(num_points / point_chunk), desc="r-robustness", unit="chunk")
    with torch.no_grad():
        for b0, b1 in chunks:
            mu, logvar, center = _posterior_and_center(model, x[b0:b1], None if delta is None else delta[b0:b1])
            h, dist = _count_hits(model, (mu, logvar), center, radii_dev, ids[b0:b1], draw, True)
            hits[b0:b1] = h.cpu()
            r_star[b0:b1] = dist.kthvalue(num_samples // 2 + 1, dim=1).values.to(torch.float64).cpu()  # type: ignore[union-attr]
    return hits, r_star


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
    autocast: str | None = None,
) -> RRobustnessResult:
    """Monte-Carlo r-robustness of ``model`` at ``x`` (optionally perturbed by ``delta``) for every radius.

    ``z_s ~ q(z | x + delta)``, ``d_s = ||g(z_s) - g(mu(x))||_2`` (s = 1..S); per radius ``p_hat = #{d_s <= r} / S``
    with a two-sided Clopper–Pearson interval, ``robust = p_hat > 1/2``; ``r_star = d_(floor(S/2)+1)``.

    Args:
        model: a protocol model (run in eval mode; the caller's modes are restored).
        x: ``[B, *input_shape]`` on the model's device; cast to the model's parameter dtype.
        radii: one radius or a sequence (any order), all finite and ``> 0``.
        num_samples: ``S``.
        delta: None, one perturbation ``[*input_shape]`` for all points, or ``[B, *input_shape]``.
        seed: the Monte-Carlo stream.
        confidence: of the Clopper–Pearson interval.
        max_batch_elements: decoder outputs per decoder call (default :func:`default_max_batch_elements`: 2**21 on a
            CPU, 2**24 on a GPU). The samples are bit-identical for any
            value, so hits are too; r* differs at most by the decoder's own batch-size-dependent rounding.
        point_offset: point ``b`` uses the RNG key ``point_offset + b`` (the global index when a data set is split
            across calls).
        progress: a tqdm bar over point chunks.
        autocast: None (full precision), "bf16" (the decoder forward of the samples under
            ``torch.autocast(..., torch.bfloat16)``, on the CPU or CUDA) or "tf32" (float32 matmuls of the decoder in
            TF32; CUDA only, a ``ValueError`` elsewhere). The reference ``g(mu(x))`` stays in full precision and the
            reconstructions are cast back to the model's dtype before the distances, which accumulate in float32
            (float64 models are not affected by autocast). An opt-in speed trade: hits can differ from full
            precision for samples within rounding of a radius.

    Returns:
        An :class:`RRobustnessResult`; distances are float32 (float64 for float64 models).
    """
    radii_t = as_radii("radii", radii)
    num_samples = check_positive_int("num_samples", num_samples)
    seed = check_seed("seed", seed)
    confidence = check_probability("confidence", confidence)
    point_offset = check_seed("point_offset", point_offset)
    x, delta, _ = check_analysis_inputs(model, x, delta)
    max_elements = _check_max_batch_elements(max_batch_elements, x.device)
    precision = _check_autocast(autocast, x.device)
    ids = torch.arange(point_offset, point_offset + x.shape[0], dtype=torch.int64)
    hits, r_star = _estimate(model, x, delta, radii_t, ids, num_samples, seed, max_elements, progress, precision)
    low, high = clopper_pearson(hits, num_samples, confidence)
    return RRobustnessResult(
        source=estimate_source(model, x, delta),
        p_hat=hits.to(torch.float64) / num_samples,
        ci_low=low,
        ci_high=high,
        hits=hits,
        num_samples=num_samples,
        robust=2 * hits > num_samples,
        r_star=r_star,
        radii=radii_t,
        confidence=confidence,
        point_index=ids,
    )


# --- the sequential test ---------------------------------------------------------------------------------------------
def _round_hits(
    model: Any,
    posterior: tuple[torch.Tensor, torch.Tensor],
    center: torch.Tensor,
    radius: torch.Tensor,
    ids: torch.Tensor,
    active: torch.Tensor,
    draw: _Draw,
    max_elements: int,
) -> torch.Tensor:
    """Hits ``[len(active)]`` (CPU) of one round's samples ``draw`` for the still undecided points ``active``.

    Points and samples are chunked anew for the round's size (``draw.chunk`` is replaced).
    """
    mu, logvar = posterior
    point_chunk, sample_chunk = chunk_sizes(active.shape[0], draw.count, center.shape[1], max_elements)
    draw = dataclasses.replace(draw, chunk=sample_chunk)
    out = torch.empty(active.shape[0], dtype=torch.int64)
    for c0, c1 in spans(active.shape[0], point_chunk):
        idx = active[c0:c1]
        dev = idx.to(mu.device)
        h, _ = _count_hits(model, (mu[dev], logvar[dev]), center[dev], radius, ids[idx], draw, False)
        out[c0:c1] = h[:, 0].cpu()
    return out


def _sequential(
    model: Any, x: torch.Tensor, delta: torch.Tensor | None, r: float, ids: torch.Tensor, schedule: list[int],
    round_alpha: float, seed: int, max_elements: int, futility: float | None = None, precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(hits, used, decided, robust)`` per point (CPU) after the rounds of ``schedule`` (cumulative sizes); with
    ``futility`` a point also stops, undecided, once :func:`vaefast.stats.futile` says the last round could not
    plausibly decide it not robust."""
    n = x.shape[0]
    hits, used = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)
    decided, robust = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    active, done = torch.arange(n), 0
    threshold = None if futility is None else largest_decidable_not_robust(schedule[-1], round_alpha)
    with torch.no_grad():
        mu, logvar, center = _posterior_and_center(model, x, delta)
        radius = torch.tensor([r], dtype=torch.float64, device=center.device)
        for total in schedule:
            draw = _Draw(seed, start=done, count=total - done, chunk=total - done, precision=precision)
            hits[active] += _round_hits(model, (mu, logvar), center, radius, ids, active, draw, max_elements)
            used[active] = total
            yes, no = sequential_decision(hits[active], total, round_alpha)
            decided[active] = yes | no
            robust[active[yes]] = True
            stop = yes | no
            if threshold is not None:
                stop = stop | futile(hits[active], total, futility, threshold)
            active, done = active[~stop], total
            if active.numel() == 0:
                break
    return hits, used, decided, robust


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
    futility: float | None = None,
    autocast: str | None = None,
) -> RobustnessDecision:
    """Decide ``p_r(x, delta) > 1/2`` per point with a group-sequential Clopper–Pearson test (:mod:`vaefast.stats`).

    Rounds reach 32, 64, 128, ... (capped at ``max_samples``) samples per point; after round j of J a point is decided
    robust if the one-sided CP lower limit at level ``(1 - confidence) / J`` exceeds 1/2, not robust if the upper one
    is ``<= 1/2``; only undecided points draw more samples. By Bonferroni the probability of a wrong decision is
    ``<= 1 - confidence`` for every point.

    Args:
        model: a protocol model (run in eval mode; the caller's modes are restored).
        x: ``[B, *input_shape]`` on the model's device.
        r: the radius (finite, ``> 0``).
        delta: None, one perturbation ``[*input_shape]`` for all points, or ``[B, *input_shape]``.
        confidence: the family-wise confidence of each point's decision.
        max_samples: the most samples per point.
        seed, point_offset: sample s of point b is the same draw as in :func:`estimate_r_robustness` with the same
            seed and point_offset, so ``p_hat`` equals the fixed-S estimate with ``S = samples_used``.
        max_batch_elements: decoder outputs per decoder call (default :func:`default_max_batch_elements`).
        futility: None, or a level ``beta`` in (0, 1): a point also stops, undecided, once its one-sided CP lower
            limit at ``beta`` exceeds the largest ``p_hat`` the last round could decide not robust
            (:func:`vaefast.stats.futile`). For callers that only need evidence of non-robustness (the margin
            search): every not-robust decision is still one the test without futility makes, on the same samples.
        autocast: None, "bf16" or "tf32": the samples' decoder precision (see :func:`estimate_r_robustness`).

    Returns:
        A :class:`RobustnessDecision`; points still undecided at ``max_samples`` (or stopped for futility) get
        ``decided = False`` and ``robust = p_hat > 1/2``.
    """
    r = check_positive_float("r", r)
    confidence = check_probability("confidence", confidence)
    max_samples = check_positive_int("max_samples", max_samples)
    seed = check_seed("seed", seed)
    point_offset = check_seed("point_offset", point_offset)
    x, delta, _ = check_analysis_inputs(model, x, delta)
    max_elements = _check_max_batch_elements(max_batch_elements, x.device)
    schedule = sequential_schedule(max_samples)
    ids = torch.arange(point_offset, point_offset + x.shape[0], dtype=torch.int64)
    round_alpha = (1.0 - confidence) / len(schedule)
    if futility is not None:
        futility = check_probability("futility", futility)
    precision = _check_autocast(autocast, x.device)
    hits, used, decided, robust = _sequential(
        model, x, delta, r, ids, schedule, round_alpha, seed, max_elements, futility, precision
    )
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
        point_index=ids,
    )


# --- the margin bound ------------------------------------------------------------------------------------------------
def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with ``0 / 0 = 0`` (no certificate stays 0 even for a constant encoder)."""
    return torch.where(num == 0, torch.zeros_like(num), num / den)


def estimate_source(model: Any, x: torch.Tensor, delta: torch.Tensor | None = None) -> str:
    """The identity of an estimate's inputs: a digest of the model's weights, the points and the perturbation
    (:mod:`vaefast._digest`).

    Args:
        model: the model.
        x: the (validated) points.
        delta: the (validated) perturbation, or None for the clean points.

    Returns:
        ``"<model digest>:<points and delta digest>"``.
    """
    from vaefast._digest import model_digest, tensor_digest

    return f"{model_digest(model)}:{tensor_digest([x, delta])}"


def column_for(
    estimate: object, r: float, x: object, *, model: Any = None, delta: torch.Tensor | None = None
) -> RRobustnessResult:
    """The single-radius view of a reused ``estimate`` at radius ``r``, checked against what it must describe.

    Args:
        estimate: an :class:`RRobustnessResult` with a column for ``r``.
        r: the radius.
        x: the (validated) points it must cover.
        model: the model it must have estimated; with it (and an estimate that records its ``source``) the model,
            the points and ``delta`` are checked against the estimate's digest.
        delta: the (validated) perturbation it must have been computed at (None: the clean points).

    Returns:
        ``estimate`` restricted to radius ``r`` (``K = 1``).

    Raises:
        TypeError / ValueError: naming ``estimate`` (another type, no column for ``r``, another number of points, or
        computed for another model, other points or another perturbation).
    """
    if not isinstance(estimate, RRobustnessResult):
        raise TypeError(f"estimate must be an RRobustnessResult, got {type(estimate).__name__}")
    match = (estimate.radii == r).nonzero().flatten()
    if match.numel() == 0:
        raise ValueError(f"estimate has no column for r={r} (radii {estimate.radii.tolist()})")
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] != len(estimate):
        raise ValueError(f"estimate covers {len(estimate)} points but x has {x.shape[0]}")
    if model is not None and estimate.source is not None and isinstance(x, torch.Tensor):
        if estimate_source(model, x, delta) != estimate.source:
            raise ValueError(
                "estimate was computed for another model, other points or another delta than the ones given "
                "(its digest differs): pass the estimate of exactly these inputs, or none"
            )
    k = slice(int(match[0]), int(match[0]) + 1)
    return dataclasses.replace(
        estimate,
        p_hat=estimate.p_hat[:, k],
        ci_low=estimate.ci_low[:, k],
        ci_high=estimate.ci_high[:, k],
        hits=estimate.hits[:, k],
        robust=estimate.robust[:, k],
        radii=estimate.radii[k],
    )


def _encoder_geometry(
    model: Any, x: torch.Tensor, jacobian: str, confidence: float, seed: int, point_offset: int, max_memory: int | None
) -> tuple[dict[str, torch.Tensor], str, float]:
    """Per point (float64, CPU): ``sigma_min`` and the Jacobian norms the bounds use (:func:`vaefast.jacobian.
    jacobian_norms`: exact, or randomized with upper limits at ``confidence``), the norms' method and confidence."""
    from vaefast.jacobian import jacobian_norms

    with torch.no_grad():
        sigma = torch.exp(0.5 * _encode(model, x)[1])
    norms = jacobian_norms(
        model.mean_encoder(), x, 1.0 / sigma, method=jacobian, confidence=confidence, seed=seed,
        point_offset=point_offset, max_memory=max_memory,
    )  # fmt: skip
    geometry = {
        "sigma_min": sigma.detach().to(torch.float64).cpu().min(dim=1).values,
        "jac_frobenius": norms.frobenius,
        "jac_frobenius_upper": norms.frobenius_upper,
        "jac_spectral": norms.spectral_upper,
        "jac_whitened_spectral": norms.whitened_spectral_upper,
    }
    return geometry, norms.method, norms.confidence


def _bounds(est: RRobustnessResult, geometry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The bounds of :class:`MarginBound` from a single-radius estimate and the encoder's geometry."""
    hits, p_hat, ci_low = est.hits[:, 0], est.p_hat[:, 0], est.ci_low[:, 0]
    s = est.num_samples
    certified, saturated = 2 * hits > s, hits == s
    p_eff = torch.where(saturated, torch.full_like(p_hat, 1.0 - 0.5 / s), p_hat)
    q = torch.from_numpy(sps.norm.ppf(p_eff.numpy())).where(certified, torch.zeros_like(p_hat))
    q_low = torch.from_numpy(sps.norm.ppf(ci_low.numpy())).where(ci_low > 0.5, torch.zeros_like(ci_low))
    sigma_min, fro = geometry["sigma_min"], geometry["jac_frobenius"]
    latent_margin = sigma_min * q
    return {
        "bound": _ratio(latent_margin, fro),
        "certified_bound": _ratio(sigma_min * q_low, geometry["jac_frobenius_upper"]),
        "spectral_bound": _ratio(latent_margin, geometry["jac_spectral"]),
        "whitened_bound": _ratio(q, geometry["jac_whitened_spectral"]),
        "latent_margin": latent_margin,
        **geometry,
        "p_hat": p_hat,
        "ci_low": ci_low,
        "hits": hits,
        "certified": certified,
        "saturated": saturated,
    }


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
    autocast: str | None = None,
    *,
    jacobian: str = "auto",
    max_memory: int | None = None,
) -> MarginBound:
    """First-order lower bounds on the input-space margin ``R^r_X(x)`` from ``p_hat = p_hat_r(x, 0)``.

    - ``latent_margin = sigma_min * Phi^-1(p_hat)``, ``sigma_min = min_i sigma(x)_i``;
    - ``bound = latent_margin / ||J_mu(x)||_F`` (the paper's bound);
    - ``spectral_bound = latent_margin / ||J_mu(x)||_2`` (>= bound when exact);
    - ``whitened_bound = Phi^-1(p_hat) / ||diag(sigma(x))^-1 J_mu(x)||_2`` (>= spectral_bound when exact);
    - ``certified_bound = sigma_min * Phi^-1(ci_low) / U_F`` with the two-sided Clopper–Pearson lower limit
      ``ci_low`` and ``U_F`` the upper confidence limit of ``||J||_F`` at ``(1 + confidence) / 2`` (``||J||_F``
      itself when exact): both hold together with probability ``>= confidence``; still a first-order bound; 0 when
      ``ci_low <= 1/2``.

    With a randomized Jacobian (``jacobian="randomized"``, or "auto" at a large latent size) ``bound`` uses the
    unbiased estimate of ``||J||_F^2`` and the spectral and whitened bounds the norms' upper confidence limits (never
    the Lanczos estimate, which is low): :class:`MarginBound` says which.

    Where ``p_hat <= 1/2`` there is no certificate: ``certified = False`` and all bounds are 0. ``p_hat = 1`` would
    make ``Phi^-1`` infinite although only ``p >= ci_low`` is known; there the point bounds use the half-count rule
    ``p_hat -> 1 - 1/(2S)`` and ``saturated = True`` flags it. A zero Jacobian gives an infinite bound.

    Args:
        model: a protocol model with ``mean_encoder`` (run in eval mode; the caller's modes are restored).
        x: ``[B, *input_shape]`` on the model's device.
        r: the reconstruction radius.
        num_samples, seed, confidence, point_offset, max_batch_elements: of the clean estimate
            (:func:`estimate_r_robustness`).
        estimate: an :class:`RRobustnessResult` already computed for these points at radius ``r`` (e.g. by a
            sweep), reused instead of sampling again; ``num_samples``, ``seed`` and ``confidence`` are then its own.
        autocast: the decoder precision of the clean estimate when it is computed here (see
            :func:`estimate_r_robustness`); the encoder geometry is always in full precision.
        jacobian: "auto" (exact for an MLP the fused op reads or a latent size ``d <= 128``, else randomized),
            "exact" or "randomized" (:func:`vaefast.jacobian.jacobian_norms`; its random numbers are keyed by
            ``seed`` and the global point ids ``point_offset + b``).
        max_memory: the memory budget of the Jacobian in bytes (None: the device's default).

    Returns:
        A :class:`MarginBound`.
    """
    from vaefast.jacobian import NORM_METHODS, check_jacobian_memory

    r = check_positive_float("r", r)
    check_choice("jacobian", jacobian, NORM_METHODS)
    x, _, _ = check_analysis_inputs(model, x, requires=("mean_encoder",))
    max_memory = check_max_memory(max_memory, x.device)
    check_jacobian_memory(model.mean_encoder(), x, method=jacobian, max_memory=max_memory)  # before any work
    if estimate is None:
        est = estimate_r_robustness(
            model, x, r, num_samples=num_samples, seed=seed, confidence=confidence,
            max_batch_elements=max_batch_elements, point_offset=point_offset, autocast=autocast,
        )  # fmt: skip
    else:
        est = column_for(estimate, r, x, model=model)
    jac_conf = (1.0 + est.confidence) / 2
    geometry, method, jac_conf = _encoder_geometry(model, x, jacobian, jac_conf, seed, point_offset, max_memory)
    return MarginBound(
        **_bounds(est, geometry),
        r=r,
        num_samples=est.num_samples,
        confidence=est.confidence,
        point_index=est.point_index,
        jac_method=method,
        jac_confidence=jac_conf,
    )
