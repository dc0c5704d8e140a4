"""Binomial statistics for the Monte-Carlo robustness estimators.

- Clopper–Pearson ("exact") intervals for a binomial proportion, via ``scipy.stats.beta`` quantiles:
  two-sided at confidence ``1 - alpha``: ``[B(alpha/2; k, n-k+1), B(1-alpha/2; k+1, n-k)]`` (0 at k = 0, 1 at k = n).
- The group-sequential schedule and decision rule behind ``vaefast.is_r_robust``: cumulative sample sizes
  ``n_1 = 32, n_j = 2 n_{j-1}`` (capped at ``max_samples``); after round ``j`` a point is decided *robust* when the
  one-sided Clopper–Pearson lower limit at level ``alpha_j`` exceeds 1/2, *not robust* when the one-sided upper limit
  at level ``alpha_j`` is ``<= 1/2``. With the Bonferroni split ``alpha_j = alpha / J`` over the ``J`` rounds of the
  schedule, the probability of ever deciding wrongly is ``<= alpha`` for every true p: for ``p > 1/2`` a wrong decision
  needs some upper limit below p (probability ``<= alpha_j`` in round ``j``), for ``p <= 1/2`` some lower limit above p.
- Futility stopping (optional, for searches that only need evidence of *non*-robustness): a point stops drawing,
  undecided, once its one-sided CP lower limit at a level ``beta`` exceeds :func:`largest_decidable_not_robust`, the
  largest ``p_hat`` the last round could still decide not robust. The not-robust rule itself is unchanged, so every
  not-robust decision is one the test without futility makes too (same samples, same round) and the guarantee above
  holds; futility only turns some would-be decisions into "undecided".
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy import stats

from vaefast._checks import check_positive_int, check_probability

__all__ = [
    "clopper_pearson",
    "clopper_pearson_one_sided",
    "sequential_schedule",
    "sequential_decision",
    "largest_decidable_not_robust",
    "futile",
    "FIRST_ROUND",
]

FIRST_ROUND = 32  # samples in the first round of the sequential test


def _as_counts(
    hits: torch.Tensor | np.ndarray | int, n: torch.Tensor | np.ndarray | int
) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(hits.cpu() if isinstance(hits, torch.Tensor) else hits, dtype=np.float64)
    m = np.asarray(n.cpu() if isinstance(n, torch.Tensor) else n, dtype=np.float64)
    k, m = np.broadcast_arrays(k, m)
    if np.any(m < 1) or np.any(k < 0) or np.any(k > m) or np.any(k != np.round(k)):
        raise ValueError("hits must be integers with 0 <= hits <= n and n >= 1")
    return k, m


def clopper_pearson(
    hits: torch.Tensor | np.ndarray | int, n: torch.Tensor | np.ndarray | int, confidence: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-sided Clopper–Pearson interval for ``hits`` successes of ``n`` trials.

    ``low = Beta.ppf(alpha/2; k, n-k+1)`` (0 when k = 0), ``high = Beta.ppf(1-alpha/2; k+1, n-k)`` (1 when k = n),
    ``alpha = 1 - confidence``. Guaranteed coverage ``>= confidence`` for every true p.

    Args:
        hits: ``k``, integer counts (tensor, array or int).
        n: the trials, broadcast against ``hits``.
        confidence: in (0, 1).

    Returns:
        ``(low, high)``, float64 tensors of the broadcast shape.
    """
    confidence = check_probability("confidence", confidence)
    alpha = 1.0 - confidence
    low, high = _limits(hits, n, alpha / 2, alpha / 2)
    return low, high


def clopper_pearson_one_sided(
    hits: torch.Tensor | np.ndarray | int, n: torch.Tensor | np.ndarray | int, alpha: float | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-sided Clopper–Pearson limits at level ``alpha`` each: ``P(p < low) <= alpha`` and ``P(p > high) <= alpha``.

    ``low = Beta.ppf(alpha; k, n-k+1)`` (0 when k = 0), ``high = Beta.ppf(1-alpha; k+1, n-k)`` (1 when k = n).

    Args:
        hits: ``k``, integer counts.
        n: the trials, broadcast against ``hits``.
        alpha: in (0, 1); an array broadcastable against ``hits`` gives per-point levels.

    Returns:
        ``(low, high)``, float64 tensors.
    """
    a = np.asarray(alpha, dtype=np.float64)
    if np.any(a <= 0) or np.any(a >= 1):
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return _limits(hits, n, a, a)


def _limits(hits, n, alpha_low, alpha_high) -> tuple[torch.Tensor, torch.Tensor]:
    k, m = _as_counts(hits, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(k > 0, stats.beta.ppf(alpha_low, np.maximum(k, 1), m - k + 1), 0.0)
        high = np.where(k < m, stats.beta.ppf(1 - np.asarray(alpha_high), k + 1, np.maximum(m - k, 1)), 1.0)
    return torch.from_numpy(np.asarray(low, dtype=np.float64)), torch.from_numpy(np.asarray(high, dtype=np.float64))


def sequential_schedule(max_samples: int, first: int = FIRST_ROUND) -> list[int]:
    """Cumulative sample sizes of the sequential test's rounds.

    Args:
        max_samples: the last (largest) size.
        first: the first round's size.

    Returns:
        ``[first, 2 first, 4 first, ...]`` capped at and ending with ``max_samples``.
    """
    max_samples = check_positive_int("max_samples", max_samples)
    first = check_positive_int("first", first)
    sizes = []
    n = min(first, max_samples)
    while True:
        sizes.append(n)
        if n >= max_samples:
            return sizes
        n = min(2 * n, max_samples)


@functools.lru_cache(maxsize=512)
def _critical_counts(n: int, round_alpha: float) -> tuple[int, int]:
    """``(k_robust, k_not_robust)``: the smallest count whose one-sided CP lower limit at ``round_alpha`` exceeds 1/2
    (``n + 1`` if none) and the largest whose upper limit is ``<= 1/2`` (-1 if none). Both limits increase with the
    count, so comparing counts with these is the same rule as comparing the limits with 1/2."""
    low, high = clopper_pearson_one_sided(np.arange(n + 1), n, round_alpha)
    robust, broken = np.nonzero(low.numpy() > 0.5)[0], np.nonzero(high.numpy() <= 0.5)[0]
    return (int(robust[0]) if robust.size else n + 1), (int(broken[-1]) if broken.size else -1)


@functools.lru_cache(maxsize=512)
def _futility_count(n: int, level: float, threshold: float) -> int:
    """The smallest count whose one-sided CP lower limit at ``level`` exceeds ``threshold`` (``n + 1`` if none)."""
    low, _ = clopper_pearson_one_sided(np.arange(n + 1), n, level)
    above = np.nonzero(low.numpy() > threshold)[0]
    return int(above[0]) if above.size else n + 1


def sequential_decision(hits: torch.Tensor, n: int, round_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The decisions after a round: robust when the one-sided CP lower limit at ``round_alpha`` is ``> 1/2``, not
    robust when the one-sided upper limit is ``<= 1/2`` (both cannot hold: low <= high). The limits increase with
    the count, so the rule is two critical counts per ``(n, round_alpha)``, computed once and cached.

    Args:
        hits: ``[B]`` successes so far.
        n: the samples so far (the same for every point).
        round_alpha: the round's level ``alpha / J``.

    Returns:
        ``(decided_robust, decided_not_robust)``, bool tensors on ``hits``' device.
    """
    n = check_positive_int("n", n)
    if not 0 < round_alpha < 1:
        raise ValueError(f"round_alpha must be in (0, 1), got {round_alpha}")
    k_robust, k_broken = _critical_counts(n, float(round_alpha))
    return hits >= k_robust, hits <= k_broken


def largest_decidable_not_robust(n: int, round_alpha: float) -> float:
    """The largest ``p_hat = k / n`` that :func:`sequential_decision` decides not robust after ``n`` samples.

    Args:
        n: the samples (the last round's size).
        round_alpha: the round's level.

    Returns:
        ``max{k / n : Beta.ppf(1 - round_alpha; k + 1, n - k) <= 1/2}`` (the one-sided CP upper limit is increasing
        in k), or -1 when no count qualifies (``n`` too small for the level).
    """
    n = check_positive_int("n", n)
    k = _critical_counts(n, float(round_alpha))[1]
    return k / n if k >= 0 else -1.0


def futile(hits: torch.Tensor, n: int, level: float, threshold: float) -> torch.Tensor:
    """Futility: the one-sided CP lower limit of ``hits / n`` at ``level`` exceeds ``threshold`` (with
    ``threshold = largest_decidable_not_robust(N, alpha_j)``: the point is at least ``1 - level`` sure to have
    ``p`` above what the last round could decide not robust). A critical count per ``(n, level, threshold)``,
    cached.

    Args:
        hits: ``[B]`` successes so far.
        n: the samples so far.
        level: ``beta`` in (0, 1).
        threshold: the p the limit must exceed.

    Returns:
        ``[B]`` bool on ``hits``' device.
    """
    return hits >= _futility_count(check_positive_int("n", n), float(level), float(threshold))
