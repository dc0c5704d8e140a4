"""r-robustness estimators: Monte-Carlo ``p_r``, the smallest robust radius ``r*``, a sequential r-robustness test,
and the first-order lower bounds on the input-space margin.

Notation: ``z = mu(x + delta) + sigma(x + delta) * eps`` with ``eps ~ N(0, I_d)`` drawn by
:func:`vaefast.ops.reparam_sample` (Philox keyed by ``(seed, point_offset + b, sample index, latent index)``), the
distortion ``||g(z) - g(mu(x))||_2`` between flattened decoder means (the reference is always the *clean* x),
``p_r = P(distortion <= r)``; the model is r-robust at ``(x, delta)`` iff ``p_r > 1/2``.

Every function here validates its inputs once, runs the model in eval mode once, and calls the internal core
(:mod:`vaefast.core`: encoding, sampling and counting, decisions) on the validated tensors. Memory: decoder batches and
stored distances are derived from one budget, ``max_memory`` (:mod:`vaefast._memory`); because eps is keyed by global
(point, sample) indices, every result is independent of the chunking.

Every entry point is an analysis of a trained model (:func:`vaefast._checks.analysis`): the model runs in eval mode
(dropout off, batch norm on its running statistics) and every submodule's own training flag is restored afterwards;
a model that does not know its input shape yet (an ``as_vae`` adapter built without one) learns it from ``x``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from scipy import stats as sps
from torch import nn

from vaefast._checks import (
    analysis,
    as_radii,
    check_analysis_inputs,
    check_choice,
    check_num_samples,
    check_positive_float,
    check_probability,
    check_seed,
)
from vaefast._chunks import spans
from vaefast._memory import check_max_memory
from vaefast._progress import progress_bar
from vaefast._results import ResultMixin
from vaefast.core.decide import ROBUST, Rule, clean_decision, decide
from vaefast.core.encoding import Encoding, encode, posterior
from vaefast.core.options import AUTOCAST_MODES, DEFAULT_CONFIDENCE, DEFAULT_NUM_SAMPLES
from vaefast.core.sampling import Sampler
from vaefast.stats import clopper_pearson, clopper_pearson_one_sided

_DECISION_NAMES = {1: "robust", -1: "not robust", 0: "undecided"}

__all__ = [
    "RRobustnessResult",
    "RobustnessDecision",
    "MarginBound",
    "estimate_r_robustness",
    "is_r_robust",
    "margin_bound",
    "column_for",
    "estimate_source",
]


# --- results ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(repr=False)
class RRobustnessResult(ResultMixin):
    """Monte-Carlo r-robustness of ``B`` points at ``K`` radii from ``S = num_samples`` samples each.

    Attributes:
        p_hat: ``[B, K]`` ``hits / S``, the estimate of ``p_r(x, delta)``.
        ci_low, ci_high: ``[B, K]`` the two-sided Clopper–Pearson interval of ``p_hat`` at ``confidence``.
        hits: ``[B, K]`` int64 ``#{s : ||Delta_s|| <= radii[k]}``.
        num_samples: ``S``.
        robust: ``[B, K]`` ``p_hat > 1/2`` (the point estimate).
        decision: ``[B, K]`` int8, the three-way decision at ``confidence``
            (:func:`vaefast.core.decide.clean_decision`): 1 robust (the one-sided Clopper–Pearson lower limit exceeds
            1/2), -1 not robust (the upper limit is ``<= 1/2``), 0 undecided.
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
    decision: torch.Tensor
    r_star: torch.Tensor
    radii: torch.Tensor
    confidence: float
    point_index: torch.Tensor
    source: str | None = None

    _SHOW = ("point", "r", "hits", "num_samples", "p_hat", "ci_low", "ci_high", "decision", "r_star")

    def r_star_quantiles(self, quantiles: tuple[float, ...] = (0.25, 0.5, 0.75)) -> dict[float, float]:
        """Quantiles of the points' smallest robust radii r*: a point is r-robust exactly when r exceeds its r*, so
        the interesting radii lie between the quartiles (``vaefast.auto_radii`` picks a study's radii this way).

        Args:
            quantiles: in [0, 1].

        Returns:
            ``{q: quantile of r*}``.
        """
        q = torch.tensor([float(v) for v in quantiles], dtype=torch.float64, device=self.r_star.device)
        return dict(zip([float(v) for v in quantiles], torch.quantile(self.r_star.double(), q).tolist(), strict=True))

    def counts(self) -> dict[str, int]:
        """Items (point, radius) decided robust, not robust and undecided at ``confidence``."""
        d = self.decision
        return {"radii": int(self.radii.shape[0]), "robust": int((d == 1).sum()), "not robust": int((d == -1).sum()),
                "undecided": int((d == 0).sum())}  # fmt: skip

    def to_rows(self) -> list[dict[str, Any]]:
        """Plain-Python rows.

        Returns:
            One dict per (point, radius), points outer: ``point, r, hits, num_samples, p_hat, ci_low, ci_high,
            robust, decision, r_star``.
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
                        "decision": _DECISION_NAMES[int(self.decision[b, k])],
                        "r_star": float(self.r_star[b]),
                    }
                )
        return rows


@dataclasses.dataclass(repr=False)
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

    _SHOW = ("point", "r", "robust", "decided", "samples_used", "hits", "p_hat")

    def counts(self) -> dict[str, int]:
        """Points decided robust, decided not robust and undecided."""
        decided = self.decided
        return {"decided robust": int((decided & self.robust).sum()), "decided not robust":
                int((decided & ~self.robust).sum()), "undecided": int((~decided).sum())}  # fmt: skip

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


@dataclasses.dataclass(repr=False)
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
        certified_bound: ``[B]`` ``sigma_min Phi^-1(p_low) / jac_frobenius_upper`` with exact norms (``p_low``
            the one-sided Clopper–Pearson lower limit at ``confidence``: positive exactly where ``certified``); with
            randomized norms ``ci_low`` (one-sided at ``(1 - confidence) / 2``) in place of ``p_low`` and
            ``jac_confidence = (1 + confidence) / 2``, so both parts hold together with probability
            ``>= confidence``. Still a first-order bound.
        spectral_bound: ``[B]`` ``sigma_min q / jac_spectral``.
        whitened_bound: ``[B]`` ``q / jac_whitened_spectral``.
        latent_margin: ``[B]`` ``sigma_min q``.
        sigma_min: ``[B]`` the smallest encoder standard deviation.
        jac_frobenius: ``[B]`` ``||J_mu(x)||_F``, exact or estimated.
        jac_frobenius_upper: ``[B]`` its upper confidence limit (= ``jac_frobenius`` when exact).
        jac_spectral: ``[B]`` ``||J_mu(x)||_2``, exact or its upper confidence limit.
        jac_whitened_spectral: ``[B]`` ``||diag(sigma(x))^-1 J_mu(x)||_2``, exact or its upper confidence limit.
        p_hat, ci_low, hits: ``[B]`` the clean estimate the bounds use (``ci_low``: its two-sided interval's).
        p_low: ``[B]`` the one-sided Clopper–Pearson lower limit of ``p_r(x, 0)`` at ``confidence``.
        decision: ``[B]`` int8, the three-way clean decision (1 robust, -1 not robust, 0 undecided).
        certified: ``[B]`` decided robust (``p_low > 1/2``): the one clean-point decision shared with the numerical
            margin and the certificates. All bounds are 0 elsewhere (undecided points are never compared).
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
    p_low: torch.Tensor
    hits: torch.Tensor
    decision: torch.Tensor
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
        "jac_frobenius", "jac_frobenius_upper", "jac_spectral", "jac_whitened_spectral", "p_hat", "ci_low", "p_low",
        "hits", "decision",
        "certified", "saturated",
    )  # fmt: skip
    _SHOW = ("point", "r", "p_hat", "p_low", "certified", "sigma_min", "jac_frobenius", "bound", "whitened_bound")

    def counts(self) -> dict[str, int]:
        """Points certified (decided robust), not robust and undecided."""
        d = self.decision
        return {"certified": int((d == 1).sum()), "not robust": int((d == -1).sum()), "undecided": int((d == 0).sum())}

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


# --- the estimator ---------------------------------------------------------------------------------------------------
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


def _check_request(num_samples: int, x: torch.Tensor, max_memory: int | None) -> int:
    """The memory budget of a request of ``num_samples`` (checked: the sample index is a 32-bit counter).

    Returns:
        The budget in bytes (:func:`vaefast._memory.check_max_memory`).
    """
    from vaefast._memory import check_max_memory

    check_num_samples("num_samples", num_samples)
    return check_max_memory(max_memory, x.device)


@analysis
def estimate_r_robustness(
    model: nn.Module,
    x: torch.Tensor,
    radii: float | list[float] | torch.Tensor,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    delta: torch.Tensor | None = None,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    max_memory: int | None = None,
    point_offset: int = 0,
    progress: bool = False,
    autocast: str | None = None,
) -> RRobustnessResult:
    """Monte-Carlo r-robustness of ``model`` at ``x`` (optionally perturbed by ``delta``) for every radius.

    ``z_s ~ q(z | x + delta)``, ``d_s = ||g(z_s) - g(mu(x))||_2`` (s = 1..S); per radius ``p_hat = #{d_s <= r} / S``
    with a two-sided Clopper–Pearson interval, ``robust = p_hat > 1/2``, the three-way ``decision``
    (:func:`vaefast.core.decide.clean_decision` at ``confidence``); ``r_star = d_(floor(S/2)+1)``.

    Args:
        model: a protocol model (run in eval mode; the caller's modes are restored).
        x: ``[B, *input_shape]`` on the model's device; cast to the model's parameter dtype.
        radii: one radius or a sequence (any order), all finite and ``> 0``.
        num_samples: ``S``.
        delta: None, one perturbation ``[*input_shape]`` for all points, or ``[B, *input_shape]``.
        seed: the Monte-Carlo stream.
        confidence: of the Clopper–Pearson interval and the decision.
        max_memory: the working-set budget in bytes (None: the device's default, :mod:`vaefast._memory`); decoder
            batches and stored distances are derived from it. The samples are bit-identical for any value, so hits
            are too; r* differs at most by the decoder's own batch-size-dependent rounding.
        point_offset: point ``b`` uses the RNG key ``point_offset + b`` (the global index when a data set is split
            across calls).
        progress: show progress (a bar on a terminal, one line in a log).
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
    num_samples = check_num_samples("num_samples", num_samples)
    seed = check_seed("seed", seed)
    confidence = check_probability("confidence", confidence)
    point_offset = check_seed("point_offset", point_offset)
    x, delta, _ = check_analysis_inputs(model, x, delta)
    budget = _check_request(num_samples, x, max_memory)
    sampler = Sampler(model, x.device, budget, _check_autocast(autocast, x.device))
    ids = torch.arange(point_offset, point_offset + x.shape[0], dtype=torch.int64)
    res = estimate_validated(model, x, delta, radii_t, ids, num_samples, seed, confidence, sampler, progress)
    return dataclasses.replace(res, source=estimate_source(model, x, delta))


def estimate_validated(
    model: Any,
    x: torch.Tensor,
    delta: torch.Tensor | None,
    radii: torch.Tensor,
    ids: torch.Tensor,
    num_samples: int,
    seed: int,
    confidence: float,
    sampler: Sampler,
    progress: bool = False,
    enc: Encoding | None = None,
) -> RRobustnessResult:
    """:func:`estimate_r_robustness` on validated inputs (the internal core's entry: the sweep's estimate stage).

    Args:
        model: a protocol model in eval mode.
        x, delta: validated points and perturbation on the model's device.
        radii: ``[K]`` float64 radii.
        ids: ``[B]`` int64 global point ids (CPU).
        num_samples, seed, confidence: as in :func:`estimate_r_robustness`.
        sampler: draws and counts (its memory budget and precision).
        progress: show progress.
        enc: the encoding of ``x + delta`` if already computed (one block of at most 4096 points).

    Returns:
        The :class:`RRobustnessResult` (``source`` None).
    """
    hits, r_star = _estimate(model, x, delta, radii, ids, num_samples, seed, sampler, progress, enc)
    low, high = clopper_pearson(hits, num_samples, confidence)
    return RRobustnessResult(
        p_hat=hits.to(torch.float64) / num_samples,
        ci_low=low,
        ci_high=high,
        hits=hits,
        num_samples=num_samples,
        robust=2 * hits > num_samples,
        decision=clean_decision(hits, num_samples, confidence),
        r_star=r_star,
        radii=radii,
        confidence=confidence,
        point_index=ids,
    )


def _estimate(model, x, delta, radii, ids, num_samples, seed, sampler: Sampler, progress, enc=None) -> tuple:
    """Hits ``[B, K]`` and ``r* [B]`` (CPU) of all points, a block of points at a time (bounded by the budget)."""
    dev = x.device
    block = max(1, min(x.shape[0], 4096))
    if enc is not None and len(enc) <= block:
        h, kth = sampler.hits_and_kth(enc, ids.to(dev), radii.to(dev), seed, num_samples, num_samples // 2 + 1)
        sampler.check_finite()
        return h.cpu(), kth
    hits = torch.empty(x.shape[0], radii.shape[0], dtype=torch.int64)
    r_star = torch.empty(x.shape[0], dtype=torch.float64)
    blocks = progress_bar(
        spans(x.shape[0], block), desc="r-robustness", unit="block", total=-(-x.shape[0] // block), enabled=progress
    )
    for b0, b1 in blocks:
        enc = encode(model, x[b0:b1], None if delta is None else delta[b0:b1])
        h, kth = sampler.hits_and_kth(enc, ids[b0:b1].to(dev), radii.to(dev), seed, num_samples, num_samples // 2 + 1)
        hits[b0:b1], r_star[b0:b1] = h.cpu(), kth
    sampler.check_finite()
    return hits, r_star


# --- the sequential test ---------------------------------------------------------------------------------------------
@analysis
def is_r_robust(
    model: nn.Module,
    x: torch.Tensor,
    r: float,
    delta: torch.Tensor | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    max_samples: int = 10000,
    seed: int = 0,
    point_offset: int = 0,
    max_memory: int | None = None,
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
        max_memory: the working-set budget in bytes (None: the device's default).
        futility: None, or a level ``beta`` in (0, 1): a point also stops, undecided, once its one-sided CP lower
            limit at ``beta`` exceeds the largest ``p_hat`` the last round could decide not robust
            (:func:`vaefast.stats.futile`). For callers that only need evidence of non-robustness: every not-robust
            decision is still one the test without futility makes, on the same samples.
        autocast: None, "bf16" or "tf32": the samples' decoder precision (see :func:`estimate_r_robustness`).

    Returns:
        A :class:`RobustnessDecision`; points still undecided at ``max_samples`` (or stopped for futility) get
        ``decided = False`` and ``robust = p_hat > 1/2``.
    """
    r = check_positive_float("r", r)
    confidence = check_probability("confidence", confidence)
    max_samples = check_num_samples("max_samples", max_samples)
    seed = check_seed("seed", seed)
    point_offset = check_seed("point_offset", point_offset)
    x, delta, _ = check_analysis_inputs(model, x, delta)
    budget = _check_request(max_samples, x, max_memory)
    if futility is not None:
        futility = check_probability("futility", futility)
    sampler = Sampler(model, x.device, budget, _check_autocast(autocast, x.device))
    ids = torch.arange(point_offset, point_offset + x.shape[0], dtype=torch.int64)
    rule = Rule.sequential(max_samples, 1.0 - confidence, futility)
    enc = encode(model, x, delta)
    radius = torch.tensor([r], dtype=torch.float64, device=x.device)
    dec = decide(sampler, enc, ids.to(x.device), radius, rule, seed)
    sampler.check_finite()
    hits, used, decision = dec.hits[:, 0], dec.samples[:, 0], dec.decision[:, 0]
    decided = decision != 0
    return RobustnessDecision(
        robust=torch.where(decided, decision == 1, 2 * hits > used),
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
        decision=estimate.decision[:, k],
        radii=estimate.radii[k],
    )


def encoder_geometry(
    model: Any,
    x: torch.Tensor,
    jacobian: str = "exact",
    confidence: float = 0.975,
    seed: int = 0,
    point_offset: int = 0,
    max_memory: int | None = None,
) -> tuple[dict[str, torch.Tensor], str, float]:
    """The encoder's geometry that every bound uses, at each point (it does not depend on r).

    Args:
        model: a protocol model with ``mean_encoder``, in eval mode.
        x: validated points on the model's device.
        jacobian: the norms' method, "exact", "randomized" or "auto" (:func:`vaefast.jacobian.jacobian_norms`).
        confidence: of a randomized method's upper limits.
        seed, point_offset: key a randomized method's probes (with the global point ids ``point_offset + b``).
        max_memory: the Jacobian's memory budget in bytes (None: the device's default).

    Returns:
        ``(geometry, method, confidence)``: per point (float64, CPU) ``sigma_min``, ``jac_frobenius`` (its estimate),
        ``jac_frobenius_upper``, ``jac_spectral`` and ``jac_whitened_spectral`` (upper limits when randomized), the
        method used and the norms' confidence.
    """
    from vaefast.jacobian import jacobian_norms

    sigma = torch.exp(0.5 * posterior(model, x)[1])
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


def bounds_from_counts(
    hits: torch.Tensor, num_samples: int, confidence: float, geometry: dict[str, torch.Tensor], exact: bool = True
) -> dict[str, torch.Tensor]:
    """Every bound of :class:`MarginBound` from the clean counts and the encoder's geometry: the one formula, which
    the sweep stores and ``vaefast verify`` re-derives from the stored columns.

    With ``p_hat = hits / S`` (``1 - 1/(2S)`` when ``hits = S``), ``q = Phi^-1(p_hat)`` and the one-sided
    Clopper–Pearson lower limit ``p_low`` at ``confidence``: ``latent_margin = sigma_min q``, ``bound =
    latent_margin / ||J||_F``, ``certified_bound = sigma_min Phi^-1(p_low) / U_F`` (``U_F = ||J||_F`` when exact;
    with randomized norms the upper limit of ``||J||_F`` and, for p, the two-sided interval's lower end ``ci_low``
    in place of ``p_low``: each part takes half the error rate), ``spectral_bound = latent_margin / ||J||_2``,
    ``whitened_bound = q / ||diag(sigma)^-1 J||_2``; all 0 unless the clean point is decided robust
    (:func:`vaefast.core.decide.clean_decision`).

    Args:
        hits: ``[B]`` integer counts of the clean estimate.
        num_samples: ``S``.
        confidence: the clean decision's confidence.
        geometry: per point (float64, CPU) ``sigma_min``, ``jac_frobenius``, ``jac_frobenius_upper``,
            ``jac_spectral`` and ``jac_whitened_spectral`` (:func:`encoder_geometry`).
        exact: whether the Jacobian norms are exact.

    Returns:
        The bounds, the geometry, and ``p_hat``, ``p_low``, ``hits``, ``decision``, ``certified``, ``saturated``.
    """
    hits = hits.cpu()
    s = num_samples
    p_hat = hits.to(torch.float64) / s
    decision = clean_decision(hits, s, confidence)
    certified, saturated = decision == ROBUST, hits == s
    p_low = clopper_pearson_one_sided(hits, s, 1.0 - confidence)[0]
    p_eff = torch.where(saturated, torch.full_like(p_hat, 1.0 - 0.5 / s), p_hat)
    q = torch.from_numpy(sps.norm.ppf(p_eff.numpy())).where(certified, torch.zeros_like(p_hat))
    p_part = p_low if exact else clopper_pearson(hits, s, confidence)[0]  # randomized: half the error rate each
    q_low = torch.from_numpy(sps.norm.ppf(p_part.numpy())).where(certified & (p_part > 0.5), torch.zeros_like(p_low))
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
        "p_low": p_low,
        "hits": hits,
        "decision": decision,
        "certified": certified,
        "saturated": saturated,
    }


def _margin_bound(
    est: RRobustnessResult, geometry: dict[str, torch.Tensor], method: str, jac_conf: float
) -> MarginBound:
    """The :class:`MarginBound` of a single-radius estimate from the encoder's geometry (its norms by ``method`` at
    ``jac_conf``)."""
    return MarginBound(
        **bounds_from_counts(est.hits[:, 0], est.num_samples, est.confidence, geometry, method != "randomized"),
        ci_low=est.ci_low[:, 0],
        r=float(est.radii[0]),
        num_samples=est.num_samples,
        confidence=est.confidence,
        point_index=est.point_index,
        jac_method=method,
        jac_confidence=jac_conf,
    )


@analysis
def margin_bound(
    model: nn.Module,
    x: torch.Tensor,
    r: float,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    point_offset: int = 0,
    max_memory: int | None = None,
    estimate: RRobustnessResult | None = None,
    autocast: str | None = None,
    *,
    jacobian: str = "auto",
) -> MarginBound:
    """First-order lower bounds on the input-space margin ``R^r_X(x)`` from ``p_hat = p_hat_r(x, 0)``.

    - ``latent_margin = sigma_min * Phi^-1(p_hat)``, ``sigma_min = min_i sigma(x)_i``;
    - ``bound = latent_margin / ||J_mu(x)||_F`` (the paper's bound);
    - ``spectral_bound = latent_margin / ||J_mu(x)||_2`` (>= bound when exact);
    - ``whitened_bound = Phi^-1(p_hat) / ||diag(sigma(x))^-1 J_mu(x)||_2`` (>= spectral_bound when exact);
    - ``certified_bound = sigma_min * Phi^-1(p_low) / ||J||_F`` with the one-sided Clopper–Pearson lower limit
      ``p_low`` at ``confidence`` when the norms are exact; with randomized norms ``ci_low`` (one-sided at
      ``(1 - confidence) / 2``) and ``U_F``, the upper confidence limit of ``||J||_F`` at ``(1 + confidence) / 2``:
      both hold together with probability ``>= confidence``; still a first-order bound.

    With a randomized Jacobian (``jacobian="randomized"``, or "auto" at a large latent size) ``bound`` uses the
    unbiased estimate of ``||J||_F^2`` and the spectral and whitened bounds the norms' upper confidence limits (never
    the Lanczos estimate, which is low): :class:`MarginBound` says which.

    The clean point is decided three-way from the estimate (``decision``); only a point decided robust
    (``p_low > 1/2``) is ``certified`` and gets bounds, elsewhere all bounds are 0. ``p_hat = 1`` would
    make ``Phi^-1`` infinite although only ``p >= ci_low`` is known; there the point bounds use the half-count rule
    ``p_hat -> 1 - 1/(2S)`` and ``saturated = True`` flags it. A zero Jacobian gives an infinite bound.

    Args:
        model: a protocol model with ``mean_encoder`` (run in eval mode; the caller's modes are restored).
        x: ``[B, *input_shape]`` on the model's device.
        r: the reconstruction radius.
        num_samples, seed, confidence, point_offset: of the clean estimate (:func:`estimate_r_robustness`).
        estimate: an :class:`RRobustnessResult` already computed for these points at radius ``r`` (e.g. by a
            sweep), reused instead of sampling again; ``num_samples``, ``seed`` and ``confidence`` are then its own.
        autocast: the decoder precision of the clean estimate when it is computed here (see
            :func:`estimate_r_robustness`); the encoder geometry is always in full precision.
        jacobian: "auto" (exact for an MLP the fused op reads or a latent size ``d <= 128``, else randomized),
            "exact" or "randomized" (:func:`vaefast.jacobian.jacobian_norms`; its random numbers are keyed by
            ``seed`` and the global point ids ``point_offset + b``).
        max_memory: the memory budget in bytes of the estimate and the Jacobian (None: the device's default).

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
            max_memory=max_memory, point_offset=point_offset, autocast=autocast,
        )  # fmt: skip
    else:
        est = column_for(estimate, r, x, model=model)
    jac_conf = (1.0 + est.confidence) / 2
    geometry, method, jac_conf = encoder_geometry(model, x, jacobian, jac_conf, seed, point_offset, max_memory)
    return _margin_bound(est, geometry, method, jac_conf)


def bounds_from(
    model: Any, x: torch.Tensor, estimate: RRobustnessResult, jacobian: str = "auto", seed: int = 0
) -> list[MarginBound]:
    """:func:`margin_bound` at every radius of ``estimate`` on validated inputs, the encoder's geometry computed once
    (it does not depend on r): the internal core's entry (the sweep's bound stage).

    Args:
        model: a protocol model with ``mean_encoder`` in eval mode.
        x: validated points on the model's device.
        estimate: their clean estimate.
        jacobian: the Jacobian norms' method (:func:`margin_bound`).
        seed: keys a randomized Jacobian's probes (with the points' global ids).

    Returns:
        One :class:`MarginBound` per radius of the estimate, in its order.
    """
    offset = int(estimate.point_index[0])
    jac_conf = (1.0 + estimate.confidence) / 2
    geometry, method, jac_conf = encoder_geometry(model, x, jacobian, jac_conf, seed, offset)
    return [_margin_bound(column_for(estimate, r, x), geometry, method, jac_conf) for r in estimate.radii.tolist()]
