"""Sound certificates of r-robustness: a radius R_cert per point such that, with probability at least
``confidence`` over vaefast's own Monte-Carlo sampling (per point; ``joint=True``: for the whole batch), every
perturbation ``||delta||_2 <= R_cert`` keeps the model r-robust at x, with no first-order approximation and with
sigma allowed to change.

The argument. Let ``S = {z : ||g(z) - g(mu(x))||_2 <= r}`` (fixed: the reference is the clean reconstruction),
``P0 = N(mu0, diag s0^2)`` the posterior at x and ``P1 = N(mu1, diag s1^2)`` at ``x + delta``, so
``p_r(x, delta) = P1(S)``. Through the intermediate ``Pm = N(mu1, diag s0^2)``:

1. Mean shift (Neyman–Pearson, as in randomized smoothing; Cohen, Rosenfeld & Kolter 2019): among all sets of
   P0-probability ``p0``, a half-space normal to the whitened shift has the least Pm-probability, so
   ``Pm(S) >= Phi(Phi^-1(p0) - ||diag(1/s0) (mu1 - mu0)||_2)``.
2. Scale change: ``|P1(S) - Pm(S)| <= TV(N(0, s0^2), N(0, s1^2))``. With ``t_i = log(s1_i / s0_i)`` the
   Bhattacharyya coefficient of the two product Gaussians is ``prod_i cosh(t_i)^(-1/2) >= exp(-||t||^2 / 4)``
   (``log cosh u <= u^2 / 2``), and ``TV <= sqrt(1 - BC^2) <= sqrt(1 - exp(-||t||^2 / 2))``.
3. Constants turn both into functions of ``R = ||delta||``: ``||diag(1/s0)(mu1 - mu0)|| <= L_w R + E_w`` and
   ``||t|| <= L_s R + E_s`` on the ball of radius R (:mod:`.bounds`; E: jumps of discontinuous functions, else 0).
4. The Monte-Carlo part: ``p0 >= p_low``, the one-sided Clopper–Pearson lower limit of ``p_r(x, 0)`` at level
   ``1 - confidence`` (``(1 - confidence) / B`` per point with ``joint=True``, Bonferroni), which holds with
   probability ``>= confidence``.

Hence ``p_r(x, delta) >= Phi(Phi^-1(p_low) - L_w R - E_w) - sqrt(1 - exp(-(L_s R + E_s)^2 / 2))``, and R is
certified when this exceeds 1/2 (:mod:`.search`). This is the route of Barrett, Camuto, Willetts & Rainforth,
"Certifiably Robust Variational Autoencoders" (arXiv 2102.07559), with a total-variation term for sigma in place of
their decoder-Lipschitz one: no decoder constant is needed because S is fixed.

The encoder is read from what it computes: ``model.encode`` traced by ``torch.export`` (:mod:`.trace`), checked
against ``model.encode(x)`` on the points, every op with one rule of :mod:`.rules` (a constant, an interval map, a
derivative bound), and what has no sound rule refused by name (:class:`CertificationRefused`, a ``ValueError``).

Public names: :func:`certify` (``vaefast.certify``), :class:`Certificate`, :class:`EncoderCertifier` (built once per
model, for batched use: ``EncoderCertifier.for_model(model, x).radii(x, p_low, method)``), :class:`Radii`,
:class:`CertificationRefused`, :func:`certificate_from_estimate`, :func:`lipschitz_constant`.
"""

from __future__ import annotations

from vaefast.certification.bounds import lipschitz_constant
from vaefast.certification.calls import CertificationRefused
from vaefast.certification.certifier import (
    METHODS,
    Certificate,
    EncoderCertifier,
    Radii,
    certificate_from_estimate,
    certify,
)

__all__ = [
    "METHODS",
    "Certificate",
    "CertificationRefused",
    "EncoderCertifier",
    "Radii",
    "certificate_from_estimate",
    "certify",
    "lipschitz_constant",
]
