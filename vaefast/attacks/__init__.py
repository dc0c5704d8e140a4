"""Attacks on VAEs: maximum damage, latent-space and output-space targeted attacks, their metrics.

Every attack is an :class:`Attack`: configured once, called on batches (foolbox/torchattacks style), returning an
:class:`AttackResult`; every perturbation respects its norm budget and the data box exactly, and every random
number is keyed by the global point id, so a point gets the same attack in any batch.
"""

from vaefast.attacks import metrics
from vaefast.attacks.base import Attack, AttackResult
from vaefast.attacks.latent import LatentAttack
from vaefast.attacks.max_damage import MaxDamageAttack
from vaefast.attacks.metrics import auddc, distances, likelihood_degradation
from vaefast.attacks.output import OutputAttack
from vaefast.attacks.targeted import LambdaSweep

__all__ = [
    "Attack",
    "AttackResult",
    "LambdaSweep",
    "LatentAttack",
    "MaxDamageAttack",
    "OutputAttack",
    "auddc",
    "distances",
    "likelihood_degradation",
    "metrics",
]
