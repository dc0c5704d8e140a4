"""What a sweep computes: its specification, its work units and the identities of its rows.

The sweep is enumerated deterministically into **work units**: one model and one block of ``batch_size``
consecutive points (positions ``first_pos .. first_pos + n_points - 1``) with every radius r (one attack path per
point serves all radii), in the order models × blocks. A unit is computed as one batch and committed in one
transaction, so it is the unit of resume and of distribution: of the units not yet in the database, process ``rank``
of ``world_size`` computes those with index ``i ≡ rank (mod world_size)`` (:func:`shard`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vaefast._checks import as_radii, check_num_samples, check_positive_int, check_probability, check_seed
from vaefast.core.box import UNIT_BOX, Box, as_box
from vaefast.core.options import DEFAULT_CONFIDENCE, DEFAULT_NUM_SAMPLES, MarginOptions, with_overrides

SWEEP_FORMAT = "6"  # bump when the per-unit computation changes: resuming across versions is then refused


def rkey(value: float) -> str:
    """The exact text of a radius or budget in ids and seeds (``repr`` of the float: an exact round trip).

    Args:
        value: the number.

    Returns:
        ``repr(float(value))``.
    """
    return repr(float(value))


@dataclass(frozen=True)
class WorkUnit:
    """One model and a block of consecutive point positions, with every radius: computed and committed as a batch.

    Attributes:
        model: the model's name.
        first_pos: position of the block's first point.
        n_points: the number of points in the block.
    """

    model: str
    first_pos: int
    n_points: int

    @property
    def unit_id(self) -> str:
        """``model|pos=A:B``: the unit's id in the ``units`` table."""
        return f"{self.model}|pos={self.first_pos}:{self.first_pos + self.n_points}"

    @property
    def positions(self) -> range:
        """The point positions of the block."""
        return range(self.first_pos, self.first_pos + self.n_points)


def item_id(model: str, r: float, pos: int) -> str:
    """Stable id of a (model, point, r) result row.

    Args:
        model: model name.
        r: radius.
        pos: point position.

    Returns:
        ``model|r=R|pos=P``.
    """
    return f"{model}|r={rkey(r)}|pos={pos}"


def curve_item_id(model: str, r: float, eps: float, pos: int) -> str:
    """Stable id of a (model, point, r, eps) curve row.

    Args:
        model: model name.
        r: radius.
        eps: attack budget.
        pos: point position.

    Returns:
        ``model|r=R|eps=E|pos=P``.
    """
    return f"{model}|r={rkey(r)}|eps={rkey(eps)}|pos={pos}"


def enumerate_units(model_names: Sequence[str], n_points: int, batch_size: int) -> list[WorkUnit]:
    """All work units of a sweep in their canonical order (models × point blocks).

    Args:
        model_names: distinct model names.
        n_points: the number of points.
        batch_size: points per unit (the last block of a model may be smaller).

    Returns:
        The units.
    """
    check_positive_int("n_points", n_points)
    check_positive_int("batch_size", batch_size)
    if len(set(model_names)) != len(model_names):
        raise ValueError(f"model names must be unique, got {list(model_names)}")
    return [
        WorkUnit(name, start, min(batch_size, n_points - start))
        for name in model_names
        for start in range(0, n_points, batch_size)
    ]


def shard(units: Sequence[WorkUnit], rank: int, world_size: int) -> list[WorkUnit]:
    """The units of process ``rank`` out of ``world_size``: indices ``i ≡ rank (mod world_size)``.

    Args:
        units: every unit, in canonical order.
        rank: this process, ``0 <= rank < world_size``.
        world_size: the number of processes.

    Returns:
        The process's units (no padding, no duplicates).
    """
    check_positive_int("world_size", world_size)
    check_positive_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
    return list(units[rank::world_size])


def _radii(name: str, values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(r) for r in as_radii(name, values).tolist())


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """What to compute besides models and points (frozen, keyword-only, one default each).

    Attributes:
        radii: the distinct reconstruction radii r.
        attack_eps: budgets of the p̂-vs-attack-norm curves (empty: no curves).
        curve_radii: radii at which the curves are computed (``None``: every radius; each must be in ``radii``).
        num_samples: Monte-Carlo samples per estimate (and the most per decision of the margin search).
        confidence: of every interval, the clean decision, the margin search's claims and the certificates.
        seed: the base seed every stream is derived from.
        batch_size: points per work unit.
        box: the data range of the points (from the :class:`~vaefast.sweep.inputs.PointSet`), or None.
        margin: the margin search's settings (its ``num_samples`` and ``confidence`` are the sweep's); its attack
            settings (steps, restarts, noise samples, mode, optimizer) also run the curves' attacks.
    """

    radii: tuple[float, ...]
    attack_eps: tuple[float, ...] = ()
    curve_radii: tuple[float, ...] | None = None
    num_samples: int = DEFAULT_NUM_SAMPLES
    confidence: float = DEFAULT_CONFIDENCE
    seed: int = 0
    batch_size: int = 16
    box: Box | None = UNIT_BOX
    margin: MarginOptions = field(default_factory=MarginOptions)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "radii", _radii("radii", self.radii))
        if len(set(self.radii)) != len(self.radii):
            raise ValueError(f"radii must be distinct, got {list(self.radii)}")
        set_(self, "attack_eps", _radii("attack_eps", self.attack_eps) if self.attack_eps else ())
        if self.curve_radii is not None:
            set_(self, "curve_radii", _radii("curve_radii", self.curve_radii))
            unknown = set(self.curve_radii) - set(self.radii)
            if unknown:
                raise ValueError(f"curve_radii must be among radii, got {sorted(unknown)}")
        check_num_samples("num_samples", self.num_samples)
        check_probability("confidence", self.confidence)
        check_seed("seed", self.seed)
        check_positive_int("batch_size", self.batch_size)
        set_(self, "box", as_box(self.box))
        margin = self.margin
        if isinstance(margin, Mapping):
            margin = with_overrides(None, MarginOptions, dict(margin), "margin")
        if not isinstance(margin, MarginOptions):
            raise TypeError(f"margin must be a MarginOptions or a dict of its fields, got {type(margin).__name__}")
        set_(self, "margin", dataclasses.replace(margin, num_samples=self.num_samples, confidence=self.confidence))

    @property
    def curve_r(self) -> tuple[float, ...]:
        """The radii with curves (empty without budgets)."""
        if not self.attack_eps:
            return ()
        return self.radii if self.curve_radii is None else tuple(r for r in self.radii if r in self.curve_radii)

    def to_json(self) -> str:
        """The specification as JSON.

        Returns:
            Every field, keys sorted (stored in ``meta`` and part of the fingerprint).
        """
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> SweepSpec:
        """The specification stored in a database's ``meta``.

        Args:
            text: :meth:`to_json`'s output.

        Returns:
            The spec.
        """
        fields = json.loads(text)
        return cls(**fields)


def fingerprint(spec: SweepSpec, points: dict[str, Any], models: Sequence[tuple[str, str]]) -> str:
    """The identity of a sweep: resuming a database with another fingerprint is refused.

    Args:
        spec: the specification.
        points: the points' description (:meth:`vaefast.sweep.inputs.PointSet.describe`).
        models: ``(name, weights SHA-256)`` per model, in sweep order.

    Returns:
        The SHA-256 hex digest of the format version, the spec, the points and the models.
    """
    payload = [SWEEP_FORMAT, spec.to_json(), points, [list(m) for m in models]]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()
