"""Elementwise functions with sound ranges: the value range and the derivative range of ``phi`` over any interval,
and the global bound ``sup |phi'|``.

Each function is piecewise smooth. Over ``[lo, hi]``:

- its values lie between the smallest and the largest of ``phi`` at ``lo``, at ``hi``, at every stationary point
  (``phi' = 0`` with a change of sign) inside, and at every kink inside (both one-sided limits where ``phi`` jumps);
- its derivative lies between the smallest and the largest of ``phi'`` at ``lo``, ``hi``, every inflection point
  (``phi'' = 0``) inside and both one-sided derivatives at every kink in ``[lo, hi]``.

Both are exact for a function whose derivative is monotone between consecutive listed points, which is how the
points are chosen: in closed form where they have one (``+-sqrt 2`` for GELU, ``0`` for tanh and the sigmoid), else by
scanning ``phi''`` (resp. ``phi'``) on a fine grid of ``[-12, 12]`` for changes of sign and refining each with Brent's
method in float64 (the tails beyond are monotone). An extremum located to ``1e-12`` moves the extreme value by
``O(1e-24)``; the bounds add ``SLACK`` on top.

``jump``: the largest jump of ``phi`` (softplus switches to the identity at ``beta x > threshold``, leaving a jump of
``log(1 + e^-threshold) / beta``); ``phi = psi + (a step of height <= jump)`` with ``psi`` continuous and
``|psi'|`` within the derivative range, so ``|phi(a) - phi(b)| <= sup|psi'| |a - b| + jump``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import optimize

__all__ = ["Activation", "Kink", "SLACK", "make_activation"]

SLACK = 1e-9  # absolute widening of every value and derivative range (rounding of the float64 formulas)
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
_SCAN = np.linspace(-12.0, 12.0, 24001)

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Kink:
    """A point where ``phi'`` jumps from ``left`` to ``right``; ``values``: the one-sided limits of ``phi`` there
    when ``phi`` itself jumps (empty: continuous)."""

    at: float
    left: float
    right: float
    values: tuple[float, ...] = ()


@dataclass(frozen=True)
class Activation:
    """An elementwise function and the points that make its ranges exact (module docstring).

    Attributes:
        name: for messages (e.g. ``"elu(alpha=3)"``).
        fn: ``phi`` on float64 tensors.
        deriv: ``phi'`` on float64 tensors (either one-sided value at a kink).
        kinks: the kinks.
        stationary: smooth points where ``phi'`` changes sign.
        inflections: smooth points where ``phi'`` has an extremum.
        tails: ``(lim phi'(-inf), lim phi'(+inf))`` (``inf``: unbounded).
        domain: ``phi`` is defined on ``x > domain`` (``-inf``: everywhere).
    """

    name: str
    fn: Fn
    deriv: Fn
    kinks: tuple[Kink, ...] = ()
    stationary: tuple[float, ...] = ()
    inflections: tuple[float, ...] = ()
    tails: tuple[float, float] = (0.0, 0.0)
    domain: float = -math.inf

    @property
    def sup_derivative(self) -> float:
        """``sup |phi'|`` over the real line (``inf`` when unbounded): the global constant of its continuous part."""
        values = [abs(t) for t in self.tails] + [abs(k.left) for k in self.kinks] + [abs(k.right) for k in self.kinks]
        if self.inflections:
            values.append(float(self.deriv(torch.tensor(self.inflections, dtype=torch.float64)).abs().max()))
        return max(values) + SLACK

    @property
    def jump(self) -> float:
        """The largest jump of ``phi`` (0 for a continuous function)."""
        return max((max(k.values) - min(k.values) for k in self.kinks if k.values), default=0.0)

    def interval(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An interval containing ``phi([lo, hi])`` elementwise.

        Args:
            lo, hi: float64 tensors, ``lo <= hi``.

        Returns:
            ``(low, high)``; ``(-inf, inf)`` where the interval leaves the domain.
        """
        a, b = self.fn(lo), self.fn(hi)
        low, high = torch.minimum(a, b), torch.maximum(a, b)
        points = [(p, (float(self.fn(torch.tensor(p, dtype=torch.float64))),)) for p in self.stationary]
        points += [(k.at, k.values or (float(self.fn(torch.tensor(k.at, dtype=torch.float64))),)) for k in self.kinks]
        for at, values in points:
            inside = (lo < at) & (at < hi)
            for v in values:
                low = torch.where(inside, low.clamp_max(v), low)
                high = torch.where(inside, high.clamp_min(v), high)
        return self._in_domain(lo, low - SLACK, -math.inf), self._in_domain(lo, high + SLACK, math.inf)

    def derivative_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An interval containing ``phi'(t)`` for every ``t in [lo, hi]`` (the continuous part's, with a jump).

        Args:
            lo, hi: float64 tensors, ``lo <= hi``.

        Returns:
            ``(low, high)``; ``(-inf, inf)`` where the interval leaves the domain.
        """
        a, b = self.deriv(lo), self.deriv(hi)
        low, high = torch.minimum(a, b), torch.maximum(a, b)
        for p in self.inflections:
            v = float(self.deriv(torch.tensor(p, dtype=torch.float64)))
            inside = (lo < p) & (p < hi)
            low, high = torch.where(inside, low.clamp_max(v), low), torch.where(inside, high.clamp_min(v), high)
        for k in self.kinks:
            touches = (lo <= k.at) & (k.at <= hi)
            for v in (k.left, k.right):
                low, high = torch.where(touches, low.clamp_max(v), low), torch.where(touches, high.clamp_min(v), high)
        return self._in_domain(lo, low - SLACK, -math.inf), self._in_domain(lo, high + SLACK, math.inf)

    def _in_domain(self, lo: torch.Tensor, value: torch.Tensor, outside: float) -> torch.Tensor:
        if self.domain == -math.inf:
            return value
        return torch.where(lo > self.domain, value, torch.full_like(value, outside))


# --- locating the smooth extrema ---------------------------------------------------------------------------------
def _roots(f: Fn) -> tuple[float, ...]:
    """The sign changes of ``f`` on ``[-12, 12]`` (grid scan, then Brent's method to ``1e-14``)."""
    values = f(torch.from_numpy(_SCAN)).numpy()
    scalar = _scalar(f)
    out = []
    for i in np.nonzero(np.sign(values[:-1]) * np.sign(values[1:]) < 0)[0]:
        out.append(float(optimize.brentq(scalar, _SCAN[i], _SCAN[i + 1], xtol=1e-14, rtol=1e-15)))
    return tuple(out)


def _scalar(fn: Fn) -> Callable[[float], float]:
    return lambda t: float(fn(torch.tensor(t, dtype=torch.float64)))


def _second(deriv: Fn) -> Fn:
    """``phi''`` by autograd through ``phi'`` (float64)."""

    def second(t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            t = t.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(deriv(t).sum(), t)
        return g

    return second


@functools.cache
def _smooth(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(stationary, inflections)`` of a parameterless smooth activation, located numerically once."""
    deriv = _SMOOTH[name][1]
    return _roots(deriv), _roots(_second(deriv))


def _gelu_tanh_deriv(t: torch.Tensor) -> torch.Tensor:
    k = math.sqrt(2 / math.pi)
    u = torch.tanh(k * (t + 0.044715 * t**3))
    return 0.5 * (1 + u) + 0.5 * t * (1 - u * u) * k * (1 + 3 * 0.044715 * t * t)


def _gelu_deriv(t: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(t) + t * torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


def _silu_deriv(t: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(t)
    return s * (1 + t * (1 - s))


def _mish_deriv(t: torch.Tensor) -> torch.Tensor:
    sp = F.softplus(t)
    th = torch.tanh(sp)
    return th + t * (1 - th * th) * torch.sigmoid(t)


_SMOOTH: dict[str, tuple[Fn, Fn]] = {
    "gelu": (F.gelu, _gelu_deriv),
    "gelu_tanh": (lambda t: F.gelu(t, approximate="tanh"), _gelu_tanh_deriv),
    "silu": (F.silu, _silu_deriv),
    "mish": (F.mish, _mish_deriv),
}


def _smooth_activation(name: str) -> Activation:
    fn, deriv = _SMOOTH[name]
    stationary, inflections = _smooth(name)
    return Activation(name, fn, deriv, stationary=stationary, inflections=inflections, tails=(0.0, 1.0))


def _elu(alpha: float, scale: float, input_scale: float) -> Activation:
    if not input_scale > 0:
        raise ValueError(f"elu with input_scale={input_scale}: no rule (input_scale must be > 0)")
    left = scale * alpha * input_scale
    return Activation(
        f"elu(alpha={alpha:g}, scale={scale:g}, input_scale={input_scale:g})",
        lambda t: torch.where(t > 0, scale * t, scale * alpha * torch.expm1(input_scale * t)),
        lambda t: torch.where(t > 0, torch.full_like(t, scale), left * torch.exp(input_scale * t.clamp_max(0))),
        kinks=(Kink(0.0, left, scale),),
        tails=(0.0, scale),
    )


def _softplus(beta: float, threshold: float) -> Activation:
    if not beta > 0:
        raise ValueError(f"softplus with beta={beta}: no rule (beta must be > 0)")
    at = threshold / beta
    below = math.log1p(math.exp(threshold)) / beta if threshold < 700 else at
    return Activation(
        f"softplus(beta={beta:g}, threshold={threshold:g})",
        lambda t: F.softplus(t, beta=beta, threshold=threshold),
        lambda t: torch.where(beta * t > threshold, torch.ones_like(t), torch.sigmoid(beta * t)),
        kinks=(Kink(at, 1 / (1 + math.exp(-threshold)), 1.0, (below, at)),),
        tails=(0.0, 1.0),
    )


def _clamp(low: float | None, high: float | None, name: str | None = None) -> Activation:
    if low is not None and high is not None and low > high:  # torch: every value becomes ``high``
        return Activation(f"clamp({low:g}, {high:g})", lambda t: torch.full_like(t, high), torch.zeros_like)
    kinks = ([Kink(low, 0.0, 1.0)] if low is not None else []) + ([Kink(high, 1.0, 0.0)] if high is not None else [])

    def deriv(t: torch.Tensor) -> torch.Tensor:
        inside = torch.ones_like(t, dtype=torch.bool)
        if low is not None:
            inside &= t > low
        if high is not None:
            inside &= t < high
        return inside.to(t.dtype)

    return Activation(
        name or f"clamp(min={low}, max={high})",
        lambda t: t.clamp(low, high),
        deriv,
        kinks=tuple(kinks),
        tails=(0.0 if low is not None else 1.0, 0.0 if high is not None else 1.0),
    )


def _leaky(slope: float) -> Activation:
    return Activation(
        f"leaky_relu(negative_slope={slope:g})",
        lambda t: F.leaky_relu(t, slope),
        lambda t: torch.where(t > 0, torch.ones_like(t), torch.full_like(t, slope)),
        kinks=(Kink(0.0, slope, 1.0),),
        tails=(slope, 1.0),
    )


def _celu(alpha: float) -> Activation:
    if not alpha > 0:
        raise ValueError(f"celu with alpha={alpha}: no rule (alpha must be > 0)")
    return Activation(
        f"celu(alpha={alpha:g})",
        lambda t: F.celu(t, alpha),
        lambda t: torch.where(t > 0, torch.ones_like(t), torch.exp(t.clamp_max(0) / alpha)),
        kinks=(Kink(0.0, 1.0, 1.0),),
        tails=(0.0, 1.0),
    )


def _fixed(name: str) -> Activation:
    if name in _SMOOTH:
        return _smooth_activation(name)
    if name == "relu":
        return _clamp(0.0, None, "relu")
    if name == "tanh":
        return Activation("tanh", torch.tanh, lambda t: 1 - torch.tanh(t) ** 2, inflections=(0.0,))
    if name == "sigmoid":
        return Activation("sigmoid", torch.sigmoid, lambda t: torch.sigmoid(t) * torch.sigmoid(-t), inflections=(0.0,))
    if name == "abs":
        return Activation("abs", torch.abs, torch.sign, kinks=(Kink(0.0, -1.0, 1.0),), tails=(-1.0, 1.0))
    if name == "exp":
        return Activation("exp", torch.exp, torch.exp, tails=(0.0, math.inf))
    if name == "log":
        return Activation("log", torch.log, torch.reciprocal, tails=(math.inf, 0.0), domain=0.0)
    raise KeyError(name)


def make_activation(name: str, **params: float | None) -> Activation:
    """The :class:`Activation` of an elementwise op with its parameters.

    Args:
        name: ``relu``, ``leaky_relu`` (``negative_slope``, any sign), ``elu`` (``alpha`` of any sign, ``scale``,
            ``input_scale > 0``), ``selu``, ``celu`` (``alpha > 0``), ``gelu``, ``gelu_tanh``, ``silu``, ``mish``,
            ``softplus`` (``beta > 0``, ``threshold``), ``tanh``, ``sigmoid``, ``clamp`` (``low``/``high``, either
            None), ``abs``, ``exp``, ``log``.
        **params: the parameters named above.

    Returns:
        The activation.

    Raises:
        ValueError: a parameter with no sound rule (the message names it).
    """
    if name == "leaky_relu":
        return _leaky(float(params["negative_slope"]))
    if name == "elu":
        return _elu(float(params["alpha"]), float(params["scale"]), float(params["input_scale"]))
    if name == "selu":
        return _elu(SELU_ALPHA, SELU_SCALE, 1.0)
    if name == "celu":
        return _celu(float(params["alpha"]))
    if name == "softplus":
        return _softplus(float(params["beta"]), float(params["threshold"]))
    if name == "clamp":
        low, high = params.get("low"), params.get("high")
        return _clamp(None if low is None else float(low), None if high is None else float(high))
    return _fixed(name)
