"""Settings as frozen, keyword-only option objects with one default each, shared by the public functions, the sweep
specification and the command line: :class:`EstimateOptions` (Monte-Carlo estimates) and :class:`MarginOptions`
(the numerical margin search and its attacks). Each validates itself once, when it is made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from vaefast._checks import (
    check_choice,
    check_num_samples,
    check_positive_float,
    check_positive_int,
    check_probability,
)

__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_NUM_SAMPLES",
    "EstimateOptions",
    "MarginOptions",
    "with_overrides",
]

DEFAULT_NUM_SAMPLES = 1000  # Monte-Carlo samples of an estimate (and the sequential test's most samples)
DEFAULT_CONFIDENCE = 0.95  # of every interval, decision and certificate

METHODS = ("bisection", "grid")
STRATEGIES = ("secant", "halving")
DECISIONS = ("sequential", "fixed")
MODES = ("mean_var", "mean")
OPTIMIZERS = ("pgd", "adam", "lbfgsb")
AUTOCAST_MODES = ("bf16", "tf32")


@dataclass(frozen=True, kw_only=True)
class EstimateOptions:
    """How a Monte-Carlo estimate of ``p_r`` is computed.

    Attributes:
        num_samples: ``S``, samples per point.
        confidence: of the Clopper–Pearson intervals and of the three-way clean decision.
        max_memory: the working-set budget in bytes (None: the device's default, :mod:`vaefast._memory`).
        autocast: None (full precision), ``"bf16"`` or ``"tf32"`` (CUDA only): the decoder precision of the samples.
    """

    num_samples: int = DEFAULT_NUM_SAMPLES
    confidence: float = DEFAULT_CONFIDENCE
    max_memory: int | None = None
    autocast: str | None = None

    def __post_init__(self) -> None:
        check_num_samples("num_samples", self.num_samples)
        check_probability("confidence", self.confidence)
        if self.max_memory is not None:
            check_positive_int("max_memory", self.max_memory)
        if self.autocast is not None:
            check_choice("autocast", self.autocast, AUTOCAST_MODES)


@dataclass(frozen=True, kw_only=True)
class MarginOptions:
    """How the numerical margin is searched (:func:`vaefast.numerical_margin`).

    Attributes:
        method: ``"bisection"`` (the batched search: grow until the attack breaks r-robustness, then shrink the
            bracket around the crossing of ``p_hat = 1/2``) or ``"grid"`` (the original protocol: radii from the
            largest down by ``granularity``).
        strategy: how the bisection picks radii: ``"secant"`` (the probit of ``p_hat`` is close to linear in the
            radius: secant steps) or ``"halving"`` (doubling, then halving).
        tol: the bisection stops when the bracket of the crossing of 1/2 is at most this wide.
        granularity: the grid's step.
        max_radius: the search limit (None: the largest perturbation the data box allows at each point).
        start_radius: the first radius of the growth phase (None: ``max(2 tol, min(1/4, max_radius / 4))``).
        decision: ``"sequential"`` (a radius counts as broken, or robust, only where the sequential test decides it
            at the search's confidence) or ``"fixed"`` (``p_hat <= 1/2`` from ``num_samples`` samples, the original
            protocol's rule, with no confidence).
        num_samples: the sequential test's most samples per decision (the fixed rule's samples).
        confidence: the family-wise confidence of every claim of a point (Bonferroni over the search's decisions).
        restarts, steps, num_noise_samples, mode, optimizer: the sphere attack
            (:class:`~vaefast.attacks.MaxDamageAttack`); ``steps`` are the cold attack's (random starts).
        warm_steps: the steps of an attack warm-started from a perturbation found at a nearby radius (None:
            ``max(5, steps // 3)``).
        warm_start: warm-start the later rounds (off for L-BFGS-B).
        one_at_a_time: search the points one by one (the original protocol's execution).
    """

    method: str = "bisection"
    strategy: str = "secant"
    tol: float = 0.01
    granularity: float = 0.01
    max_radius: float | None = None
    start_radius: float | None = None
    decision: str = "sequential"
    num_samples: int = DEFAULT_NUM_SAMPLES
    confidence: float = DEFAULT_CONFIDENCE
    restarts: int = 1
    steps: int = 50
    warm_steps: int | None = None
    num_noise_samples: int = 8
    mode: str = "mean_var"
    optimizer: str = "pgd"
    warm_start: bool = True
    one_at_a_time: bool = False

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_positive_float("tol", self.tol)
        check_positive_float("granularity", self.granularity)
        for name in ("max_radius", "start_radius"):
            if getattr(self, name) is not None:
                check_positive_float(name, getattr(self, name))
        check_choice("decision", self.decision, DECISIONS)
        check_num_samples("num_samples", self.num_samples)
        check_probability("confidence", self.confidence)
        check_positive_int("restarts", self.restarts)
        check_positive_int("steps", self.steps)
        if self.warm_steps is not None:
            check_positive_int("warm_steps", self.warm_steps)
        check_positive_int("num_noise_samples", self.num_noise_samples)
        check_choice("mode", self.mode, MODES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        for name in ("warm_start", "one_at_a_time"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")

    @property
    def warm(self) -> int:
        """The warm-started attack's steps: ``warm_steps`` or ``max(5, steps // 3)``."""
        return self.warm_steps if self.warm_steps is not None else max(5, self.steps // 3)


_O = TypeVar("_O", EstimateOptions, MarginOptions)


def with_overrides(options: _O | None, cls: type[_O], overrides: dict[str, Any], name: str = "options") -> _O:
    """``options`` (or the defaults of ``cls``) with some fields replaced, validated.

    Args:
        options: an instance of ``cls`` or None.
        cls: :class:`EstimateOptions` or :class:`MarginOptions`.
        overrides: field values to replace (e.g. a function's keyword arguments).
        name: the argument's name in error messages.

    Returns:
        The new options.

    Raises:
        TypeError: ``options`` of another type, or an unknown field (naming it).
    """
    if options is None:
        options = cls()
    elif not isinstance(options, cls):
        raise TypeError(f"{name} must be a {cls.__name__} or None, got {type(options).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"{name}: unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(options, **overrides) if overrides else options
