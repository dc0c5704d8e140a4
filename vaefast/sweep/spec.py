"""What a sweep computes: its specification, its work units and the identities of its rows.

The sweep is enumerated deterministically into **work units**: one model, one radius r and one block of
``batch_size`` consecutive points (positions ``first_pos .. first_pos + n_points - 1``), in the order models ×
radii × blocks. A unit is computed as one batch and committed in one transaction, so it is the unit of resume and
of distribution: of the units not yet in the database, process ``rank`` of ``world_size`` computes those with index
``i ≡ rank (mod world_size)`` (:func:`shard`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vaefast._checks import as_radii, check_positive_float, check_positive_int, check_probability, check_seed

DEFAULT_BOX = (0.0, 1.0)  # every dataset vaefast loads is scaled to [0, 1]
SWEEP_FORMAT = "5"  # bump when the per-unit computation changes: resuming across versions is then refused


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
    """One model, one radius and a block of consecutive point positions: computed and committed as a batch.

    Attributes:
        model: the model's name.
        r: the reconstruction radius.
        first_pos: position of the block's first point.
        n_points: the number of points in the block.
    """

    model: str
    r: float
    first_pos: int
    n_points: int

    @property
    def unit_id(self) -> str:
        """``model|r=R|pos=A:B``: the unit's id in the ``units`` table."""
        return f"{self.model}|r={rkey(self.r)}|pos={self.first_pos}:{self.first_pos + self.n_points}"

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


def enumerate_units(
    model_names: Sequence[str], n_points: int, radii: Sequence[float], batch_size: int
) -> list[WorkUnit]:
    """All work units of a sweep in their canonical order (models × radii × point blocks).

    Args:
        model_names: distinct model names.
        n_points: the number of points.
        radii: the radii.
        batch_size: points per unit (the last block of a model and radius may be smaller).

    Returns:
        The units.
    """
    check_positive_int("n_points", n_points)
    check_positive_int("batch_size", batch_size)
    if len(set(model_names)) != len(model_names):
        raise ValueError(f"model names must be unique, got {list(model_names)}")
    return [
        WorkUnit(name, float(r), start, min(batch_size, n_points - start))
        for name in model_names
        for r in radii
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


def _radii(name: str, values: Sequence[float]) -> list[float]:
    return [float(r) for r in as_radii(name, values).tolist()]


@dataclass
class SweepSpec:
    """What to compute besides models and points.

    Attributes:
        radii: the distinct reconstruction radii r.
        attack_eps: budgets of the p̂-vs-attack-norm curves (empty: no curves).
        curve_radii: radii at which the curves are computed (``None``: every radius; each must be in ``radii``).
        num_samples: Monte-Carlo samples per estimate.
        confidence: Clopper–Pearson confidence of the estimates and of the margin search's decisions.
        seed: the base seed every stream is derived from.
        batch_size: points per work unit.
        margin_tol: absolute tolerance of the margin bisection.
        margin_max_radius: bracket limit of the margin search (``None``: the margin module's default).
        margin_kwargs: further keyword arguments of ``numerical_margin``.
        attack_kwargs: keyword arguments of the curves' ``MaxDamageAttack`` (its attack settings are shared with
            the margin search unless ``margin_kwargs`` overrides them).
    """

    radii: list[float]
    attack_eps: list[float] = field(default_factory=list)
    curve_radii: list[float] | None = None
    num_samples: int = 500
    confidence: float = 0.95
    seed: int = 0
    batch_size: int = 16
    margin_tol: float = 0.01
    margin_max_radius: float | None = None
    margin_kwargs: dict[str, Any] = field(default_factory=dict)
    attack_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.radii = _radii("radii", self.radii)
        if len(set(self.radii)) != len(self.radii):
            raise ValueError(f"radii must be distinct, got {self.radii}")
        self.attack_eps = _radii("attack_eps", self.attack_eps) if self.attack_eps else []
        if self.curve_radii is not None:
            self.curve_radii = _radii("curve_radii", self.curve_radii)
            unknown = set(self.curve_radii) - set(self.radii)
            if unknown:
                raise ValueError(f"curve_radii must be among radii, got {sorted(unknown)}")
        check_positive_int("num_samples", self.num_samples)
        check_probability("confidence", self.confidence)
        check_seed("seed", self.seed)
        check_positive_int("batch_size", self.batch_size)
        check_positive_float("margin_tol", self.margin_tol)
        if self.margin_max_radius is not None:
            check_positive_float("margin_max_radius", self.margin_max_radius)
        self.margin_kwargs = dict(self.margin_kwargs)
        self.attack_kwargs = dict(self.attack_kwargs)

    def curves_at(self, r: float) -> bool:
        """Whether the curves are computed at radius ``r``.

        Args:
            r: a radius of the sweep.

        Returns:
            True when there are budgets and ``r`` is a curve radius.
        """
        return bool(self.attack_eps) and (self.curve_radii is None or r in self.curve_radii)

    def to_json(self) -> str:
        """The specification as JSON.

        Returns:
            Every field, keys sorted (stored in ``meta`` and part of the fingerprint).
        """
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)


_MARGIN_ATTACK_KEYS = ("restarts", "steps", "num_noise_samples", "mode", "optimizer", "box")


def margin_settings(spec: SweepSpec) -> dict[str, Any]:
    """Keyword arguments of :func:`vaefast.margin.numerical_margin` for a sweep.

    Args:
        spec: the sweep specification.

    Returns:
        Bisection at ``margin_tol`` with the sweep's sample count and confidence, the curves' attack settings
        (restarts, steps, noise samples, mode, optimizer, box) and ``margin_kwargs`` on top; ``max_radius`` from
        ``margin_max_radius`` unless ``margin_kwargs`` sets it.
    """
    shared = {k: v for k, v in spec.attack_kwargs.items() if k in _MARGIN_ATTACK_KEYS}
    kwargs = {
        "method": "bisection",
        "tol": spec.margin_tol,
        "num_samples": spec.num_samples,
        "confidence": spec.confidence,
        **shared,
        **spec.margin_kwargs,
    }
    if spec.margin_max_radius is not None:
        kwargs.setdefault("max_radius", spec.margin_max_radius)
    return kwargs


def margin_box(spec: SweepSpec) -> tuple[float, float] | None:
    """The data box of the sweep's margin search (and of its evidence): ``attack_kwargs``/``margin_kwargs``
    ``box``, default ``DEFAULT_BOX``.

    Args:
        spec: the sweep specification.

    Returns:
        ``(low, high)``, or ``None`` for no box.
    """
    return margin_settings(spec).get("box", DEFAULT_BOX)


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
