"""Attack metrics: likelihood degradation (Camuto et al. 2021), AUDDC (Gondim-Ribeiro et al. 2018), distances."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vaefast._checks import analysis, check_inputs, check_model, check_tensor
from vaefast.attacks.base import broadcast_target, check_like


@dataclass
class LikelihoodDegradation:
    """Per-point likelihood damage of an input perturbation ``delta``, ``z = mu(x)``, ``z* = mu(x + delta)``,
    both log-likelihoods scored on the *clean* x:

    - ``relative = |log p(x|z*) - log p(x|z)| / |log p(x|z)|`` (>= 0; 0 = no damage);
    - ``drop = log p(x|z) - log p(x|z*)`` in nats (> 0: the perturbation lowered the likelihood of x);
    - ``log_lik_clean = log p(x|z)``, ``log_lik_adv = log p(x|z*)``.

    So ``relative == |drop| / |log_lik_clean|`` exactly. The paper writes ``|log p(x|z*) - log p(x|z)| / log p(x|z)``:
    the same magnitude, but negative whenever ``log p < 0`` (every Bernoulli model) and meaningless where
    ``log p`` can be near 0 (Gaussian likelihoods, whose densities may exceed 1); there ``drop`` is the quantity
    to report.

    Attributes:
        relative: ``[B]`` relative degradation.
        drop: ``[B]`` log-likelihood drop in nats.
        log_lik_clean: ``[B]`` ``log p(x|z)``.
        log_lik_adv: ``[B]`` ``log p(x|z*)``.
    """

    relative: torch.Tensor
    drop: torch.Tensor
    log_lik_clean: torch.Tensor
    log_lik_adv: torch.Tensor

    def to_rows(self) -> list[dict[str, float]]:
        """One dict per point.

        Returns:
            ``{"point", "relative", "drop", "log_lik_clean", "log_lik_adv"}`` as Python scalars.
        """
        return [
            {
                "point": i,
                "relative": float(self.relative[i]),
                "drop": float(self.drop[i]),
                "log_lik_clean": float(self.log_lik_clean[i]),
                "log_lik_adv": float(self.log_lik_adv[i]),
            }
            for i in range(self.relative.shape[0])
        ]


def _relative(drop: torch.Tensor, log_lik: torch.Tensor) -> torch.Tensor:
    """``|drop| / |log_lik|``, with ``0 / 0 = 0`` (no change of a zero log-likelihood is no damage)."""
    num = drop.abs()
    return torch.where(num == 0, torch.zeros_like(num), num / log_lik.abs())


@analysis
@torch.no_grad()
def likelihood_degradation(model: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor) -> LikelihoodDegradation:
    """Relative log-likelihood degradation and plain drop of a perturbation (usually from the max-damage attack).

    Args:
        model: a protocol model with ``log_likelihood(x, z)``; run in eval mode (modes restored afterwards); a
            model without a known input shape learns it from ``x``.
        x: clean points ``[B, *input_shape]``.
        delta: perturbations of x's shape.

    Returns:
        :class:`LikelihoodDegradation` with ``ll = log p(x|mu(x))``, ``ll* = log p(x|mu(x + delta))``,
        ``drop = ll - ll*`` (nats) and ``relative = |ll* - ll| / |ll|`` (>= 0; 0 where ``drop == 0``).
    """
    model = check_model(model, requires=("log_likelihood",))
    x = check_inputs(model, x)
    delta = check_like("delta", delta, x)
    ll = model.log_likelihood(x, model.encode(x)[0])
    ll_adv = model.log_likelihood(x, model.encode(x + delta)[0])
    drop = ll - ll_adv
    return LikelihoodDegradation(_relative(drop, ll), drop, ll, ll_adv)


@analysis
@torch.no_grad()
def distances(
    model: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor, target: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-point L2 distances of a perturbation in input, latent and output space.

    Args:
        model: a protocol model; run in eval mode (modes restored afterwards); a model without a known input shape
            learns it from ``x``.
        x: clean points ``[B, *input_shape]``.
        delta: perturbations of x's shape.
        target: optional targets ``[1 or B, *input_shape]``.

    Returns:
        ``input`` ``||delta||``, ``reconstruction`` ``||g(mu(x+delta)) - g(mu(x))||``, ``latent``
        ``||mu(x+delta) - mu(x)||``, and with a target ``target`` ``||g(mu(x+delta)) - x_t||`` and
        ``latent_target`` ``||mu(x+delta) - mu(x_t)||``, each ``[B]``.
    """
    model = check_model(model)
    x = check_inputs(model, x)
    delta = check_like("delta", delta, x)
    mu, mu_adv = model.encode(x)[0], model.encode(x + delta)[0]
    rec, rec_adv = model.decode(mu).flatten(1), model.decode(mu_adv).flatten(1)
    out = {
        "input": torch.linalg.vector_norm(delta.flatten(1), dim=1),
        "reconstruction": torch.linalg.vector_norm(rec_adv - rec, dim=1),
        "latent": torch.linalg.vector_norm(mu_adv - mu, dim=1),
    }
    if target is not None:
        target = broadcast_target(check_inputs(model, target, "target"), x)
        out["target"] = torch.linalg.vector_norm(rec_adv - target.flatten(1), dim=1)
        out["latent_target"] = torch.linalg.vector_norm(mu_adv - model.encode(target)[0], dim=1)
    return out


def auddc(
    input_distortion: torch.Tensor,
    output_distortion: torch.Tensor,
    input_scale: torch.Tensor,
    output_scale: torch.Tensor,
) -> torch.Tensor:
    """Area under the normalised distortion–distortion curve of a lambda sweep, per point (Gondim-Ribeiro 2018).

    ``input_distortion[L, B]``: ``||delta_lam||_2``; ``output_distortion[L, B]``: distance of the attacked
    reconstruction (or latent code) to the target. Normalisation, per point: x = input distortion / ``input_scale``
    (usually ``||x_t - x||_2``, the distortion that would reach the target trivially), y = output distortion /
    ``output_scale`` (usually the same distance at ``delta = 0``), both clipped to [0, 1]. The curve starts at
    (0, 1) (no attack), is the running minimum of y over increasing x (the best output distortion reachable
    with at most that input distortion), and is extended flat to x = 1; the area is by trapezoids, in [0, 1].
    Lower = the model is easier to attack.

    Args:
        input_distortion: ``[L, B]``.
        output_distortion: ``[L, B]``.
        input_scale: ``[B]`` > 0.
        output_scale: ``[B]`` > 0.

    Returns:
        ``[B]`` float64 areas in [0, 1].
    """
    xin = check_tensor("input_distortion", input_distortion, ndim=2).to(torch.float64)
    yout = check_tensor("output_distortion", output_distortion, ndim=2).to(torch.float64)
    if xin.shape != yout.shape:
        raise ValueError(f"input_distortion {tuple(xin.shape)} and output_distortion {tuple(yout.shape)} differ")
    sx = check_tensor("input_scale", input_scale, ndim=1).to(torch.float64)
    sy = check_tensor("output_scale", output_scale, ndim=1).to(torch.float64)
    if sx.shape[0] != xin.shape[1] or sy.shape[0] != xin.shape[1]:
        raise ValueError("input_scale and output_scale must have one entry per point")
    if bool((sx <= 0).any()) or bool((sy <= 0).any()):
        raise ValueError("input_scale and output_scale must be > 0")
    xs = (xin / sx).clamp(0, 1).T  # [B, L]
    ys = (yout / sy).clamp(0, 1).T
    b = xs.shape[0]
    like = dict(dtype=xs.dtype, device=xs.device)
    xs = torch.cat([torch.zeros(b, 1, **like), xs, torch.ones(b, 1, **like)], 1)
    ys = torch.cat([torch.ones(b, 1, **like), ys, torch.full((b, 1), 2.0, **like)], 1)
    order = torch.argsort(xs + 1e-12 * torch.arange(xs.shape[1], **like), dim=1)  # stable; (1, ·) last
    xs, ys = xs.gather(1, order), ys.gather(1, order)
    ys = torch.cummin(ys, dim=1).values
    return torch.trapezoid(ys, xs, dim=1)
