"""Deciding r-robustness from counts: the three-way clean decision, and the (multi-radius) sequential test of many
attacked inputs in one batched call.

A decision is a count rule. After ``n`` samples with ``h`` hits a radius is decided *robust* when ``h >= k_robust(n)``
and *not robust* (broken) when ``h <= k_broken(n)``, else undecided:

- the sequential rule at per-round level ``a`` (:mod:`vaefast.stats`): ``k_robust`` is the smallest count whose
  one-sided Clopper–Pearson lower limit at ``a`` exceeds 1/2, ``k_broken`` the largest whose upper limit is ``<= 1/2``;
  rounds of 32, 64, 128, ... samples (capped), ``a = level / rounds``, so every decision is wrong with probability at
  most ``level``;
- the fixed rule (the original protocol's): one round of ``S`` samples, robust iff ``p_hat > 1/2``, no confidence.

The clean point is decided once, three-way, from the S counts of its estimate (:func:`clean_decision`): the
sequential rule's one round at level ``1 - confidence``, i.e. robust exactly when the one-sided Clopper–Pearson lower
limit at ``confidence`` exceeds 1/2 (the certificates' ``p_low > 1/2``), not robust when the upper limit is ``<= 1/2``.

:func:`decide` runs a rule on rows (attacked inputs) for K radii at once: every round draws the next samples of the
rows still running, counts hits for all K radii in one pass, and freezes each (row, radius) at its first decision;
a row stops when every radius it must decide is frozen. Early stops, per (row, radius) (``stops``), freeze it
undecided: ``FUTILE`` once its one-sided lower limit at the rule's ``futility`` level exceeds the largest ``p_hat``
the last round could call broken (it cannot plausibly be decided broken; :func:`vaefast.stats.futile`); ``SIDE`` once
the side of 1/2 it lies on is known at level ``SIDE_LEVEL`` per round (its one-sided Clopper–Pearson limits exclude
1/2; an estimate needs the side, not a claim). Every claim (robust, broken) is still the rule's own decision. Host
synchronisations: a constant number per round, whatever the number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vaefast.core.encoding import Encoding
from vaefast.core.sampling import Sampler
from vaefast.stats import _critical_counts, _futility_count, largest_decidable_not_robust, sequential_schedule

__all__ = [
    "BROKEN", "DECIDE", "FUTILE", "ROBUST", "SIDE", "UNDECIDED", "Decisions", "Rule", "clean_decision", "decide",
]  # fmt: skip

ROBUST, BROKEN, UNDECIDED = 1, -1, 0
DECIDE, FUTILE, SIDE = 0, 1, 2  # early stops of a (row, radius): none, futility, side of 1/2 known
SIDE_LEVEL = 1e-3  # per round: a side stop is on the wrong side of 1/2 with probability at most rounds * SIDE_LEVEL


@dataclass(frozen=True)
class Rule:
    """A count rule: rounds of cumulative sizes ``schedule``; ``level`` per round (None: the fixed rule)."""

    schedule: tuple[int, ...]
    level: float | None = None
    futility: float | None = None

    @classmethod
    def sequential(cls, max_samples: int, level: float, futility: float | None = None) -> Rule:
        """The sequential rule with family level ``level`` (split over its rounds).

        Args:
            max_samples: the last round's size.
            level: the probability of a wrong decision, in (0, 1).
            futility: the futility level ``beta`` or None.

        Returns:
            The rule.
        """
        schedule = tuple(sequential_schedule(max_samples))
        return cls(schedule, level / len(schedule), futility)

    @classmethod
    def fixed(cls, num_samples: int) -> Rule:
        """The original protocol's rule: robust iff ``p_hat > 1/2`` after ``num_samples``.

        Returns:
            The rule.
        """
        return cls((num_samples,))

    def critical(self, n: int) -> tuple[int, int]:
        """``(k_robust, k_broken)`` after ``n`` samples (module docstring)."""
        if self.level is None:
            return n // 2 + 1, n // 2
        return _critical_counts(n, self.level)

    def futile_count(self, n: int) -> int | None:
        """The smallest count at ``n`` that is futile (None without futility)."""
        if self.futility is None or self.level is None:
            return None
        threshold = largest_decidable_not_robust(self.schedule[-1], self.level)
        return _futility_count(n, self.futility, threshold)

    def decidable(self) -> tuple[float, float]:
        """The ``p_hat`` thresholds of the last round: ``(largest p_hat decided broken, smallest decided robust)``.

        Returns:
            Two probabilities (-1 or 2 where no count qualifies).
        """
        n = self.schedule[-1]
        k_robust, k_broken = self.critical(n)
        return (k_broken / n if k_broken >= 0 else -1.0), (k_robust / n if k_robust <= n else 2.0)


def clean_decision(hits: torch.Tensor, num_samples: int, confidence: float) -> torch.Tensor:
    """The three-way clean decision from an estimate's counts (module docstring).

    Args:
        hits: integer counts (any shape).
        num_samples: ``S``.
        confidence: the decision's confidence.

    Returns:
        int8 of ``hits``' shape and device: ``ROBUST`` (1), ``BROKEN`` (-1, not robust) or ``UNDECIDED`` (0).
    """
    k_robust, k_broken = Rule((num_samples,), 1.0 - confidence).critical(num_samples)
    out = torch.zeros(hits.shape, dtype=torch.int8, device=hits.device)
    out[hits >= k_robust] = ROBUST
    out[hits <= k_broken] = BROKEN
    return out


@dataclass
class Decisions:
    """Per (row, radius): ``hits`` and ``samples`` at the decision (or at the row's last round), and the
    ``decision`` (``ROBUST``, ``BROKEN``, ``UNDECIDED``); all ``[N, K]`` on the CPU."""

    hits: torch.Tensor
    samples: torch.Tensor
    decision: torch.Tensor

    @property
    def p_hat(self) -> torch.Tensor:
        """``hits / samples`` (float64)."""
        return self.hits.to(torch.float64) / self.samples.clamp_min(1).to(torch.float64)


def decide(
    sampler: Sampler,
    enc: Encoding,
    ids: torch.Tensor,
    radii: torch.Tensor,
    rule: Rule,
    seed: int,
    required: torch.Tensor | None = None,
    stops: torch.Tensor | None = None,
) -> Decisions:
    """Run ``rule`` on ``N`` rows for ``K`` radii (module docstring).

    Args:
        sampler: draws and counts.
        enc: the rows' encodings (posterior at the attacked input, clean centre), on the model's device.
        ids: ``[N]`` int64 point ids on the device (they key the samples: a point draws the same samples at every
            attacked input).
        radii: ``[K]`` float64 on the device.
        rule: the count rule.
        seed: the Monte-Carlo stream.
        required: ``[N, K]`` bool (CPU): the radii each row must decide before it stops (default: all).
        stops: ``[N, K]`` int8 (CPU): the early stop of each (row, radius), ``DECIDE`` (none: draw until decided or
            the last round), ``FUTILE`` or ``SIDE`` (module docstring); default ``FUTILE`` everywhere.

    Returns:
        The :class:`Decisions`.
    """
    n, k = len(enc), radii.shape[0]
    dev = enc.mu.device
    hits = torch.zeros(n, k, dtype=torch.int64, device=dev)
    samples = torch.zeros(n, k, dtype=torch.int64, device=dev)
    decision = torch.zeros(n, k, dtype=torch.int8, device=dev)
    frozen = torch.zeros(n, k, dtype=torch.bool, device=dev)
    need = torch.ones(n, k, dtype=torch.bool, device=dev) if required is None else required.to(dev)
    stops = torch.full((n, k), FUTILE, dtype=torch.int8, device=dev) if stops is None else stops.to(dev)
    running = torch.arange(n, device=dev)
    done = 0
    for total in rule.schedule:
        if running.numel() == 0:
            break
        drawn = sampler.hits(enc.take(running), ids[running], radii, seed, done, total - done)
        open_ = ~frozen[running]
        hits[running] += drawn * open_  # frozen (row, radius) keep the counts of their decision
        samples[running] = torch.where(open_, total, samples[running])
        k_robust, k_broken = rule.critical(total)
        h = hits[running]
        yes, no = open_ & (h >= k_robust), open_ & (h <= k_broken)
        decision[running] = torch.where(yes, ROBUST, torch.where(no, BROKEN, decision[running])).to(torch.int8)
        stop = yes | no
        stop |= open_ & _early(rule, total, h, stops[running])
        frozen[running] |= stop
        running = running[(need[running] & ~frozen[running]).any(dim=1)]  # one host synchronisation per round
        done = total
    return Decisions(hits.cpu(), samples.cpu(), decision.cpu())


def _early(rule: Rule, n: int, hits: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """Which (row, radius) stop early after ``n`` samples (module docstring): futility, or a known side of 1/2."""
    out = torch.zeros_like(hits, dtype=torch.bool)
    futile = rule.futile_count(n)
    if futile is not None:
        out |= (stops == FUTILE) & (hits >= futile)
    if rule.level is not None:  # the fixed rule draws its S samples whatever the side
        above, below = _critical_counts(n, SIDE_LEVEL)
        out |= (stops == SIDE) & ((hits >= above) | (hits <= below))
    return out
