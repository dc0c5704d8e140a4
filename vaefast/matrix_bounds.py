"""Confidence limits of randomized matrix estimates (used by the randomized Jacobian norms of :mod:`vaefast.jacobian`).

**Trace of a PSD matrix from Gaussian quadratic forms.** Let ``B`` be symmetric positive semi-definite (``n x n``,
eigenvalues ``mu_i``) and ``s = sum_{p=1..m} v_p^T B v_p`` with ``v_p ~ N(0, I_n)`` i.i.d. In ``B``'s eigenbasis
``s = sum_i mu_i X_i`` with ``X_i ~ chi2_m`` i.i.d., so ``E s = m tr(B)`` (Hutchinson). For every ``theta >= 0``
(Chernoff)::

    P(s <= x) <= exp(theta x - (m/2) sum_i log(1 + 2 theta mu_i))
    P(s >= x) <= exp(-theta x - (m/2) sum_i log(1 - 2 theta mu_i))      (theta < 1 / (2 max_i mu_i))

Only ``t = tr(B)`` is hypothesised, and optionally a cap ``mu_i <= c`` (an upper limit of ``lambda_max(B)``). The
exponents are sums of a concave (lower tail) or convex (upper tail) function of each ``mu_i``: Schur-concave resp.
Schur-convex in ``mu``. Over ``{mu in [0, c]^n : sum mu = t}`` the largest vector in the majorization order is
``floor(t / c)`` eigenvalues ``c`` and one ``t - c floor(t / c)`` (without a cap: rank one, ``mu = (t, 0, ...)``), so
both bounds at that spectrum hold for every admissible ``B``. The resulting ``p_low(t)`` decreases and ``p_up(t)``
increases in ``t``; the limits::

    t_upper = sup{t : p_low(t) >= alpha}        P(tr B > t_upper) <= alpha
    t_lower = inf{t : p_up(t) >= alpha}         P(tr B < t_lower) <= alpha

are found by bisection and rounded outward. Without a cap this is the rank-one worst case (a ``chi2_m`` tail bound);
with a cap far below ``t`` (a high effective rank) it approaches the normal interval of ``m t / c`` degrees of freedom.

**Largest eigenvalue from a Lanczos run with a random start.** For ``A`` PSD (``n x n``), ``b`` uniform on the unit
sphere and ``theta_k`` the largest Ritz value of the Krylov space ``span{b, A b, ..., A^{k-1} b}`` (``k`` products with
``A``), Kuczyński & Woźniakowski (SIAM J. Matrix Anal. Appl. 13(4), 1992, "Estimating the largest eigenvalue by the
power and Lanczos algorithms with a random start") prove, for every ``A`` (no gap assumption)::

    P(theta_k < (1 - eps) lambda_max(A)) <= 1.648 sqrt(n) exp(-sqrt(eps) (2k - 1))

so ``lambda_max(A) <= theta_k / (1 - eps_alpha)`` with probability ``>= 1 - alpha``, ``eps_alpha = (ln(1.648 sqrt(n)
/ alpha) / (2k - 1))^2`` (no limit when ``eps_alpha >= 1``). ``theta_k <= lambda_max(A)`` always (a Rayleigh quotient).
"""

from __future__ import annotations

import math

from scipy import optimize

__all__ = ["KW_CONSTANT", "lanczos_upper", "trace_limits"]

KW_CONSTANT = 1.648  # Kuczyński & Woźniakowski's constant of the Lanczos failure probability
_BISECTIONS = 200  # bisection steps of a limit (stops earlier at a relative width of 1e-10)


def lanczos_upper(ritz: float, n: int, steps: int, alpha: float) -> float:
    """An upper confidence limit of ``lambda_max(A)`` from the largest Ritz value of a random-start Lanczos run.

    Args:
        ritz: ``theta_k >= 0``, the largest Ritz value after ``steps`` products with ``A``.
        n: the dimension of ``A`` (the start vector's space).
        steps: ``k``, the dimension of the Krylov space (``steps >= n``: the whole space, ``theta_k`` is exact).
        alpha: the failure probability, in (0, 1).

    Returns:
        ``theta_k / (1 - eps_alpha)`` (module docstring); ``inf`` when ``eps_alpha >= 1`` or ``steps < 1``.
    """
    if steps >= n:
        return float(ritz)
    if steps < 1:
        return math.inf
    root_eps = math.log(KW_CONSTANT * math.sqrt(n) / alpha) / (2 * steps - 1)
    eps = root_eps * root_eps
    return float(ritz) / (1.0 - eps) if eps < 1.0 else math.inf


def _worst_spectrum(t: float, cap: float | None, n: int) -> tuple[float, float, float]:
    """``(count, c, rest)``: ``count`` eigenvalues ``c`` and one ``rest``, the majorization-largest spectrum."""
    if cap is None or not math.isfinite(cap) or cap <= 0 or t <= cap:
        return 0.0, 0.0, t
    count = min(math.floor(t / cap), n)
    return float(count), cap, max(t - count * cap, 0.0)


def _log_tail(t: float, s: float, m: int, cap: float | None, n: int, upper: bool) -> float:
    """The log of the Chernoff bound on ``P(s' <= s)`` (``upper=False``) or ``P(s' >= s)`` (``upper=True``) for
    ``s' = sum_i mu_i chi2_m`` at the worst spectrum of trace ``t``."""
    count, c, rest = _worst_spectrum(t, cap, n)
    sign = 1.0 if upper else -1.0
    top = max(c if count else 0.0, rest)
    if top <= 0:  # B = 0: s' = 0 surely
        return -math.inf if upper and s > 0 else 0.0

    def slope(theta: float) -> float:  # derivative of the exponent in theta
        terms = count * c / (1 - sign * 2 * theta * c) + rest / (1 - sign * 2 * theta * rest)
        return -sign * s + sign * m * terms

    def exponent(theta: float) -> float:
        logs = count * math.log1p(-sign * 2 * theta * c) + math.log1p(-sign * 2 * theta * rest)
        return -sign * theta * s - 0.5 * m * logs

    if slope(0.0) >= 0:  # the observation is on the other side of the mean: no evidence against t
        return 0.0
    if upper:
        hi = 0.5 / top * (1 - min(0.5, m * top / (2 * s)))
    else:
        if s <= 0:
            return -math.inf
        hi = m * (count + 1) / (2 * s)
    theta = optimize.brentq(slope, 0.0, hi, xtol=1e-14 * hi, rtol=1e-12)
    return min(0.0, exponent(theta))


def _bisect(inside, lo: float, hi: float, keep_high: bool) -> float:
    """Bisection between ``lo`` (``inside(lo)`` true) and ``hi`` (false); returns the outward end of the bracket."""
    for _ in range(_BISECTIONS):
        if hi - lo <= 1e-10 * max(abs(hi), abs(lo), 1e-300):
            break
        mid = 0.5 * (lo + hi)
        if inside(mid):
            lo = mid
        else:
            hi = mid
    return hi if keep_high else lo


def trace_limits(
    s: float, m: int, alpha_lower: float, alpha_upper: float, cap: float | None = None, n: int | None = None
) -> tuple[float, float]:
    """Confidence limits of ``tr(B)`` from ``s = sum_{p=1..m} v_p^T B v_p`` with Gaussian probes (module docstring).

    Args:
        s: the observed sum of the ``m`` quadratic forms (``>= 0``).
        m: the number of probes.
        alpha_lower: ``P(tr B < lower) <= alpha_lower``.
        alpha_upper: ``P(tr B > upper) <= alpha_upper``.
        cap: an upper limit of ``lambda_max(B)`` (None: no cap, the rank-one worst case).
        n: the dimension of ``B`` (with a cap, ``tr B <= n cap`` is a sure limit).

    Returns:
        ``(lower, upper)``; ``lower <= s / m <= upper``.
    """
    if s < 0 or m < 1:
        raise ValueError(f"s must be >= 0 and m >= 1, got s={s}, m={m}")
    n = n if n is not None else 2**62
    estimate = s / m
    ceiling = n * cap if cap is not None and math.isfinite(cap) else math.inf
    if s == 0:  # P(s = 0) = 0 unless B = 0
        return 0.0, 0.0
    log_a_low, log_a_up = math.log(alpha_lower), math.log(alpha_upper)
    lower = _bisect(lambda t: _log_tail(t, s, m, cap, n, True) < log_a_low, 0.0, estimate, keep_high=False)
    hi = max(estimate, 1e-300) * 2
    while _log_tail(hi, s, m, cap, n, False) >= log_a_up and hi < ceiling:
        hi *= 2
    upper = _bisect(lambda t: _log_tail(t, s, m, cap, n, False) >= log_a_up, estimate, hi, keep_high=True)
    return lower, min(upper, max(ceiling, estimate))
