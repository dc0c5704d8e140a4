"""vaefast: fast, batched adversarial-robustness analysis of variational autoencoders.

Implements the r-robustness framework of Camuto et al. (AISTATS 2021): Monte-Carlo r-robustness
probabilities, the smallest robust radius, the input-space margin bound
``min_i sigma_i * Phi^-1(p) / ||J_mu||_F`` and its variants, numerically estimated margins from
maximum-damage attacks, latent/output attacks, and sweeps with plots and reports.

Public names and submodules are loaded lazily on first access (``vaefast.models.VAE``, ``vaefast.attacks``,
``vaefast.data.load`` ... all work right after ``import vaefast``), so ``import vaefast`` stays cheap and never
imports matplotlib (only ``vaefast.plots`` and the report's figures do).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from vaefast._extension import compiled_with_cuda, has_compiled_ops
from vaefast._version import __version__

# public name -> submodule that defines it
_LAZY: dict[str, str] = {
    # compiled ops (with pure-PyTorch fallback)
    "reparam_sample": "vaefast.ops",
    "sphere_hits": "vaefast.ops",
    "mlp_jacobian_frobenius": "vaefast.ops",
    # encoder Jacobians
    "jacobian_frobenius": "vaefast.jacobian",
    "jacobian_spectral": "vaefast.jacobian",
    "jacobian_norms": "vaefast.jacobian",
    "encoder_jacobian": "vaefast.jacobian",
    # models, data, training
    "VAE": "vaefast.models",
    "VAEConfig": "vaefast.models",
    "as_vae": "vaefast.models",
    "load_model": "vaefast.models",
    "train": "vaefast.training",
    # robustness estimators
    "estimate_r_robustness": "vaefast.robustness",
    "margin_bound": "vaefast.robustness",
    "is_r_robust": "vaefast.robustness",
    "auto_radii": "vaefast.sweep.inputs",
    # attacks and margins
    "MaxDamageAttack": "vaefast.attacks",
    "LatentAttack": "vaefast.attacks",
    "OutputAttack": "vaefast.attacks",
    "AttackResult": "vaefast.attacks",
    "likelihood_degradation": "vaefast.attacks",
    "auddc": "vaefast.attacks",
    "numerical_margin": "vaefast.margin",
    "certify": "vaefast.certification",
    "NumericalMargin": "vaefast.margin",
    # sweeps, their evidence, the demo
    "run_sweep": "vaefast.sweep",
    "verify_sweep": "vaefast.verify",
    "run_demo": "vaefast.demo",
}

__all__ = ["__version__", "compiled_with_cuda", "has_compiled_ops", *_LAZY]


@functools.cache
def public_submodules() -> frozenset[str]:
    """The package's public submodules (every module or subpackage whose name has no leading underscore).

    Returns:
        Their names (``"models"``, ``"attacks"``, ``"data"`` ...), found by listing the package folder (no import).
    """
    return frozenset(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def __getattr__(name: str) -> Any:
    """Import a public name's submodule (or a public submodule itself) on first access.

    Args:
        name: a name of ``__all__`` or of :func:`public_submodules`.

    Returns:
        The object (cached in the package namespace, so later lookups are plain attribute reads).
    """
    if name in public_submodules():
        value = importlib.import_module(f"{__name__}.{name}")
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'vaefast' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names and submodules.

    Returns:
        Them, sorted.
    """
    return sorted({*__all__, *public_submodules()})
