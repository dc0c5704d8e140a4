"""The certifier of one model's encoder (traced once, constants cached by the weights' digest), the certificate of a
batch from an estimate, and the public :func:`certify`."""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch
from torch import nn

from vaefast._checks import (
    analysis,
    check_analysis_inputs,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_probability,
    check_seed,
    eval_mode,
)
from vaefast._digest import model_digest
from vaefast._results import ResultMixin
from vaefast.certification.bounds import EncoderBounds
from vaefast.certification.calls import CertificationRefused
from vaefast.certification.search import global_radii, local_radii, upper_radius
from vaefast.certification.trace import Graph, trace_encoder
from vaefast.stats import clopper_pearson_one_sided

__all__ = ["METHODS", "Certificate", "EncoderCertifier", "Radii", "certificate_from_estimate", "certify"]

METHODS = ("global", "local")
_CACHE: weakref.WeakKeyDictionary[nn.Module, EncoderCertifier] = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class Radii:
    """Certified radii of ``B`` points at ``K`` values of ``p_low`` each.

    Attributes:
        radius: ``[B, K]`` float64, 0 where ``p_low <= 1/2``.
        lipschitz_mean: ``[B, K]`` the constant of ``diag(1 / sigma(x)) mu`` used at that radius.
        lipschitz_log_sigma: ``[B, K]`` the constant of ``log sigma`` used at that radius.
    """

    radius: torch.Tensor
    lipschitz_mean: torch.Tensor
    lipschitz_log_sigma: torch.Tensor


class EncoderCertifier:
    """One model's encoder read as a traced graph (:func:`~vaefast.certification.trace.trace_encoder`), with its
    global constants computed once. Build it with :meth:`for_model` (cached per model and weights' digest).

    Args:
        model: the protocol model.
        graph: its traced ``encode``.
        digest: :func:`vaefast._digest.model_digest` of its weights.
    """

    def __init__(self, model: nn.Module, graph: Graph, digest: str) -> None:
        self.model, self.graph, self.digest = model, graph, digest
        self.bounds = EncoderBounds(graph)
        self.key = (graph.nodes[0].shape, digest)

    @classmethod
    def for_model(cls, model: nn.Module, x: torch.Tensor) -> EncoderCertifier:
        """The certifier of ``model`` (traced on ``x``; reused while the weights' digest and the input shape stay).

        Args:
            model: a protocol model (an ``nn.Module``).
            x: points ``[B, *input_shape]`` on the model's device, in its dtype (validated by the caller).

        Returns:
            The certifier.

        Raises:
            CertificationRefused: the encoder cannot be traced or has an op without a rule.
        """
        if not isinstance(model, nn.Module):
            raise CertificationRefused(f"certify: the model must be an nn.Module to be traced, got {type(model)}")
        key = (tuple(x.shape[1:]), model_digest(model))
        cached = _CACHE.get(model)
        if cached is not None and cached.key == key and cached.graph.device == x.device:
            return cached
        certifier = cls(model, trace_encoder(model, x), key[1])
        _CACHE[model] = certifier
        return certifier

    def radii(self, x: torch.Tensor, p_low: torch.Tensor, method: str = "global") -> Radii:
        """Certified radii of the points ``x`` for each lower limit ``p_low[b, k]`` of ``p_r(x_b, 0)``.

        Every ``||delta||_2 <= radius[b, k]`` keeps ``p_r(x_b, delta) > 1/2`` whenever ``p_r(x_b, 0) >= p_low[b, k]``
        (the K columns are typically K reconstruction radii r of the same points). Vectorised over points, columns
        and search steps, on the model's device.

        Args:
            x: ``[B, *input_shape]`` on the model's device, in its dtype.
            p_low: ``[B, K]`` (any device); points with ``p_low <= 1/2`` get radius 0.
            method: ``"global"`` or ``"local"`` (module :mod:`vaefast.certification.bounds`).

        Returns:
            The :class:`Radii` (on the model's device).

        Raises:
            CertificationRefused: the traced graph does not reproduce ``model.encode(x)``, or an op has no rule for
                ``method``.
        """
        method = check_choice("method", method, METHODS)
        p_low = torch.as_tensor(p_low, dtype=torch.float64, device=x.device)
        if p_low.dim() != 2 or p_low.shape[0] != x.shape[0]:
            raise ValueError(f"p_low must have shape [B={x.shape[0]}, K], got {tuple(p_low.shape)}")
        with torch.no_grad(), eval_mode(self.model):
            mu, logvar = self.model.encode(x)
            values = self.graph.check(x, (mu, logvar), "model.encode")
        w = torch.exp(-0.5 * logvar.detach().double()).reshape(x.shape[0], -1)
        q = torch.special.ndtri(p_low.clamp(0.5, 1 - 1e-16))
        with torch.no_grad():
            radius, constants = self._global(q, w) if method == "global" else self._local(q, w, values)
        radius = torch.where(p_low > 0.5, radius, torch.zeros_like(radius))
        return Radii(radius, constants[0].expand_as(q).clone(), constants[2].expand_as(q).clone())

    def _global(self, q: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        lw, ew = self.bounds.global_mean(w)
        ls, es = self.bounds.global_log_sigma()
        constants = (
            lw[:, None],
            ew[:, None],
            torch.tensor(ls, dtype=q.dtype, device=q.device),
            torch.tensor(es, dtype=q.dtype, device=q.device),
        )
        constants = tuple(c.expand_as(q) for c in constants)
        return global_radii(q, constants), constants

    def _local(self, q: torch.Tensor, w: torch.Tensor, values: list[torch.Tensor]):
        try:
            start, start_constants = self._global(q, w)
        except CertificationRefused:  # no global constant (exp, log): start from 0 with infinite constants
            start = torch.zeros_like(q)
            start_constants = (torch.full_like(q, float("inf")), torch.zeros_like(q)) * 2

        def local(radius: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self.bounds.local(values, w, radius)

        at_x = local(torch.zeros(q.shape[0], 1, dtype=torch.float64, device=q.device))  # constants at x itself
        hi = upper_radius(q, at_x[0].expand_as(q), at_x[2].expand_as(q))
        return local_radii(q, start, start_constants, hi, local)


@dataclasses.dataclass(repr=False)
class Certificate(ResultMixin):
    """Sound certified radii of ``B`` points at one reconstruction radius r (CPU tensors).

    Attributes:
        radius: ``[B]`` float64 R_cert (0 where ``p_low <= 1/2``: no certificate).
        p_low: ``[B]`` the one-sided Clopper–Pearson lower limit of ``p_r(x, 0)`` at the certificate's level.
        lipschitz_mean, lipschitz_log_sigma: ``[B]`` the constants used at R_cert.
        r: the reconstruction radius.
        method: ``"global"`` or ``"local"``.
        confidence: the stated confidence (per point; for the whole batch with ``joint``).
        joint: whether the confidence holds for all points at once (Bonferroni over the batch).
        num_samples: the Monte-Carlo samples of the estimate.
        point_index: ``[B]`` global point ids of the estimate.
    """

    radius: torch.Tensor
    p_low: torch.Tensor
    lipschitz_mean: torch.Tensor
    lipschitz_log_sigma: torch.Tensor
    r: float
    method: str
    confidence: float
    joint: bool
    num_samples: int
    point_index: torch.Tensor

    _SHOW = ("point", "r", "method", "p_low", "radius", "lipschitz_mean", "lipschitz_log_sigma")

    def counts(self) -> dict[str, int]:
        """Points with a certificate (radius > 0) and without (``p_low <= 1/2``)."""
        n = int((self.radius > 0).sum())
        return {"certified": n, "not certified": len(self) - n}

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per point."""
        keys = ("radius", "p_low", "lipschitz_mean", "lipschitz_log_sigma")
        return [
            {"point": int(self.point_index[b]), "r": self.r, "method": self.method,
             **{k: getattr(self, k)[b].item() for k in keys}}
            for b in range(len(self))
        ]  # fmt: skip


def certificate_from_estimate(
    certifier: EncoderCertifier, x: torch.Tensor, estimate: Any, method: str, confidence: float, joint: bool = False
) -> Certificate:
    """The certificate of the points of a single-radius estimate (the sweep's certify stage calls this).

    Args:
        certifier: the model's :class:`EncoderCertifier`.
        x: the estimate's points (validated, on the model's device).
        estimate: an :class:`~vaefast.robustness.RRobustnessResult` with one radius column, of these points.
        method: ``"global"`` or ``"local"``.
        confidence: of the one-sided Clopper–Pearson lower limit ``p_low`` of ``p_r(x, 0)``.
        joint: Bonferroni over the batch (level ``(1 - confidence) / B`` per point).

    Returns:
        The :class:`Certificate`.
    """
    alpha = (1.0 - confidence) / (x.shape[0] if joint else 1)
    p_low, _ = clopper_pearson_one_sided(estimate.hits[:, 0].cpu(), estimate.num_samples, alpha)
    radii = certifier.radii(x, p_low[:, None], method)
    return Certificate(
        radius=radii.radius[:, 0].cpu(),
        p_low=p_low,
        lipschitz_mean=radii.lipschitz_mean[:, 0].cpu(),
        lipschitz_log_sigma=radii.lipschitz_log_sigma[:, 0].cpu(),
        r=float(estimate.radii[0]),
        method=method,
        confidence=confidence,
        joint=joint,
        num_samples=estimate.num_samples,
        point_index=estimate.point_index,
    )


@analysis
def certify(
    model: nn.Module,
    x: torch.Tensor,
    r: float,
    *,
    method: str = "global",
    confidence: float = 0.95,
    joint: bool = False,
    num_samples: int = 1000,
    seed: int = 0,
    point_offset: int = 0,
    estimate: Any = None,
) -> Certificate:
    """Sound certified radii of r-robustness.

    Guarantee: for each point, with probability at least ``confidence`` over vaefast's Monte-Carlo sampling, every
    perturbation ``||delta||_2 <= radius[b]`` keeps ``p_r(x_b, delta) > 1/2`` (with ``joint=True``: for all points
    of the batch at once). No first-order approximation; sigma may change with delta; no decoder constant is used.
    ``p_low`` is the one-sided Clopper–Pearson lower limit of ``p_r(x_b, 0)``; points with ``p_low <= 1/2`` get 0.
    The encoder is read from its traced forward (:mod:`vaefast.certification`); anything without a sound rule is
    refused with a :class:`~vaefast.certification.CertificationRefused` naming the op.

    Args:
        model: a protocol model (an ``nn.Module``; run in eval mode).
        x: points ``[B, *input_shape]`` on the model's device.
        r: the reconstruction radius (> 0).
        method: ``"global"`` (global Lipschitz constants) or ``"local"`` (constants over the ball, tighter).
        confidence: the confidence of the guarantee.
        joint: make the guarantee hold for the whole batch at once (Bonferroni: level ``(1 - confidence) / B``).
        num_samples, seed, point_offset: of the estimate of ``p_r(x, 0)`` (unused with ``estimate``).
        estimate: an :class:`~vaefast.robustness.RRobustnessResult` of exactly this model and these points with a
            column for r, to reuse (checked by its digest: another model, other points or a perturbed estimate is a
            ``ValueError``).

    Returns:
        A :class:`Certificate`.
    """
    from vaefast.robustness import column_for, estimate_r_robustness

    x, _, _ = check_analysis_inputs(model, x)
    method = check_choice("method", method, METHODS)
    confidence = check_probability("confidence", confidence)
    r = check_positive_float("r", r)
    if not isinstance(joint, bool):
        raise TypeError(f"joint must be a bool, got {type(joint).__name__}")
    if estimate is None:
        estimate = estimate_r_robustness(
            model, x, [r], num_samples=check_positive_int("num_samples", num_samples), seed=check_seed("seed", seed),
            confidence=confidence, point_offset=point_offset,
        )  # fmt: skip
    est = column_for(estimate, r, x, model=model)
    certifier = EncoderCertifier.for_model(model, x)
    return certificate_from_estimate(certifier, x, est, method, confidence, joint)
