"""Rows of one work unit: the ``units``, ``results`` and ``curves`` rows assembled from the stages' results.

The keys of every row are the columns of :mod:`vaefast.schema` (the store refuses any other key); the
evidence columns of a point without evidence (margin 0 or unbracketed) are NULL. The stages run where the model
is (CPU or a GPU); their results come to the CPU once, in :func:`compute_unit`, before the rows are read out of them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from vaefast import schema, store
from vaefast.sweep.spec import SweepSpec, WorkUnit, curve_item_id, item_id
from vaefast.sweep.stages import CurvePoint, UnitOutcome, run_stages

Row = dict[str, Any]

_BOUNDS = (
    "bound", "certified_bound", "spectral_bound", "whitened_bound", "latent_margin", "sigma_min", "jac_frobenius",
    "jac_spectral", "jac_whitened_spectral", "jac_frobenius_upper",
)  # fmt: skip


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor in it moved to the CPU (dataclasses, lists and tuples are walked).

    Args:
        value: a stage result (a dataclass of tensors), a container of them, or anything else.

    Returns:
        A copy whose tensors are detached CPU tensors; other values are returned as they are.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: to_cpu(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **fields)
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    if isinstance(value, tuple):
        items = [to_cpu(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)  # a namedtuple or a tuple
    return value


def _num(value: float) -> float | None:
    """A float for a REAL column (NaN becomes NULL)."""
    return None if math.isnan(value) else value


def _clean_columns(out: UnitOutcome, b: int, k: int) -> Row:
    """Item ``(b, k)``'s clean estimate, bound, certificate and margin columns."""
    est, mb, nm, ev, cert = out.estimate, out.bounds[k], out.margin, out.evidence, out.certificates
    return {
        "seed": out.seed,
        "p_hat": float(est.p_hat[b, k]),
        "ci_low": float(est.ci_low[b, k]),
        "ci_high": float(est.ci_high[b, k]),
        "p_low": float(mb.p_low[b]),
        "hits": int(est.hits[b, k]),
        "num_samples": int(est.num_samples),
        "robust": int(bool(est.robust[b, k])),
        "clean_decision": int(est.decision[b, k]),
        "certified": int(bool(mb.certified[b])),
        "r_star": float(est.r_star[b]),
        **{name: float(getattr(mb, name)[b]) for name in _BOUNDS},
        "jac_method": mb.jac_method,
        "jac_confidence": float(mb.jac_confidence),
        "cert_global": None if cert.global_ is None else float(cert.global_[b, k]),
        "cert_local": None if cert.local is None else float(cert.local[b, k]),
        "cert_reason": cert.reason,
        "max_radius": None if ev.max_radius is None else float(ev.max_radius[b]),
        "margin": _num(float(nm.margin[b, k])),
        "margin_lower": float(nm.lower[b, k]),
        "margin_upper": _num(float(nm.upper[b, k])),
        "bracketed": int(bool(nm.bracketed[b, k])),
        "margin_evals": int(nm.rows[b]),
    }


def _evidence_columns(out: UnitOutcome, b: int, k: int, j: int) -> Row:
    """The evidence columns of item ``(b, k)``, the ``j``-th item with evidence."""
    nm, deg = out.margin, out.evidence.degradation
    delta = nm.delta[b, k]
    return {
        "adv_norm": float(delta.flatten().double().norm()),
        "p_hat_adv": float(nm.p_hat_delta[b, k]),
        "ci_low_adv": float(nm.ci_low_delta[b, k]),
        "ci_high_adv": float(nm.ci_high_delta[b, k]),
        "hits_adv": int(nm.hits_delta[b, k]),
        "num_samples_adv": int(nm.samples_delta[b, k]),
        "ll_clean": float(deg.log_lik_clean[j]),
        "ll_adv": float(deg.log_lik_adv[j]),
        "ll_drop": float(deg.drop[j]),
        "rel_ll_degradation": float(deg.relative[j]),
        "delta": store.to_blob(delta),
    }


def result_rows(out: UnitOutcome) -> list[Row]:
    """The ``results`` rows of a unit, one per (point, radius): points outer.

    Args:
        out: the stages' results.

    Returns:
        The rows.
    """
    unit = out.unit
    position = {item: j for j, item in enumerate(out.evidence.index)}
    rows = []
    for b, pos in enumerate(unit.positions):
        for k, r in enumerate(out.radii):
            row = {"item_id": item_id(unit.model, r, pos), "unit_id": unit.unit_id, "model": unit.model, "pos": pos}
            row.update(r=r, **_clean_columns(out, b, k))
            if (b, k) in position:
                row.update(_evidence_columns(out, b, k, position[b, k]))
            else:
                row.update(dict.fromkeys(schema.RESULTS.group(schema.EVIDENCE)))
            rows.append(row)
    return rows


def _curve_point_rows(unit: WorkUnit, cp: CurvePoint) -> list[Row]:
    norms = cp.delta.flatten(1).norm(dim=1)
    est, deg = cp.estimate, cp.degradation
    return [
        {
            "item_id": curve_item_id(unit.model, r, cp.eps, pos),
            "unit_id": unit.unit_id,
            "model": unit.model,
            "pos": pos,
            "r": r,
            "eps": cp.eps,
            "p_hat": float(est.p_hat[b, k]),
            "ci_low": float(est.ci_low[b, k]),
            "ci_high": float(est.ci_high[b, k]),
            "adv_norm": float(norms[b]),
            "ll_drop": float(deg.drop[b]),
            "rel_ll_degradation": float(deg.relative[b]),
        }
        for k, r in enumerate(est.radii.tolist())
        for b, pos in enumerate(unit.positions)
    ]


def curve_rows(out: UnitOutcome) -> list[Row]:
    """The ``curves`` rows of a unit, one per (budget, radius, point).

    Args:
        out: the stages' results.

    Returns:
        The rows (empty without curves).
    """
    return [row for cp in out.curves for row in _curve_point_rows(out.unit, cp)]


def unit_row(out: UnitOutcome) -> Row:
    """The unit's identity and stage timings (the runner adds ``rank`` and ``world_size``, the store ``finished_at``).

    Args:
        out: the stages' results.

    Returns:
        The partial ``units`` row.
    """
    u = out.unit
    return {"unit_id": u.unit_id, "model": u.model, "first_pos": u.first_pos, "n_points": u.n_points, **out.seconds}


def compute_unit(
    model: nn.Module, x: torch.Tensor, unit: WorkUnit, spec: SweepSpec
) -> tuple[Row, list[Row], list[Row]]:
    """Compute one work unit: estimate → bound → margin → evidence → certify → curves, as database rows.

    Args:
        model: a protocol model (eval mode is applied for the whole unit).
        x: the unit's points ``[n_points, *input_shape]`` on the model's device (CPU or GPU).
        unit: the work unit (model name, first point position, number of points).
        spec: the sweep specification.

    Returns:
        ``(units row, results rows, curves rows)`` keyed by the schema's column names.
    """
    out = to_cpu(run_stages(model, x, unit, spec))  # one transfer per tensor, not one per value read
    return unit_row(out), result_rows(out), curve_rows(out)
