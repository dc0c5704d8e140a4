"""Loading and statistics of a sweep's results database (used by :mod:`vaefast.report` and :mod:`vaefast.plots`).

Every (model, point, r) item falls in exactly one of four groups, and every summary says how many items are in
each instead of folding them into a rate. The clean point is decided once, three-way, at the sweep's confidence
(``clean_decision``), for the bound, the margin search and the certificate alike:

- **not robust**: decided not r-robust at δ = 0 (no bound, margin 0);
- **undecided**: p̂_r(x) too close to 1/2 to decide at the sweep's confidence: never certified, never compared;
- **unbracketed**: decided robust, but the search found no decided break (the margin only exceeds the search limit);
- **comparable**: decided robust (certified) with evidence: bound and numerical margin can be compared.

Each comparable item has three margins: the estimate (``margin``, where p̂ crosses 1/2 along the attack path) and
its bracket ``[margin_lower, margin_upper]`` (radii decided robust and broken at the stated confidence). Validity is
counted twice: against ``margin_upper`` (a bound above it is wrong with confidence) and against ``margin`` (the
paper's comparison); the **validity rates** are taken over comparable items only. Correlations between the bound and
the margin estimate (Pearson r and Spearman ρ, ``scipy.stats``) use the same items. A certified item with margin 0
would mean the clean point was decided twice with different outcomes; the clean point is decided once, so this
**clean-point decision disagreement** count must be 0 (it is counted, not explained away).

**Bound larger than the box.** ``max_radius`` is the largest L2 perturbation the data box allows at a point (the
distance to its farthest box corner). A bound above it claims every perturbation the box allows, so it is the
same claim as ``max_radius``: such bounds are **capped** to ``max_radius`` in every statistic, table and figure
and counted (``bound_exceeds_box``); they are never shown as a bare number larger than the input space.

**Likelihood degradation**: ``|log p(x|z*) − log p(x|z)| / |log p(x|z)|`` (≥ 0) and the drop in nats
``log p(x|z) − log p(x|z*)`` (> 0 = damage), ``z = μ(x)``, ``z* = μ(x + δ)``, δ the perturbation that broke
r-robustness at the margin (the margin search's own evidence).

**Re-verification.** ``vaefast verify`` replays the stored evidence with fresh random numbers into the
``verifications`` table (kind ``delta``: x + δ confirmed not r-robust; kind ``clean``: a certified point confirmed
r-robust at δ = 0). Summaries say how many were confirmed of how many checked, or that nothing was re-verified.

The **β trend** is Spearman's ρ between β and each model's median numerical margin (β-VAEs only), per radius.

**Published correlations.** Camuto et al. (AISTATS 2021) report the Pearson correlation between the bound and the
numerically estimated margin on MNIST, Fashion-MNIST and CIFAR-10 (:data:`PUBLISHED_PEARSON`). When every swept
point comes from one of those datasets (the ``points`` table's ``dataset``), the headline carries the published
value beside the measured pooled Pearson r (over comparable items, as above).
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from vaefast import store

BOUND_COLUMNS = ("bound", "certified_bound", "spectral_bound", "whitened_bound")
VERIFY_KINDS = ("delta", "clean")
PUBLISHED_PEARSON: dict[str, float] = {"mnist": 0.840, "fashion-mnist": 0.831, "cifar10": 0.879}
PUBLISHED_SOURCE = "Camuto et al., AISTATS 2021"
_DATASET_ALIASES = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10"}


@dataclass
class SweepData:
    """The contents of a results database as python rows (blobs kept on ``results`` and ``points``).

    Attributes:
        results, curves, points, units: the rows of those tables.
        models: the ``models`` rows keyed by name (config parsed, ``input_shape`` a tuple).
        meta: the ``meta`` table.
        verifications: the ``verifications`` rows (empty when the evidence was never re-verified).
    """

    results: list[dict[str, Any]]
    curves: list[dict[str, Any]]
    models: dict[str, dict[str, Any]]
    points: list[dict[str, Any]]
    units: list[dict[str, Any]]
    meta: dict[str, str]
    verifications: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model_names(self) -> list[str]:
        """The model names in report order."""
        return list(self.models)

    @property
    def radii(self) -> list[float]:
        """The distinct radii of the results, sorted."""
        return sorted({r["r"] for r in self.results})


def load(db: str | os.PathLike | sqlite3.Connection) -> SweepData:
    """Read a results database.

    Args:
        db: a path to a results database or an open connection to one.

    Returns:
        The database as :class:`SweepData`: every table's rows in primary-key order, models ordered β-VAEs first
        by β, then β-TCVAEs.
    """
    conn = db if isinstance(db, sqlite3.Connection) else store.connect(db, readonly=True)
    try:
        models = store.model_info(conn)
        return SweepData(
            results=store.read_table(conn, "results", blobs=True),
            curves=store.read_table(conn, "curves"),
            models=dict(sorted(models.items(), key=lambda kv: _model_sort_key(kv[1]))),
            points=store.read_table(conn, "points", blobs=True),
            units=store.read_table(conn, "units"),
            meta=store.get_meta(conn),
            verifications=store.read_table(conn, "verifications"),
        )
    finally:
        if not isinstance(db, sqlite3.Connection):
            conn.close()


def _model_sort_key(info: Mapping[str, Any]) -> tuple:
    rank = {"beta-vae": 0, "other": 0, "beta-tcvae": 1, "lipschitz": 2}[model_kind(info)]
    beta = info.get("beta")
    return (rank, beta if beta is not None else math.inf, info["name"])


def model_kind(info: Mapping[str, Any]) -> str:
    """The kind of a model from its stored row.

    Args:
        info: a ``models`` row.

    Returns:
        ``"lipschitz"`` (any network Lipschitz-constrained, ``VAEConfig.lipschitz``: not part of the β trends),
        ``"beta-tcvae"``, ``"beta-vae"`` or ``"other"``.
    """
    config = info.get("config")
    if isinstance(config, Mapping) and config.get("lipschitz"):
        return "lipschitz"
    obj = str(info.get("objective") or "").lower()
    if "tc" in obj:
        return "beta-tcvae"
    if info.get("beta") is not None:
        return "beta-vae"
    return "other"


def is_gaussian(info: Mapping[str, Any]) -> bool:
    """Whether a model's likelihood is Gaussian (log p can be near 0 there: degradation is reported in nats).

    Args:
        info: a ``models`` row.

    Returns:
        True for a Gaussian likelihood.
    """
    return str(info.get("likelihood") or "").lower().startswith("gaussian")


def _corr(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(Pearson r, Spearman ρ), NaN when fewer than 3 points or a constant input."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    return float(stats.pearsonr(x, y)[0]), float(stats.spearmanr(x, y)[0])


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman ρ, NaN (without scipy's warning) when either input is constant or has a NaN."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.isnan(x).any() or np.isnan(y).any() or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y)[0])


def exceeds_box(row: Mapping[str, Any], bound: str = "bound") -> bool:
    """Whether a bound claims more than the data box allows.

    Args:
        row: a results row.
        bound: which bound column (see :data:`BOUND_COLUMNS`).

    Returns:
        True when ``row[bound]`` is larger than ``max_radius`` (never without a box).
    """
    b, box = row.get(bound), row.get("max_radius")
    return b is not None and box is not None and float(b) > float(box)


def capped_bound(row: Mapping[str, Any], bound: str = "bound") -> float | None:
    """The bound as reported: ``min(bound, max_radius)`` (no cap without a box; ``None`` stays ``None``).

    Args:
        row: a results row.
        bound: which bound column (see :data:`BOUND_COLUMNS`).

    Returns:
        The capped value.
    """
    b = row.get(bound)
    if b is None:
        return None
    return float(row["max_radius"]) if exceeds_box(row, bound) else float(b)


def is_comparable(row: Mapping[str, Any]) -> bool:
    """Whether bound and numerical margin of an item can be compared.

    Args:
        row: a results row.

    Returns:
        True when the item is certified (decided robust) and bracketed (a decided break exists), with a margin.
    """
    return bool(row["certified"]) and bool(row["bracketed"]) and row["margin"] is not None


def comparable(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The comparable items (:func:`is_comparable`).

    Args:
        rows: results rows.

    Returns:
        Those that are certified and bracketed.
    """
    return [r for r in rows if is_comparable(r)]


def item_counts(rows: Sequence[Mapping[str, Any]], bound: str = "bound") -> dict[str, int]:
    """How many items are in each group (module docstring), and the two counts that must be read beside them.

    Args:
        rows: results rows.
        bound: the bound column whose ``exceeds box`` count is wanted.

    Returns:
        ``n_items``, ``n_not_robust``, ``n_undecided``, ``n_unbracketed`` and ``n_comparable`` (the four add up to
        ``n_items``), ``n_bound_exceeds_box`` (bound > max_radius, over all items) and ``n_disagreements`` (certified
        but margin == 0: must be 0).
    """
    n_not = sum(1 for r in rows if r["clean_decision"] == -1)
    n_und = sum(1 for r in rows if r["clean_decision"] == 0)
    n_comp = sum(1 for r in rows if is_comparable(r))
    return {
        "n_items": len(rows),
        "n_not_robust": n_not,
        "n_undecided": n_und,
        "n_unbracketed": len(rows) - n_not - n_und - n_comp,
        "n_comparable": n_comp,
        "n_bound_exceeds_box": sum(1 for r in rows if exceeds_box(r, bound)),
        "n_disagreements": sum(1 for r in rows if r["certified"] and r["margin"] is not None and r["margin"] == 0),
    }


def bound_stats(rows: Sequence[Mapping[str, Any]], bound: str = "bound") -> dict[str, float]:
    """Bound against numerical margin over the comparable rows, with the counts of :func:`item_counts`.

    Args:
        rows: results rows (any mix; only comparable ones enter the statistics).
        bound: which bound column; values are capped to ``max_radius`` first (:func:`capped_bound`).

    Returns:
        The counts, ``n`` (= ``n_comparable``), ``validity`` (fraction with capped bound <= the margin estimate),
        ``validity_upper`` (<= margin_upper, the evidence), ``validity_lower`` (<= margin_lower), Pearson/Spearman
        against the estimate, the least-squares fit bound = slope * margin + intercept and the median bound/margin.
    """
    comp = comparable(rows)
    b = np.array([capped_bound(r, bound) for r in comp], float)
    m = np.array([r["margin"] for r in comp], float)
    up = np.array([r["margin_upper"] for r in comp], float)
    lo = np.array([r["margin_lower"] for r in comp], float)
    pearson, spearman = _corr(b, m)
    slope = intercept = math.nan
    if b.size >= 2 and np.ptp(m) > 0:
        slope, intercept = (float(v) for v in np.polyfit(m, b, 1))
    return {
        **item_counts(rows, bound),
        "n": int(b.size),
        "validity": float(np.mean(b <= m)) if b.size else math.nan,
        "validity_upper": float(np.mean(b <= up)) if b.size else math.nan,
        "validity_lower": float(np.mean(b <= lo)) if b.size else math.nan,
        "pearson": pearson,
        "spearman": spearman,
        "slope": slope,
        "intercept": intercept,
        "median_ratio": float(np.median(b / np.maximum(m, 1e-300))) if b.size else math.nan,
    }


def _median(values: Iterable[Any]) -> float:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.median(v)) if v else math.nan


SUMMARY_COLUMNS = (  # the keys of summary_rows, in table order
    "model",
    "beta",
    "r",
    "n_items",
    "n_not_robust",
    "n_undecided",
    "n_unbracketed",
    "n_comparable",
    "p_hat",
    "r_star",
    "bound",
    "bound_exceeds_box",
    "margin",
    "validity",
    "validity_upper",
    "pearson",
    "spearman",
    "rel_ll_deg",
    "ll_drop_nats",
    "sec_per_item",
)
COUNT_KEYS = ("n_items", "n_not_robust", "n_undecided", "n_unbracketed", "n_comparable")


def summary_rows(data: SweepData) -> list[dict[str, Any]]:
    """One row per (model, r): item counts, medians over points, validity over comparable items and ρ.

    Args:
        data: the sweep.

    Returns:
        Rows with the keys of :data:`SUMMARY_COLUMNS` (``bound`` is the median capped bound, ``margin`` the median
        margin estimate over the items decided robust, ``rel_ll_deg``
        the median relative degradation, ``ll_drop_nats`` the median log-likelihood drop in nats, both at the
        evidence δ).
    """
    out = []
    for name in data.model_names:
        for r in data.radii:
            rows = [x for x in data.results if x["model"] == name and x["r"] == r]
            if not rows:
                continue
            st = bound_stats(rows)
            out.append(
                {
                    "model": name,
                    "beta": data.models[name].get("beta"),
                    "r": r,
                    **{k: st[k] for k in COUNT_KEYS},
                    "p_hat": _median(x["p_hat"] for x in rows),
                    "r_star": _median(x["r_star"] for x in rows),
                    "bound": _median(capped_bound(x) for x in rows),
                    "bound_exceeds_box": st["n_bound_exceeds_box"],
                    "margin": _median(x["margin"] for x in rows if x["certified"]),
                    "validity": st["validity"],
                    "validity_upper": st["validity_upper"],
                    "pearson": st["pearson"],
                    "spearman": st["spearman"],
                    "rel_ll_deg": _median(x.get("rel_ll_degradation") for x in rows),
                    "ll_drop_nats": _median(x.get("ll_drop") for x in rows),
                    "sec_per_item": _unit_seconds(data, name),
                }
            )
    return out


def _unit_seconds(data: SweepData, model: str) -> float:
    """Seconds per (point, radius) item of a model's units (a unit computes every radius of its points)."""
    units = [u for u in data.units if u["model"] == model]
    n = sum(u["n_points"] for u in units) * max(1, len(data.radii))
    return sum(u["seconds_total"] or 0.0 for u in units) / n if n else math.nan


def beta_trend(data: SweepData) -> dict[float, dict[str, float]]:
    """How the β-VAEs' medians move with β, per radius.

    Args:
        data: the sweep.

    Returns:
        ``{r: {"margin", "bound", "sigma_min", "jac_frobenius": Spearman ρ against β}}`` of the median numerical
        margin, capped bound, σ_min and ‖J‖_F, at radii with at least three β-VAEs.
    """
    out = {}
    bvae = [n for n, i in data.models.items() if model_kind(i) == "beta-vae"]
    for r in data.radii:
        betas, cols = [], {"margin": [], "bound": [], "sigma_min": [], "jac_frobenius": []}
        for name in bvae:
            rows = [x for x in data.results if x["model"] == name and x["r"] == r]
            if not rows:
                continue
            betas.append(data.models[name]["beta"])
            decided = [x for x in rows if x["certified"]]
            for c in cols:
                cols[c].append(_median(capped_bound(x) if c == "bound" else x[c] for x in decided))
        if len(betas) >= 3:
            out[r] = {c: _spearman(betas, v) for c, v in cols.items()}
    return out


def sweep_dataset(data: SweepData) -> str | None:
    """The dataset every swept point comes from.

    Args:
        data: the sweep.

    Returns:
        The ``points`` table's dataset name when all points share one, else None.
    """
    names = {p.get("dataset") for p in data.points}
    return names.pop() if len(names) == 1 else None


def published_pearson(dataset: str | None) -> float | None:
    """The published bound-vs-margin Pearson correlation of a dataset (:data:`PUBLISHED_PEARSON`).

    Args:
        dataset: a dataset name (case, ``_`` for ``-`` and the spellings ``fashionmnist``, ``cifar-10`` are
            accepted), or None.

    Returns:
        The published value, or None for a dataset without one.
    """
    if not dataset:
        return None
    key = str(dataset).strip().lower().replace("_", "-")
    return PUBLISHED_PEARSON.get(_DATASET_ALIASES.get(key, key))


def verification_summary(data: SweepData) -> dict[str, Any]:
    """What ``vaefast verify`` re-checked and confirmed.

    Args:
        data: the sweep (``data.verifications`` may be empty).

    Returns:
        ``checked`` and ``confirmed`` (all kinds), ``by_kind`` (``{kind: {"checked", "confirmed", "available"}}``;
        ``available`` = evidence rows for ``delta``, certified items for ``clean``) and ``failed`` (the rows not
        confirmed).
    """
    available = {
        "delta": sum(1 for r in data.results if r.get("delta") is not None),
        "clean": sum(1 for r in data.results if r["certified"]),
    }
    kinds = list(dict.fromkeys([*VERIFY_KINDS, *(v["kind"] for v in data.verifications)]))
    by_kind = {}
    for kind in kinds:
        rows = [v for v in data.verifications if v["kind"] == kind]
        by_kind[kind] = {
            "checked": len(rows),
            "confirmed": sum(1 for v in rows if v["confirmed"]),
            "available": available.get(kind),
        }
    return {
        "checked": len(data.verifications),
        "confirmed": sum(1 for v in data.verifications if v["confirmed"]),
        "by_kind": by_kind,
        "failed": [v for v in data.verifications if not v["confirmed"]],
    }


def evidence_summary(data: SweepData) -> dict[str, int]:
    """Counts about the stored evidence δ (rows with ``delta`` not NULL).

    Args:
        data: the sweep.

    Returns:
        ``n_evidence`` and ``n_evidence_not_breaking`` (p̂ at x + δ above 1/2: must be 0, the search stores a
        δ only where it saw p̂ ≤ 1/2).
    """
    ev = [r for r in data.results if r.get("delta") is not None]
    bad = [r for r in ev if r.get("p_hat_adv") is not None and r["p_hat_adv"] > 0.5]
    return {"n_evidence": len(ev), "n_evidence_not_breaking": len(bad)}


def tightness_items(data: SweepData) -> list[dict[str, Any]]:
    """Comparable items (certified, bracketed) with a sound certificate: per item the certified radius (the local
    one where it exists, else the global one), the first-order bound and the numerical margin.

    Args:
        data: the sweep.

    Returns:
        Dicts with ``model``, ``cert``, ``bound``, ``margin`` (numbers) for every such item.
    """
    out = []
    for row in data.results:
        cert = row.get("cert_local") if row.get("cert_local") is not None else row.get("cert_global")
        if cert is None or not is_comparable(row) or not row["margin"]:
            continue
        out.append({"model": row["model"], "cert": float(cert), "bound": float(row["bound"]), "margin": row["margin"]})
    return out


def tightness_summary(data: SweepData) -> dict[str, dict[str, float]]:
    """How the sound certificate compares with the first-order bound and the numerical margin, per kind of model.

    Args:
        data: the sweep.

    Returns:
        ``{"ordinary" | "lipschitz": {...}}`` (kinds with items only; :func:`model_kind` ``"lipschitz"`` or not) with
        ``n`` (items of :func:`tightness_items`), ``cert_le_margin`` and ``cert_le_bound`` (counts: the certificate is
        sound, so the first is every item unless the attack beat a wrong certificate; the bound is only first order)
        and the medians ``cert``, ``cert_over_bound``, ``cert_over_margin``.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in tightness_items(data):
        kind = "lipschitz" if model_kind(data.models[item["model"]]) == "lipschitz" else "ordinary"
        groups.setdefault(kind, []).append(item)
    out = {}
    for kind, items in groups.items():
        out[kind] = {
            "n": len(items),
            "cert_le_margin": sum(i["cert"] <= i["margin"] for i in items),
            "cert_le_bound": sum(i["cert"] <= i["bound"] for i in items),
            "cert": float(np.median([i["cert"] for i in items])),
            "cert_over_bound": float(np.median([i["cert"] / i["bound"] for i in items if i["bound"] > 0])),
            "cert_over_margin": float(np.median([i["cert"] / i["margin"] for i in items])),
        }
    return out


def headline(data: SweepData) -> dict[str, Any]:
    """The numbers a reader wants first.

    Args:
        data: the sweep.

    Returns:
        The swept dataset (``dataset``: :func:`sweep_dataset`) with its ``published_pearson`` (None when there is
        none) and ``published_source``, sizes, the item counts (:func:`item_counts`), validity over comparable
        items for every bound variant, Pearson/Spearman, the β trend, bound-exceeds-box counts per variant,
        clean-point decision disagreements, evidence and re-verification counts, the sound certificates against
        bound and margin (:func:`tightness_summary`), and the sweep's total time.
    """
    pooled = bound_stats(data.results)
    res = data.results
    dataset = sweep_dataset(data)
    return {
        "dataset": dataset,
        "published_pearson": published_pearson(dataset),
        "published_source": PUBLISHED_SOURCE,
        "models": len(data.models),
        "points": len(data.points),
        "radii": data.radii,
        "items": len(res),
        **{k: pooled[k] for k in COUNT_KEYS},
        "certified_fraction": float(np.mean([bool(r["certified"]) for r in res])) if res else math.nan,
        "bracketed_fraction": float(np.mean([bool(r["bracketed"]) for r in res])) if res else math.nan,
        "validity": pooled["validity"],
        "validity_upper": pooled["validity_upper"],
        "validity_lower": pooled["validity_lower"],
        "pearson": pooled["pearson"],
        "spearman": pooled["spearman"],
        **{f"{b}_validity": bound_stats(res, b)["validity"] for b in BOUND_COLUMNS[1:]},
        "median_bound_over_margin": pooled["median_ratio"],
        "beta_trend": beta_trend(data),
        "bound_exceeds_box": pooled["n_bound_exceeds_box"],
        "bound_exceeds_box_by_variant": {b: sum(1 for r in res if exceeds_box(r, b)) for b in BOUND_COLUMNS},
        "clean_point_disagreements": pooled["n_disagreements"],
        **evidence_summary(data),
        "verification": verification_summary(data),
        "tightness": tightness_summary(data),
        "sweep_seconds": float(sum(u["seconds_total"] or 0.0 for u in data.units)),
    }


def model_table(data: SweepData) -> list[dict[str, Any]]:
    """The models of a sweep as table rows.

    Args:
        data: the sweep.

    Returns:
        One row per model: name, kind, β, latent size, likelihood, source and hidden sizes.
    """
    rows = []
    for name, info in data.models.items():
        cfg = info["config"]
        rows.append(
            {
                "model": name,
                "kind": model_kind(info),
                "beta": info.get("beta"),
                "latent_dim": info["latent_dim"],
                "likelihood": info["likelihood"],
                "source": info["source"],
                "hidden": str(cfg.get("hidden", cfg.get("hidden_sizes", ""))),
            }
        )
    return rows
