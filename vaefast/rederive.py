"""Re-deriving every deterministic column of a results database (the exact half of ``vaefast verify``).

A sweep stores many numbers that follow from other stored numbers, from the sweep's specification or from the model.
:func:`stored_discrepancies` and :func:`model_discrepancies` compute each of them again and compare; every
disagreement is a :class:`Discrepancy` naming its row and what differs, so a tampered or damaged column is caught
even where the statistical replay (:mod:`vaefast.verify`) could not tell.

From the stored columns alone (every row):

- identity: the fingerprint from the stored spec, points and model weights; the points' digest; every row's id,
  unit, model, position and radius; its ``seed`` (the model's Monte-Carlo stream) and ``num_samples`` (the spec's);
- completeness: every unit the spec implies is committed, with exactly its rows (every point × radius) and its
  curve rows, and there is nothing else;
- counts: ``0 <= hits <= num_samples``, ``p_hat = hits / num_samples``, the two-sided Clopper–Pearson interval and
  the one-sided lower limit ``p_low`` at the spec's confidence, ``robust = (p_hat > 1/2)``, the three-way
  ``clean_decision`` (:func:`vaefast.core.decide.clean_decision`) and ``certified = (clean_decision = 1)``;
- bounds: every bound from its stored components (:func:`vaefast.robustness.bounds_from_counts`);
- margin: NULL where the clean point is undecided, 0 (bracketed, no evidence) where it is not robust;
  ``margin_lower <= margin <= margin_upper <= max_radius`` where it is robust; evidence exactly where it is robust
  and bracketed;
- evidence: ``adv_norm = ||delta|| = margin_upper``, ``x + delta`` in the box, ``p_hat_adv = hits_adv /
  num_samples_adv`` with its Clopper–Pearson interval, ``num_samples_adv`` a round of the sequential test and
  ``hits_adv`` a count the test can decide broken, ``ll_drop = ll_clean - ll_adv`` and ``rel_ll_degradation``;
- ``max_radius``: the distance from the point to the box's farthest corner.

From the model (the rows checked):

- the encoder's geometry (``sigma_min`` and the three Jacobian norms) at the stored point;
- the clean estimate again, on the sweep's own random numbers (the counter-based generator keyed by seed, point and
  sample): the stored ``hits`` must lie between the counts at ``r (1 - BAND)`` and ``r (1 + BAND)`` (rounding on
  another device or batch size can only move a sample within that band of r), and ``r_star`` must agree;
- the evidence counts again: ``hits_adv`` from the stored δ on the sweep's stream (same band), so a δ replaced by
  another one that also breaks r-robustness is caught;
- ``ll_clean`` and ``ll_adv`` at the stored point and δ;
- the sound certificates ``cert_global`` and ``cert_local`` from the stored counts (NULL, with a stored reason,
  exactly where the model's encoder is refused).

Floating-point comparisons: values recomputed from stored float64 numbers by the same formula must agree to
``EXACT`` (relative); values recomputed from the model to ``MODEL`` (relative): geometry and likelihoods move by
float rounding with the device and the batch size (README, "Determinism"), far less than that.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vaefast import schema, store
from vaefast.core.decide import BROKEN, ROBUST, UNDECIDED, Rule
from vaefast.stats import clopper_pearson, sequential_schedule
from vaefast.sweep.inputs import on_model
from vaefast.sweep.spec import SweepSpec, curve_item_id, enumerate_units, fingerprint, item_id

__all__ = [
    "BAND", "EXACT", "MODEL", "Discrepancy", "StoredSweep", "model_discrepancies", "search_discrepancies",
    "stored_discrepancies",
]  # fmt: skip

EXACT = 1e-9  # relative: the same formula on the same stored float64 numbers
MODEL = 1e-4  # relative: recomputed from the model (rounding moves with device and batch size)
BAND = 1e-4  # relative half-width in r of the band a recomputed count may move within
NORM = 1e-5  # relative: ||delta|| (float32 entries) against the radius it was projected on
FLOAT32 = 1e-6  # relative: a difference the model computed in float32
SEARCH = 1e-6  # relative: a margin of the search run again (bit-identical on the machine that swept)
SEARCH_DELTA = 1e-3  # relative to max |delta|: the evidence of the search run again

_BOUND_COLUMNS = ("bound", "certified_bound", "spectral_bound", "whitened_bound", "latent_margin")
GEOMETRY = ("sigma_min", "jac_frobenius", "jac_frobenius_upper", "jac_spectral", "jac_whitened_spectral")


@dataclass(frozen=True)
class Discrepancy:
    """A stored value that its re-derivation contradicts.

    Attributes:
        item_id: the results row (``model|r=R|pos=P``), the unit (``model|pos=A:B``) or ``meta``.
        check: what was re-derived: ``identity``, ``complete``, ``counts``, ``bounds``, ``margin``, ``evidence``,
            ``model``.
        reason: what differs, with the stored and the re-derived values.
    """

    item_id: str
    check: str
    reason: str


@dataclass
class StoredSweep:
    """The tables of a results database that :func:`stored_discrepancies` reads.

    Attributes:
        meta: the ``meta`` table.
        spec: the sweep's specification (from ``meta``).
        models: ``(name, weights_sha256)`` in the sweep's order (the ``models`` table by insertion).
        points: ``pos -> points row`` (with its blob).
        units: the ``units`` rows.
        results: the ``results`` rows (with their blobs).
        curves: the ``curves`` rows.
        input_shape: ``model -> input shape``.
    """

    meta: dict[str, str]
    spec: SweepSpec
    models: list[tuple[str, str]]
    points: dict[int, dict[str, Any]]
    units: list[dict[str, Any]]
    results: list[dict[str, Any]]
    curves: list[dict[str, Any]]
    input_shape: dict[str, tuple[int, ...]]

    def point(self, pos: int, name: str) -> torch.Tensor:
        """The stored point at ``pos`` as a float32 tensor of model ``name``'s input shape."""
        return torch.from_numpy(store.from_blob(self.points[pos]["x"], self.input_shape[name]).copy())


def _close(a: float | None, b: float, rel: float, abs_tol: float = 1e-12) -> bool:
    return a is not None and math.isclose(float(a), float(b), rel_tol=rel, abs_tol=abs_tol)


# --- identity and completeness -----------------------------------------------------------------------------------
def _identity(sweep: StoredSweep) -> list[Discrepancy]:
    """The fingerprint and the points' digest from the stored spec, points and weights."""
    out = []
    ordered = [sweep.points[p] for p in sorted(sweep.points)]
    digest = hashlib.sha256(b"".join(p["x"] for p in ordered)).hexdigest()
    try:
        described = json.loads(sweep.meta.get("points", "{}"))
    except json.JSONDecodeError:
        described = {}
    if described.get("x_sha256") != digest or described.get("indices") != [p["idx"] for p in ordered]:
        out.append(Discrepancy("meta", "identity", "the points table differs from the points the sweep recorded"))
    elif fingerprint(sweep.spec, described, sweep.models) != sweep.meta.get("fingerprint"):
        out.append(Discrepancy("meta", "identity", "the fingerprint differs from the stored spec, points and weights"))
    return out


def _complete(sweep: StoredSweep) -> list[Discrepancy]:
    """Every unit the spec implies committed, each with exactly its rows and curve rows; nothing else."""
    spec, out = sweep.spec, []
    units = enumerate_units([m for m, _ in sweep.models], len(sweep.points), spec.batch_size)
    committed = {u["unit_id"]: u for u in sweep.units}
    expected, expected_curves = {}, set()
    for unit in units:
        ids = [item_id(unit.model, r, p) for p in unit.positions for r in spec.radii]
        if unit.unit_id not in committed:
            out.append(Discrepancy(unit.unit_id, "complete", f"unit not committed: its {len(ids)} rows are missing "
                                   "(an unfinished sweep: resume it)"))  # fmt: skip
            continue
        row = committed[unit.unit_id]
        if (row["model"], row["first_pos"], row["n_points"]) != (unit.model, unit.first_pos, unit.n_points):
            out.append(
                Discrepancy(unit.unit_id, "complete", "the units row's model or point range differs from its id")
            )
        expected.update(dict.fromkeys(ids, unit.unit_id))
        expected_curves.update(
            curve_item_id(unit.model, r, e, p) for p in unit.positions for r in spec.curve_r for e in spec.attack_eps
        )
    stored = {r["item_id"]: r for r in sweep.results}
    out += [Discrepancy(i, "complete", f"row missing (its unit {u} is committed)") for i, u in expected.items()
            if i not in stored]  # fmt: skip
    out += [Discrepancy(i, "complete", "row not implied by the spec or in no committed unit") for i in stored
            if i not in expected]  # fmt: skip
    implied = {unit.unit_id for unit in units}
    out += [Discrepancy(u, "complete", "unit not implied by the spec") for u in committed if u not in implied]
    curves = {c["item_id"] for c in sweep.curves}
    out += [Discrepancy(c, "complete", "curve row missing") for c in sorted(expected_curves - curves)]
    out += [Discrepancy(c, "complete", "curve row not implied by the spec") for c in sorted(curves - expected_curves)]
    return out


# --- one row ---------------------------------------------------------------------------------------------------------
def _row_identity(row: Mapping[str, Any], sweep: StoredSweep) -> list[str]:
    from vaefast.sweep.stages import mc_seed

    spec, problems = sweep.spec, []
    if row["item_id"] != item_id(row["model"], row["r"], row["pos"]):
        problems.append(f"item_id differs from model {row['model']!r}, r {row['r']} and pos {row['pos']}")
    first = row["pos"] // spec.batch_size * spec.batch_size
    n = min(spec.batch_size, len(sweep.points) - first)
    if row["unit_id"] != f"{row['model']}|pos={first}:{first + n}":
        problems.append(f"unit_id {row['unit_id']} is not the unit of pos {row['pos']}")
    if row["model"] in dict(sweep.models) and row["seed"] != mc_seed(spec, row["model"]):
        problems.append(f"seed {row['seed']} is not the model's Monte-Carlo stream {mc_seed(spec, row['model'])}")
    if row["num_samples"] != spec.num_samples:
        problems.append(f"num_samples {row['num_samples']} differs from the spec's {spec.num_samples}")
    return problems


def _is_count(hits: object, n: object) -> bool:
    return isinstance(hits, int) and isinstance(n, int) and n >= 1 and 0 <= hits <= n


def _derived(rows: Sequence[Mapping[str, Any]], spec: SweepSpec) -> dict[str, dict[str, float]]:
    """Per row (by ``item_id``) what follows from its stored counts and components: the clean estimate's columns,
    its decision and bounds, and the evidence's interval (one batched computation per sample count)."""
    from vaefast.robustness import bounds_from_counts

    out: dict[str, dict[str, float]] = {r["item_id"]: {} for r in rows}
    clean = [r for r in rows if _is_count(r["hits"], r["num_samples"])]
    for n, exact in sorted({(r["num_samples"], r["jac_method"] != "randomized") for r in clean}):
        group = [r for r in clean if r["num_samples"] == n and (r["jac_method"] != "randomized") == exact]
        hits = torch.tensor([r["hits"] for r in group], dtype=torch.int64)
        low, high = clopper_pearson(hits, n, spec.confidence)
        geometry = {c: torch.tensor([math.nan if r[c] is None else float(r[c]) for r in group], dtype=torch.float64)
                    for c in GEOMETRY}  # fmt: skip
        derived = bounds_from_counts(hits, n, spec.confidence, geometry, exact)
        for i, row in enumerate(group):
            values = {c: float(derived[c][i]) for c in (*_BOUND_COLUMNS, "p_hat", "p_low")}
            values.update(ci_low=float(low[i]), ci_high=float(high[i]), robust=int(2 * hits[i] > n))
            values.update(clean_decision=int(derived["decision"][i]), certified=int(derived["certified"][i]))
            out[row["item_id"]].update(values)
    evidence = [r for r in rows if _is_count(r["hits_adv"], r["num_samples_adv"])]
    for n in sorted({r["num_samples_adv"] for r in evidence}):
        group = [r for r in evidence if r["num_samples_adv"] == n]
        hits = torch.tensor([r["hits_adv"] for r in group], dtype=torch.int64)
        low, high = clopper_pearson(hits, n, spec.confidence)
        for i, row in enumerate(group):
            out[row["item_id"]].update(p_hat_adv=int(hits[i]) / n, ci_low_adv=float(low[i]), ci_high_adv=float(high[i]))
    return out


def _counts(row: Mapping[str, Any], derived: Mapping[str, float]) -> list[str]:
    """The clean estimate's columns against those derived from ``hits`` and ``num_samples``."""
    hits, n = row["hits"], row["num_samples"]
    if not _is_count(hits, n):
        return [f"hits {hits} of num_samples {n} is not a count"]
    problems = [
        f"{c} {row[c]} != {derived[c]:.12g} from hits {hits} of {n}"
        for c in ("p_hat", "ci_low", "ci_high", "p_low")
        if not _close(row[c], derived[c], EXACT)
    ]
    problems += [
        f"{c} {row[c]} != {derived[c]} from hits {hits} of {n}"
        for c in ("robust", "clean_decision", "certified")
        if row[c] != derived[c]
    ]
    return problems


def _bounds(row: Mapping[str, Any], derived: Mapping[str, float]) -> list[str]:
    """Every bound against the one derived from its stored components (``hits``, ``sigma_min``, the norms)."""
    if any(row[c] is None for c in GEOMETRY):
        return ["a bound component is missing"]
    return [
        f"{c} {row[c]} != {derived[c]:.12g} from its components"
        for c in _BOUND_COLUMNS
        if not (_close(row[c], derived[c], EXACT) or row[c] == math.inf == derived[c])
    ]


def _margin(row: Mapping[str, Any]) -> list[str]:
    """The three margin numbers and the evidence's presence against the clean decision."""
    decision, has_evidence = row["clean_decision"], row["delta"] is not None
    lower, margin, upper, bracketed = row["margin_lower"], row["margin"], row["margin_upper"], row["bracketed"]
    if decision == UNDECIDED:
        ok = margin is None and upper is None and lower == 0 and bracketed == 0 and not has_evidence
        return (
            [] if ok else ["an undecided clean point has margin NULL, margin_upper NULL, margin_lower 0, no evidence"]
        )
    if decision == BROKEN:
        ok = margin == 0 and upper == 0 and lower == 0 and bracketed == 1 and not has_evidence
        return [] if ok else ["a clean point decided not robust has margin 0, margin_upper 0, bracketed, no evidence"]
    problems = []
    if margin is None or lower is None or not 0 <= lower <= margin * (1 + EXACT):
        problems.append(f"margin_lower {lower} <= margin {margin} does not hold")
    if bool(bracketed) != (upper is not None) or bool(bracketed) != has_evidence:
        problems.append("bracketed, margin_upper and the evidence must be present together")
    elif upper is not None and margin is not None and not margin <= upper * (1 + EXACT):
        problems.append(f"margin {margin} <= margin_upper {upper} does not hold")
    cap = row["max_radius"]
    if cap is not None and upper is not None and upper > cap * (1 + NORM):
        problems.append(f"margin_upper {upper} exceeds the box's largest perturbation {cap}")
    return problems


def _evidence(row: Mapping[str, Any], x: torch.Tensor, spec: SweepSpec, derived: Mapping[str, float]) -> list[str]:
    """The evidence group: its norm, the box, its counts and interval, its likelihoods."""
    group = schema.RESULTS.group(schema.EVIDENCE)
    present = [row[c] is not None for c in group]
    if not any(present):
        return []
    if not all(present):
        return ["the evidence columns are partly NULL"]
    problems = []
    delta = torch.from_numpy(store.from_blob(row["delta"]).astype("float64"))
    if delta.numel() != x.numel():
        return [f"delta has {delta.numel()} entries, the point {x.numel()}"]
    norm = float(delta.norm())
    for column in ("margin_upper", "adv_norm"):
        if not _close(row[column], norm, NORM):
            problems.append(f"||delta|| = {norm:.8g} != {column} {row[column]}")
    if spec.box is not None and not bool(spec.box.contains((x.double().flatten() + delta)[None])[0]):
        problems.append(f"x + delta leaves the box {tuple(spec.box)}")
    problems += _evidence_counts(row, spec, derived)
    clean, adv = row["ll_clean"], row["ll_adv"]
    drop = clean - adv
    rel = abs(drop) / abs(clean) if clean != 0 else 0.0
    scale = FLOAT32 * (abs(clean) + abs(adv))  # the model computes the drop in its own precision
    if not _close(row["ll_drop"], drop, 0.0, scale + 1e-12):
        problems.append(f"ll_drop {row['ll_drop']} != ll_clean - ll_adv = {drop:.8g}")
    if not _close(row["rel_ll_degradation"], rel, 0.0, scale / max(abs(clean), 1e-30) + 1e-12):
        problems.append(f"rel_ll_degradation {row['rel_ll_degradation']} != |ll_drop| / |ll_clean| = {rel:.8g}")
    return problems


def _evidence_counts(row: Mapping[str, Any], spec: SweepSpec, derived: Mapping[str, float]) -> list[str]:
    """``p_hat_adv`` and its interval against its counts, and a break the search's test can decide."""
    hits, n = row["hits_adv"], row["num_samples_adv"]
    if not _is_count(hits, n):
        return [f"hits_adv {hits} of num_samples_adv {n} is not a count"]
    problems = [
        f"{c} {row[c]} != {derived[c]:.12g} from hits_adv {hits} of {n}"
        for c in ("p_hat_adv", "ci_low_adv", "ci_high_adv")
        if not _close(row[c], derived[c], EXACT)
    ]
    if n not in _rounds(spec) or hits > _k_broken(n, spec):
        problems.append(f"hits_adv {hits} of {n} is not a break the search's test decides")
    return problems


def _rounds(spec: SweepSpec) -> list[int]:
    """The sample counts at which the search decides."""
    return [spec.num_samples] if spec.margin.decision == "fixed" else sequential_schedule(spec.num_samples)


@functools.cache
def _k_broken_at(n: int, level: float | None) -> int:
    return n // 2 if level is None else Rule((n,), level).critical(n)[1]


def _k_broken(n: int, spec: SweepSpec) -> int:
    """The largest count the search can decide broken after ``n`` samples: the fixed rule's ``n // 2``, or the
    sequential rule's at the most lenient level a decision of the search has (before its Bonferroni split)."""
    return _k_broken_at(n, None if spec.margin.decision == "fixed" else 1.0 - spec.confidence)


def _row(row: Mapping[str, Any], sweep: StoredSweep, derived: Mapping[str, float]) -> list[Discrepancy]:
    """Every check of one results row that needs no model."""
    problems = [("identity", p) for p in _row_identity(row, sweep)]
    problems += [("counts", p) for p in _counts(row, derived)]
    if not problems:
        problems += [("bounds", p) for p in _bounds(row, derived)]
        problems += [("margin", p) for p in _margin(row)]
        if row["pos"] in sweep.points and row["model"] in sweep.input_shape:
            x = sweep.point(row["pos"], row["model"])
            problems += [("evidence", p) for p in _evidence(row, x, sweep.spec, derived)]
            problems += [("margin", p) for p in _max_radius(row, x, sweep.spec)]
    return [Discrepancy(row["item_id"], check, reason) for check, reason in problems]


def _max_radius(row: Mapping[str, Any], x: torch.Tensor, spec: SweepSpec) -> list[str]:
    if spec.box is None:
        return [] if row["max_radius"] is None else ["max_radius is set although the sweep has no box"]
    if not bool(spec.box.contains(x[None])[0]):
        return [f"the point leaves the box {tuple(spec.box)}"]
    limit = float(spec.box.max_perturbation(x[None].double())[0])
    return [] if _close(row["max_radius"], limit, MODEL) else [f"max_radius {row['max_radius']} != {limit:.8g}"]


def stored_discrepancies(sweep: StoredSweep) -> list[Discrepancy]:
    """Every re-derivation that needs no model (module docstring), over the whole database.

    Args:
        sweep: the database's tables.

    Returns:
        The discrepancies (empty for an untouched, complete sweep).
    """
    out = _identity(sweep) + _complete(sweep)
    derived = _derived(sweep.results, sweep.spec)
    for row in sweep.results:
        out += _row(row, sweep, derived[row["item_id"]])
    for curve in sweep.curves:
        values = (curve["ci_low"], curve["p_hat"], curve["ci_high"])
        if None in values or not 0 <= values[0] <= values[1] <= values[2] <= 1:
            out.append(Discrepancy(curve["item_id"], "counts", "p_hat lies outside its interval [ci_low, ci_high]"))
        elif curve["adv_norm"] is None or curve["adv_norm"] > curve["eps"] * (1 + NORM):
            out.append(Discrepancy(curve["item_id"], "evidence", "adv_norm exceeds the attack budget eps"))
    return out


# --- from the model --------------------------------------------------------------------------------------------------
def _counts_at(model, x, delta, radii, samples, seed, positions) -> tuple[torch.Tensor, torch.Tensor]:
    """Hits ``[N, K]`` at ``radii`` and r* ``[N]`` of ``samples`` draws on stream ``seed``, row i keyed by
    ``positions[i]`` (one call of the internal core: the inputs are the stored, validated points)."""
    from vaefast._checks import eval_mode
    from vaefast.core.sampling import Sampler
    from vaefast.robustness import estimate_validated

    ids = torch.tensor(positions, dtype=torch.int64)
    radii_t = torch.tensor(radii, dtype=torch.float64)
    with eval_mode(model), torch.no_grad():
        est = estimate_validated(model, x, delta, radii_t, ids, samples, seed, 0.5, Sampler(model, x.device))
    return est.hits, est.r_star


def _band(radii: Sequence[float]) -> list[float]:
    return [r * (1 - BAND) for r in radii] + [r * (1 + BAND) for r in radii]


def _geometry(model, x: torch.Tensor, positions: list[int], rows, seed: int, confidence: float) -> dict:
    """The encoder's geometry at the points ``x`` (global positions ``positions``) by the stored rows' Jacobian
    method: exact norms in one batch, randomized ones point by point with the sweep's probes (keyed by the unit's
    Monte-Carlo seed and each point's global id, at the bound stage's confidence ``(1 + confidence) / 2``)."""
    from vaefast._checks import eval_mode
    from vaefast.robustness import encoder_geometry

    method = "randomized" if any(r["jac_method"] == "randomized" for r in rows) else "exact"
    with eval_mode(model):
        if method == "exact":
            return encoder_geometry(model, x)[0]
        parts = [encoder_geometry(model, x[i : i + 1], method, (1 + confidence) / 2, seed, pos)[0]
                 for i, pos in enumerate(positions)]  # fmt: skip
    return {c: torch.cat([p[c] for p in parts]) for c in parts[0]}


def _clean(model, name: str, rows, sweep: StoredSweep, x: torch.Tensor, index: dict[int, int]) -> list[Discrepancy]:
    """Geometry, the clean counts' band and r* at every stored point of ``rows``."""
    from vaefast.sweep.stages import mc_seed

    spec, k = sweep.spec, len(sweep.spec.radii)
    geometry = _geometry(model, x, sorted(index), rows, mc_seed(spec, name), spec.confidence)
    hits, r_star = _counts_at(model, x, None, _band(spec.radii), spec.num_samples, mc_seed(spec, name), sorted(index))
    out = []
    for row in rows:
        i, j = index[row["pos"]], spec.radii.index(row["r"]) if row["r"] in spec.radii else None
        if j is not None and not int(hits[i, j]) <= row["hits"] <= int(hits[i, k + j]):
            out.append(Discrepancy(row["item_id"], "model", f"hits {row['hits']} outside [{int(hits[i, j])}, "
                                   f"{int(hits[i, k + j])}] recounted on the sweep's stream"))  # fmt: skip
        if not _close(row["r_star"], float(r_star[i]), MODEL):
            out.append(Discrepancy(row["item_id"], "model", f"r_star {row['r_star']} != {float(r_star[i]):.8g}"))
        out += [Discrepancy(row["item_id"], "model", f"{c} {row[c]} != {float(geometry[c][i]):.8g} from the model")
                for c in GEOMETRY if not _close(row[c], float(geometry[c][i]), MODEL, 1e-9)]  # fmt: skip
    return out


def _adversarial(model, name: str, rows, sweep: StoredSweep, x: torch.Tensor, index) -> list[Discrepancy]:
    """The evidence counts' band on the sweep's stream and the likelihoods at every stored δ of ``rows``."""
    from vaefast.attacks.metrics import likelihood_degradation
    from vaefast.sweep.stages import mc_seed

    out = []
    rows = sorted((r for r in rows if r["delta"] is not None and isinstance(r["num_samples_adv"], int)),
                  key=lambda r: (r["num_samples_adv"], r["pos"], r["r"]))  # fmt: skip
    for n in sorted({r["num_samples_adv"] for r in rows}):
        group = [r for r in rows if r["num_samples_adv"] == n]
        if not 1 <= n <= sweep.spec.num_samples:
            continue  # not a count of the search (reported by the stored checks)
        xs = x[[index[r["pos"]] for r in group]]
        ds = torch.stack([torch.from_numpy(store.from_blob(r["delta"], xs.shape[1:]).copy()) for r in group])
        radii = sorted({r["r"] for r in group})
        hits, _ = _counts_at(
            model, xs, ds.to(xs), _band(radii), n, mc_seed(sweep.spec, name), [r["pos"] for r in group]
        )
        deg = likelihood_degradation(model, xs, ds.to(xs))
        for i, row in enumerate(group):
            j, k = radii.index(row["r"]), len(radii)
            if not int(hits[i, j]) <= row["hits_adv"] <= int(hits[i, k + j]):
                out.append(Discrepancy(row["item_id"], "model", f"hits_adv {row['hits_adv']} outside "
                           f"[{int(hits[i, j])}, {int(hits[i, k + j])}] recounted at x + delta"))  # fmt: skip
            for column, value in (("ll_clean", deg.log_lik_clean[i]), ("ll_adv", deg.log_lik_adv[i])):
                if not _close(row[column], float(value), MODEL, 1e-4):
                    out.append(Discrepancy(row["item_id"], "model", f"{column} {row[column]} != {float(value):.8g}"))
    return out


def _search_row(row: Mapping[str, Any], nm: Any, b: int, k: int) -> list[str]:
    """The stored margin columns of item ``(b, k)`` against the recomputed search ``nm``."""
    problems = []
    for column, value in (("margin", nm.margin[b, k]), ("margin_lower", nm.lower[b, k]),
                          ("margin_upper", nm.upper[b, k])):  # fmt: skip
        value = float(value)
        stored = row[column]
        same = (stored is None and math.isnan(value)) or (stored is not None and _close(stored, value, SEARCH))
        if not same:
            problems.append(f"{column} {stored} != {value:.10g} from the search run again")
    if row["bracketed"] != int(nm.bracketed[b, k]) or row["margin_evals"] != int(nm.rows[b]):
        problems.append(f"bracketed {row['bracketed']} / margin_evals {row['margin_evals']} != "
                        f"{int(nm.bracketed[b, k])} / {int(nm.rows[b])} from the search run again")  # fmt: skip
    if row["delta"] is not None and row["clean_decision"] == ROBUST and bool(nm.bracketed[b, k]):
        stored = torch.from_numpy(store.from_blob(row["delta"]).astype("float64"))
        fresh = nm.delta[b, k].flatten().double().cpu()
        if stored.shape != fresh.shape or float((stored - fresh).abs().max()) > SEARCH_DELTA * max(
                float(fresh.abs().max()), 1e-12):  # fmt: skip
            problems.append("delta differs from the evidence of the search run again")
        elif (row["hits_adv"], row["num_samples_adv"]) != (int(nm.hits_delta[b, k]), int(nm.samples_delta[b, k])):
            problems.append("hits_adv / num_samples_adv differ from the search run again")
    return problems


def search_discrepancies(
    model: Any, name: str, rows: Sequence[Mapping[str, Any]], sweep: StoredSweep
) -> list[Discrepancy]:
    """The margin search of every unit holding one of ``rows``, run again from the stored clean counts with the
    sweep's settings and random numbers, against the stored ``margin``, ``margin_lower``, ``margin_upper``,
    ``bracketed``, ``margin_evals`` and evidence (δ and its counts).

    The search is deterministic given its inputs: on the machine and thread count that swept, the numbers agree
    bit for bit; elsewhere a decision made at the edge of its threshold can flip on float rounding and move a
    margin (README, "Determinism").

    Args:
        model: the model, loaded and checked against the stored weights.
        name: its name in the sweep.
        rows: its results rows checked.
        sweep: the database's tables.

    Returns:
        The discrepancies (units with a missing or malformed row are left to :func:`stored_discrepancies`).
    """
    from vaefast._checks import eval_mode
    from vaefast.sweep.spec import WorkUnit
    from vaefast.sweep.stages import UnitContext, search_margins

    spec, out = sweep.spec, []
    by_id = {r["item_id"]: r for r in sweep.results}
    for unit_id in sorted({r["unit_id"] for r in rows}):
        unit = next((u for u in enumerate_units([name], len(sweep.points), spec.batch_size) if u.unit_id == unit_id),
                    None)  # fmt: skip
        grid = [[by_id.get(item_id(name, r, p)) for r in spec.radii] for p in unit.positions] if unit else [[None]]
        if any(row is None or not isinstance(row["hits"], int) for line in grid for row in line):
            continue
        x = on_model(model, torch.stack([sweep.point(p, name) for p in unit.positions]))
        hits = torch.tensor([[row["hits"] for row in line] for line in grid], dtype=torch.int64)
        with eval_mode(model):
            nm = search_margins(UnitContext.build(model, x, WorkUnit(name, unit.first_pos, unit.n_points), spec), hits)
        for b, line in enumerate(grid):
            for k, row in enumerate(line):
                out += [Discrepancy(row["item_id"], "search", p) for p in _search_row(row, nm, b, k)]
    return out


def _certificates(model, rows, sweep: StoredSweep, x: torch.Tensor, index: dict[int, int]) -> list[Discrepancy]:
    """``cert_global`` and ``cert_local`` again from the model and the stored counts, by the certify stage's own
    computation (:func:`vaefast.sweep.stages.certify_counts`); a refused method must be NULL with its reason stored."""
    from vaefast.sweep.stages import certify_counts

    spec = sweep.spec
    k = {r: j for j, r in enumerate(spec.radii)}
    hits = torch.zeros(len(index), len(k), dtype=torch.int64)
    for row in rows:
        if row["r"] in k:
            hits[index[row["pos"]], k[row["r"]]] = row["hits"]
    cert = certify_counts(model, x, hits, spec.num_samples, spec.confidence)
    out = []
    for row in (r for r in rows if r["r"] in k):
        for method, found in (("global", cert.global_), ("local", cert.local)):
            stored, column = row[f"cert_{method}"], f"cert_{method}"
            if found is None:
                if stored is not None or not row["cert_reason"]:
                    out.append(Discrepancy(row["item_id"], "model", f"{column} {stored} where the model is refused"))
                continue
            value = float(found[index[row["pos"]], k[row["r"]]])
            if not _close(stored, value, MODEL, 1e-9):
                out.append(Discrepancy(row["item_id"], "model", f"{column} {stored} != {value:.8g} from the model"))
    return out


def model_discrepancies(
    model: Any, name: str, rows: Sequence[Mapping[str, Any]], sweep: StoredSweep
) -> list[Discrepancy]:
    """Every re-derivation from the model (module docstring) for ``rows`` of model ``name``.

    Args:
        model: the model, loaded and checked against the stored weights.
        name: its name in the sweep.
        rows: its results rows to check (with their blobs).
        sweep: the database's tables.

    Returns:
        The discrepancies.
    """
    rows = [r for r in rows if r["pos"] in sweep.points and isinstance(r["hits"], int)]
    if not rows:
        return []
    positions = sorted({r["pos"] for r in rows})
    index = {p: i for i, p in enumerate(positions)}
    x = on_model(model, torch.stack([sweep.point(p, name) for p in positions]))
    return (
        _clean(model, name, rows, sweep, x, index)
        + _adversarial(model, name, rows, sweep, x, index)
        + _certificates(model, rows, sweep, x, index)
    )
