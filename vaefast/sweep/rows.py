"""Rows of one work unit: the ``units``, ``results`` and ``curves`` rows assembled from the stages' results.

The keys of every row are the columns of :mod:`vaefast.sweep.schema` (the store refuses any other key); the
evidence columns of a point without evidence (margin 0 or unbracketed) are NULL. The stages run where the model
is (CPU or a GPU); their results come to the CPU once, in :func:`compute_unit`, before the rows are read out of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from vaefast import store
from vaefast.sweep import schema
from vaefast.sweep.spec import SweepSpec, WorkUnit, curve_item_id, item_id
from vaefast.sweep.stages import CurvePoint, Evidence, UnitOutcome, run_stages

Row = dict[str, Any]

_BOUNDS = ("bound", "certified_bound", "spectral_bound", "whitened_bound", "latent_margin", "sigma_min")


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


def _f(t: torch.Tensor, i: int) -> float:
    return float(t.reshape(-1)[i])


def _clean_columns(out: UnitOutcome, b: int) -> Row:
    """Point ``b``'s clean estimate, bound and margin-search columns."""
    est, mb, nm, ev = out.estimate, out.bound, out.margin, out.evidence
    return {
        "seed": out.seed,
        "p_hat": _f(est.p_hat, b),
        "ci_low": _f(est.ci_low, b),
        "ci_high": _f(est.ci_high, b),
        "hits": int(est.hits.reshape(-1)[b]),
        "num_samples": int(est.num_samples),
        "robust": int(bool(est.robust.reshape(-1)[b])),
        "r_star": _f(est.r_star, b),
        "certified": int(bool(mb.certified.reshape(-1)[b])),
        **{name: _f(getattr(mb, name), b) for name in _BOUNDS},
        "jac_frobenius": _f(mb.jac_frobenius, b),
        "jac_spectral": _f(mb.jac_spectral, b),
        "cert_global": _radius(out.certificates.global_, b),
        "cert_local": _radius(out.certificates.local, b),
        "max_radius": None if ev.max_radius is None else float(ev.max_radius[b]),
        "margin": _f(nm.margin, b),
        "margin_lower": _f(nm.lower, b),
        "bracketed": int(bool(nm.bracketed[b])),
        "margin_evals": len(nm.evaluations[b]),
    }


def _radius(cert: Any, b: int) -> float | None:
    """Point ``b``'s certified radius, or None where the certificate's method was unsupported."""
    return None if cert is None else _f(cert.radius, b)


def _evidence_columns(out: UnitOutcome, ev: Evidence, b: int, j: int) -> Row:
    """The evidence columns of point ``b``, the ``j``-th point with evidence."""
    nm, deg = out.margin, ev.degradation
    return {
        "adv_norm": float(ev.delta[j].flatten().double().norm()),
        "p_hat_adv": _f(nm.p_hat_delta, b),
        "ci_low_adv": _f(nm.ci_low_delta, b),
        "ci_high_adv": _f(nm.ci_high_delta, b),
        "hits_adv": int(nm.hits_delta[b]),
        "num_samples_adv": int(nm.samples_delta[b]),
        "ll_clean": _f(deg.log_lik_clean, j),
        "ll_adv": _f(deg.log_lik_adv, j),
        "ll_drop": _f(deg.drop, j),
        "rel_ll_degradation": _f(deg.relative, j),
        "delta": store.to_blob(ev.delta[j]),
    }


def result_rows(out: UnitOutcome) -> list[Row]:
    """The ``results`` rows of a unit, one per point.

    Args:
        out: the stages' results.

    Returns:
        The rows.
    """
    unit, ev = out.unit, out.evidence
    position = {b: j for j, b in enumerate(ev.index)}
    rows = []
    for b, pos in enumerate(unit.positions):
        row = {"item_id": item_id(unit.model, unit.r, pos), "unit_id": unit.unit_id, "model": unit.model, "pos": pos}
        row.update(r=unit.r, **_clean_columns(out, b))
        if b in position:
            row.update(_evidence_columns(out, ev, b, position[b]))
        else:
            row.update(dict.fromkeys(schema.RESULTS.group(schema.EVIDENCE)))
        rows.append(row)
    return rows


def _curve_point_rows(unit: WorkUnit, cp: CurvePoint) -> list[Row]:
    norms = cp.delta.flatten(1).norm(dim=1)
    est, deg = cp.estimate, cp.degradation
    return [
        {
            "item_id": curve_item_id(unit.model, unit.r, cp.eps, pos),
            "unit_id": unit.unit_id,
            "model": unit.model,
            "pos": pos,
            "r": unit.r,
            "eps": cp.eps,
            "p_hat": _f(est.p_hat, b),
            "ci_low": _f(est.ci_low, b),
            "ci_high": _f(est.ci_high, b),
            "adv_norm": _f(norms, b),
            "ll_drop": _f(deg.drop, b),
            "rel_ll_degradation": _f(deg.relative, b),
        }
        for b, pos in enumerate(unit.positions)
    ]


def curve_rows(out: UnitOutcome) -> list[Row]:
    """The ``curves`` rows of a unit, one per (budget, point) in budget order.

    Args:
        out: the stages' results.

    Returns:
        The rows (empty without curves at the unit's radius).
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
    return {"unit_id": u.unit_id, "model": u.model, "r": u.r, "first_pos": u.first_pos, "n_points": u.n_points,
            **out.seconds}  # fmt: skip


def compute_unit(
    model: nn.Module, x: torch.Tensor, unit: WorkUnit, spec: SweepSpec
) -> tuple[Row, list[Row], list[Row]]:
    """Compute one work unit: estimate → bound → margin → evidence → curves, as database rows.

    Args:
        model: a protocol model (eval mode is applied for the whole unit).
        x: the unit's points ``[n_points, *input_shape]`` on the model's device (CPU or GPU).
        unit: the work unit (model name, r, first point position).
        spec: the sweep specification.

    Returns:
        ``(units row, results rows, curves rows)`` keyed by the schema's column names.
    """
    out = to_cpu(run_stages(model, x, unit, spec))  # one transfer per tensor, not one per value read
    return unit_row(out), result_rows(out), curve_rows(out)
