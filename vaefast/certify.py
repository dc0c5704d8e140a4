"""Sound certificates of r-robustness: a radius R_cert per point such that, with probability at least
``confidence`` over vaefast's own Monte-Carlo sampling, every perturbation ``||delta||_2 <= R_cert`` keeps the model
r-robust at x, with no first-order approximation and with sigma allowed to change.

The argument. Let ``S = {z : ||g(z) - g(mu(x))||_2 <= r}`` (fixed: the reference is the clean reconstruction),
``P0 = N(mu0, diag s0^2)`` the posterior at x and ``P1 = N(mu1, diag s1^2)`` at ``x + delta``, so
``p_r(x, delta) = P1(S)``. Through the intermediate ``Pm = N(mu1, diag s0^2)``:

1. Mean shift (Neyman-Pearson, as in randomized smoothing; Cohen, Rosenfeld & Kolter 2019): among all sets of
   P0-probability ``p0``, a half-space normal to the whitened shift has the least Pm-probability, so
   ``Pm(S) >= Phi(Phi^-1(p0) - ||diag(1/s0) (mu1 - mu0)||_2)``.
2. Scale change: ``|P1(S) - Pm(S)| <= TV(N(0, s0^2), N(0, s1^2))``. With ``t_i = log(s1_i / s0_i)`` the
   Bhattacharyya coefficient of the two product Gaussians is ``prod_i cosh(t_i)^(-1/2) >= exp(-||t||^2 / 4)``
   (``log cosh u <= u^2 / 2``), and ``TV <= sqrt(1 - BC^2) <= sqrt(1 - exp(-||t||^2 / 2))``.
3. Lipschitz constants turn both into functions of ``R = ||delta||``: ``||diag(1/s0)(mu1 - mu0)|| <= L_w R`` with
   ``L_w`` a Lipschitz constant of the whitened mean map ``x' -> diag(1/s0) mu(x')`` and ``||t|| <= L_s R`` with
   ``L_s`` one of ``x' -> log sigma(x')`` (both on the ball of radius R around x).
4. The Monte-Carlo part: ``p0 >= p_low``, the Clopper-Pearson lower limit of ``p_r(x, 0)`` (two-sided at
   ``confidence``, as the certified first-order bound uses it), which holds with probability ``>= confidence``.

Hence ``p_r(x, delta) >= Phi(Phi^-1(p_low) - L_w R) - sqrt(1 - exp(-(L_s R)^2 / 2))``, and R is certified when
this is ``> 1/2``; ``R_cert`` is the largest such R (found by bisection; the left side decreases in R). This is the
route of Barrett, Camuto, Willetts & Rainforth, "Certifiably Robust Variational Autoencoders" (arXiv 2102.07559),
with a total-variation term for sigma in place of their decoder-Lipschitz one: no decoder constant is needed
because S is fixed.

Constants. ``method="global"``: products of per-layer spectral norms (exact float64 singular values inflated by a
relative 1e-6 for rounding; a convolution ``K`` is bounded by ``sqrt(ceil(kh/sh) ceil(kw/sw)) ||K_mat||_2``, each
input entry entering at most that many patches) times the activations' Lipschitz constants; the whitening scales
the mean head's rows by ``1/s0`` per point. ``method="local"`` (MLP encoders): interval bound propagation of the
pre-activations over the l2 ball (first layer exact: ``W x + b +- R ||w_row||_2``), the activations' derivatives
bounded on those intervals (``|phi'| <= d``), and ``sup ||J|| <= ||W_1|| prod_l ||W_l diag(d_(l-1))||`` (mean value
theorem), with the largest R the bound accepts found by bisection.

Supported layers: ``Linear`` (also parametrized, e.g. orthonormal), ``Conv2d`` (global only), ``Flatten``,
``Identity``, ``Scale``, ``GroupSort`` and the activations of :data:`vaefast.reference.MLP_ACTIVATIONS`; anything
else is a ``TypeError`` naming the layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from scipy import stats as sps
from torch import nn

from vaefast._checks import analysis, check_analysis_inputs, check_choice, check_positive_int, check_probability
from vaefast._results import ResultMixin
from vaefast.models.lipschitz import GroupSort, Scale
from vaefast.reference import activation_of

__all__ = ["Certificate", "EncoderNetworks", "certify", "encoder_networks", "lipschitz_upper_bound"]

METHODS = ("global", "local")
SPECTRAL_SLACK = 1e-6  # relative inflation of float64 singular values (LAPACK's error is ~1e-15 relative)
_ACT_LIPSCHITZ = {
    "relu": 1.0,
    "tanh": 1.0,
    "sigmoid": 0.25,
    "softplus": 1.0,
    "gelu": 1.1290,
    "gelu_tanh": 1.1290,
    "silu": 1.0999,
}  # fmt: skip  (max |phi'|: GELU 1.12893, SiLU 1.09984, rounded up)


@dataclasses.dataclass
class EncoderNetworks:
    """The encoder as two networks of supported layers: ``mean: x -> mu`` and ``log_sigma: x -> raw`` with
    ``log sigma = log_sigma_scale * b(raw)``, ``b`` 1-Lipschitz (the soft clamp); ``log_sigma=None``: constant sigma."""

    mean: nn.Sequential
    log_sigma: nn.Sequential | None
    log_sigma_scale: float = 0.5


@dataclasses.dataclass
class Certificate(ResultMixin):
    """Per point: ``radius`` (R_cert; 0 where ``p_low <= 1/2``), ``p_low``, the constants used at R_cert
    (``lipschitz_mean`` of the whitened mean map, ``lipschitz_log_sigma``), and the settings."""

    radius: torch.Tensor
    p_low: torch.Tensor
    lipschitz_mean: torch.Tensor
    lipschitz_log_sigma: torch.Tensor
    r: float
    method: str
    confidence: float
    num_samples: int
    point_index: torch.Tensor

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per point."""
        keys = ("radius", "p_low", "lipschitz_mean", "lipschitz_log_sigma")
        return [
            {
                "point": int(self.point_index[b]),
                "r": self.r,
                "method": self.method,
                **{k: getattr(self, k)[b].item() for k in keys},
            }
            for b in range(len(self))
        ]


def encoder_networks(model: Any) -> EncoderNetworks:
    """The mean and log-sigma networks of a model's encoder.

    Args:
        model: vaefast's ``VAE`` (and ``as_vae`` adapters) whose encoder has ``trunk``, ``mu`` and ``logvar``
            submodules, ``vaefast.testing.LinearGaussianVAE`` (constant sigma), or any model with a method
            ``encoder_networks()`` returning an :class:`EncoderNetworks`.

    Returns:
        The networks (sharing the model's parameters).
    """
    if callable(getattr(model, "encoder_networks", None)):
        return model.encoder_networks()
    enc = getattr(model, "encoder", None)
    if all(isinstance(getattr(enc, n, None), nn.Module) for n in ("trunk", "mu", "logvar")):
        return EncoderNetworks(nn.Sequential(*enc.trunk, enc.mu), nn.Sequential(*enc.trunk, enc.logvar), 0.5)
    if isinstance(getattr(model, "encoder_mean", None), nn.Linear):  # the linear-Gaussian VAE
        return EncoderNetworks(nn.Sequential(model.encoder_mean), None)
    raise TypeError(
        f"certify: cannot read the encoder of {type(model).__name__} as networks of supported layers: give it "
        "encoder.trunk / encoder.mu / encoder.logvar submodules or an encoder_networks() method"
    )


def _flat(net: nn.Sequential) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in net:
        out.extend(_flat(m) if isinstance(m, nn.Sequential) else [m])
    return out


def _spectral(matrix: torch.Tensor) -> torch.Tensor:
    """Upper bound of ``||M||_2`` (batched over leading dims): float64 singular values inflated by SPECTRAL_SLACK."""
    return torch.linalg.matrix_norm(matrix.detach().double(), ord=2) * (1 + SPECTRAL_SLACK)


def _layer_constant(layer: nn.Module) -> float:
    """A Lipschitz constant (l2) of one supported layer."""
    if isinstance(layer, nn.Linear):
        return float(_spectral(layer.weight))
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        sh, sw = layer.stride
        overlap = math.ceil(kh / sh) * math.ceil(kw / sw)
        return math.sqrt(overlap) * float(_spectral(layer.weight.reshape(layer.weight.shape[0], -1)))
    if isinstance(layer, (nn.Flatten, nn.Identity, GroupSort)):
        return 1.0
    if isinstance(layer, Scale):
        return abs(float(layer.factor))
    return _activation_constant(layer)


def _activation_constant(layer: nn.Module) -> float:
    found = activation_of(layer)
    if found is None:
        raise TypeError(f"certify: unsupported layer {type(layer).__name__} ({layer!r}); see vaefast.certify's docs")
    name, param = found
    if name == "leaky_relu":
        return max(1.0, abs(param))
    if name == "elu":
        return max(1.0, abs(param))
    return _ACT_LIPSCHITZ[name]


def lipschitz_upper_bound(net: nn.Sequential, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A certified upper bound of the global l2 Lipschitz constant of ``net`` (product over its layers).

    Args:
        net: a Sequential of supported layers (nested Sequentials are flattened).
        row_scale: ``[B, d]`` per-point scales of the output (the whitening ``1/s0``), applied to the last linear
            layer's rows (and to everything after it, which must be scalar scalings); None: no scaling.

    Returns:
        ``[B]`` (or a 0-d tensor without ``row_scale``), float64.
    """
    layers = _flat(net)
    last = max((i for i, m in enumerate(layers) if isinstance(m, nn.Linear)), default=None)
    total = torch.tensor(1.0, dtype=torch.float64)
    for i, layer in enumerate(layers):
        if row_scale is not None and i == last:
            total = total * _spectral(row_scale.double()[:, :, None] * layer.weight.detach().double()[None])
        else:
            total = total * _layer_constant(layer)
    return total


# --- local constants: interval bound propagation over the l2 ball -------------------------------------------------
def _derivative_bound(layer: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``max |phi'(h)|`` over ``h in [lo, hi]`` per unit, for an elementwise activation."""
    name, p = activation_of(layer) or (None, 0.0)
    if name == "relu":
        return (hi > 0).to(lo.dtype)
    if name == "leaky_relu":
        return torch.where(hi > 0, torch.ones_like(hi), torch.zeros_like(hi)).clamp_min(abs(p))
    if name == "elu":
        return (
            torch.where(hi > 0, torch.ones_like(hi), p * torch.exp(hi.clamp_max(0)))
            .clamp_min(0)
            .maximum(torch.where(hi > 0, p * torch.exp(lo.clamp_max(0)), torch.zeros_like(hi)))
        )
    if name in ("tanh", "sigmoid"):
        nearest = torch.where(lo > 0, lo, torch.where(hi < 0, hi, torch.zeros_like(lo)))  # closest to 0
        t = torch.tanh(nearest) if name == "tanh" else torch.sigmoid(nearest)
        return 1 - t * t if name == "tanh" else t * (1 - t)
    if name == "softplus":
        return torch.sigmoid(p * hi)  # phi' = sigmoid(beta h) increases
    return torch.full_like(lo, _activation_constant(layer))  # GELU, SiLU: the global maximum of |phi'|


def _activation_interval(layer: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An interval containing ``phi([lo, hi])``: exact for monotone activations, endpoint max and global min for
    GELU/SiLU (decreasing then increasing)."""
    a, b = layer(lo), layer(hi)
    name, _ = activation_of(layer) or (None, 0.0)
    if name in ("gelu", "gelu_tanh", "silu"):
        floor = {"gelu": -0.17, "gelu_tanh": -0.17, "silu": -0.2785}[name]
        return torch.minimum(torch.minimum(a, b), torch.full_like(a, floor)), torch.maximum(a, b)
    return torch.minimum(a, b), torch.maximum(a, b)


def _local_constant(net: nn.Sequential, x: torch.Tensor, radius: torch.Tensor, row_scale: torch.Tensor | None):
    """``sup ||J(x')||_2`` over ``||x' - x|| <= radius`` (upper bound, per point) for an MLP of Linear layers and
    elementwise activations: interval bounds of the pre-activations, then ``||W_1|| prod ||W_l diag(d)||``."""
    layers = [m for m in _flat(net) if not isinstance(m, (nn.Flatten, nn.Identity))]
    if any(isinstance(m, nn.Conv2d) for m in layers):
        raise TypeError("certify(method='local') supports MLP encoders (Linear, elementwise activations, GroupSort)")
    linears = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
    h = x.reshape(x.shape[0], -1).double()
    r = radius.double()[:, None]
    first = layers[linears[0]]
    w = first.weight.detach().double()
    center = h @ w.T + first.bias.detach().double()
    half = r * w.norm(dim=1)[None]  # exact: the l2 ball maps into these intervals
    scaled_first = row_scale is not None and linears[0] == linears[-1]
    total = _spectral(row_scale.double()[:, :, None] * w[None] if scaled_first else w).expand(x.shape[0]).clone()
    deriv = torch.ones_like(center)
    for layer in layers[linears[0] + 1 :]:
        if isinstance(layer, nn.Linear):
            w = layer.weight.detach().double()
            if layer is layers[linears[-1]] and row_scale is not None:
                w = row_scale.double()[:, :, None] * w[None]
            total = total * _spectral(w * deriv[:, None, :])
            center = center @ layer.weight.detach().double().T + layer.bias.detach().double()
            half = half @ layer.weight.detach().double().abs().T
            deriv = torch.ones_like(center)
        elif isinstance(layer, Scale):
            total = total * abs(float(layer.factor))
            center, half = center * float(layer.factor), half * abs(float(layer.factor))
        elif isinstance(layer, GroupSort):  # a permutation on each piece (norm 1); sorting is monotone per input
            lo, hi = layer(center - half), layer(center + half)
            center, half = (lo + hi) / 2, (hi - lo) / 2
        else:
            lo, hi = center - half, center + half
            deriv = _derivative_bound(layer, lo, hi)
            lo, hi = _activation_interval(layer, lo, hi)
            center, half = (lo + hi) / 2, (hi - lo) / 2
    return total


# --- the certificate ----------------------------------------------------------------------------------------------
def certified_p(p_low: torch.Tensor, lip_mean: torch.Tensor, lip_log_sigma: torch.Tensor, radius: torch.Tensor):
    """The certified lower bound of ``p_r(x, delta)`` over ``||delta|| <= radius`` (module docstring):
    ``Phi(Phi^-1(p_low) - L_w R) - sqrt(1 - exp(-(L_s R)^2 / 2))``."""
    q = torch.from_numpy(sps.norm.ppf(p_low.double().numpy()))
    shifted = torch.from_numpy(sps.norm.cdf((q - lip_mean * radius).numpy()))
    tv = torch.sqrt(-torch.expm1(-((lip_log_sigma * radius) ** 2) / 2))
    return shifted - tv


def _constants(nets: EncoderNetworks, x, radius, inv_sigma, method) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_w, L_s)`` per point: of the whitened mean map and of ``log sigma`` (global, or local on the ball)."""
    b = x.shape[0]
    if method == "global":
        lw = lipschitz_upper_bound(nets.mean, inv_sigma)
        ls = torch.zeros(b, dtype=torch.float64)
        if nets.log_sigma is not None:
            ls = ls + nets.log_sigma_scale * lipschitz_upper_bound(nets.log_sigma)
        return lw, ls
    lw = _local_constant(nets.mean, x, radius, inv_sigma)
    ls = torch.zeros(b, dtype=torch.float64)
    if nets.log_sigma is not None:
        ls = nets.log_sigma_scale * _local_constant(nets.log_sigma, x, radius, None)
    return lw, ls


def _search(nets, x, p_low, inv_sigma, method, iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The largest certified R per point: closed-form start from the global constants, then bisection."""
    b = x.shape[0]
    ok = p_low > 0.5
    zero = torch.zeros(b, dtype=torch.float64)
    lw, ls = _constants(nets, x, zero, inv_sigma, "global")
    lo = _bisect(lambda rad: certified_p(p_low, lw, ls, rad) > 0.5, zero, _upper(p_low, lw), iterations)
    if method == "local":
        lw0, _ = _constants(nets, x, zero, inv_sigma, "local")

        def accepts(rad):
            lwr, lsr = _constants(nets, x, rad, inv_sigma, "local")
            return certified_p(p_low, lwr, lsr, rad) > 0.5

        lo = _bisect(accepts, lo, _upper(p_low, lw0), iterations)
        lw, ls = _constants(nets, x, lo, inv_sigma, "local")
    return torch.where(ok, lo, zero), lw, ls


def _upper(p_low: torch.Tensor, lip: torch.Tensor) -> torch.Tensor:
    """A radius no certificate reaches: ``Phi^-1(p_low) / L`` (the mean-shift term alone reaches 1/2 there)."""
    q = torch.from_numpy(sps.norm.ppf(p_low.double().clamp(0.5, 1 - 1e-16).numpy()))
    return torch.where(lip > 0, q / lip.clamp_min(1e-300), torch.full_like(q, 1e6))


def _bisect(accepts, lo: torch.Tensor, hi: torch.Tensor, iterations: int) -> torch.Tensor:
    """Per point the largest accepted radius in ``[lo, hi]`` (``lo`` accepted), to ``iterations`` halvings."""
    lo, hi = lo.clone(), torch.maximum(hi, lo)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        good = accepts(mid)
        lo, hi = torch.where(good, mid, lo), torch.where(good, hi, mid)
    return lo


@analysis
def certify(
    model: nn.Module,
    x: torch.Tensor,
    r: float,
    method: str = "global",
    confidence: float = 0.95,
    num_samples: int = 1000,
    seed: int = 0,
    point_offset: int = 0,
    estimate: Any = None,
    iterations: int = 40,
) -> Certificate:
    """Sound certified radii of r-robustness (module docstring): with probability ``>= confidence`` over the
    Monte-Carlo estimate, every ``||delta||_2 <= radius[b]`` keeps ``p_r(x_b, delta) > 1/2``.

    Args:
        model: a protocol model whose encoder :func:`encoder_networks` can read (run in eval mode).
        x: points ``[B, *input_shape]``.
        r: the reconstruction radius.
        method: ``"global"`` (global Lipschitz constants) or ``"local"`` (constants over the ball; MLP encoders).
        confidence: of the Clopper-Pearson lower limit ``p_low`` of ``p_r(x, 0)``.
        num_samples, seed, point_offset: of the estimate of ``p_r(x, 0)`` (ignored with ``estimate``).
        estimate: an :class:`~vaefast.robustness.RRobustnessResult` at radius r to reuse (its ``ci_low``).
        iterations: bisection halvings of the radius search.

    Returns:
        A :class:`Certificate`.
    """
    from vaefast.robustness import column_for, estimate_r_robustness

    x, _, _ = check_analysis_inputs(model, x)
    method = check_choice("method", method, METHODS)
    confidence = check_probability("confidence", confidence)
    iterations = check_positive_int("iterations", iterations)
    if estimate is None:
        estimate = estimate_r_robustness(
            model, x, [r], num_samples=num_samples, seed=seed, confidence=confidence, point_offset=point_offset
        )
    est = column_for(estimate, r, x, model=model)
    nets = encoder_networks(model)
    with torch.no_grad():
        _, logvar = model.encode(x)
    inv_sigma = torch.exp(-0.5 * logvar.detach().double().cpu())
    p_low = est.ci_low[:, 0].double().cpu()
    xc = x.detach().cpu()
    radius, lw, ls = _search(nets, xc, p_low, inv_sigma, method, iterations)
    return Certificate(
        radius=radius,
        p_low=p_low,
        lipschitz_mean=lw.expand(len(radius)).clone(),
        lipschitz_log_sigma=ls.expand(len(radius)).clone(),
        r=float(r),
        method=method,
        confidence=est.confidence,
        num_samples=est.num_samples,
        point_index=est.point_index,
    )
