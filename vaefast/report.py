"""Summaries and the HTML report of a sweep database (figures in :mod:`vaefast.plots`).

Statistics. Every (model, point, r) item falls in exactly one of three groups, and every summary says how many
items are in each instead of folding them into a rate:

- **uncertified**: p̂_r(x) ≤ 1/2 (no bound; the margin search's own decision at δ = 0, the same estimate);
- **unbracketed**: certified, but the margin search did not bracket (the margin only exceeds the search limit);
- **comparable**: certified and bracketed: bound and numerical margin can be compared.

The bound is **valid** at a comparable item when ``bound <= numerical margin``; the **validity rate** is taken
over comparable items only. Correlations between the bound and the numerical margin (Pearson r and Spearman ρ,
``scipy.stats``) use the same items. A certified item with margin 0 would mean the clean point was decided twice
with different outcomes; the clean point is decided once, so this **clean-point decision disagreement** count
must be 0 (it is counted, not explained away).

**Bound larger than the box.** ``max_radius`` is the largest L2 perturbation the data box allows at a point (the
distance to its farthest box corner). A bound above it claims every perturbation the box allows, so it is the
same claim as ``max_radius``: such bounds are **capped** to ``max_radius`` in every statistic, table and figure
and counted (``bound_exceeds_box``); they are never shown as a bare number larger than the input space.

**Likelihood degradation** (SPEC §1): ``|log p(x|z*) − log p(x|z)| / |log p(x|z)|`` (≥ 0) and the drop in nats
``log p(x|z) − log p(x|z*)`` (> 0 = damage), ``z = μ(x)``, ``z* = μ(x + δ)``, δ the perturbation that broke
r-robustness at the margin (the margin search's own evidence).

**Re-verification.** ``vaefast verify`` replays the stored evidence with fresh random numbers into the
``verifications`` table (kind ``delta``: x + δ confirmed not r-robust; kind ``clean``: a certified point confirmed
r-robust at δ = 0). Reports say how many were confirmed of how many checked, or that nothing was re-verified.

The **β trend** is Spearman's ρ between β and each model's median numerical margin (β-VAEs only), per radius.
"""

from __future__ import annotations

import html
import json
import math
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vaefast import store

BOUND_COLUMNS = ("bound", "certified_bound", "spectral_bound", "whitened_bound")
VERIFY_KINDS = ("delta", "clean")


@dataclass
class SweepData:
    """The contents of a results database as python rows (blobs kept on ``results`` and ``points``).

    ``verifications`` holds the rows of the ``verifications`` table (empty when the table is absent or empty).
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
        return list(self.models)

    @property
    def radii(self) -> list[float]:
        return sorted({r["r"] for r in self.results})


def load(db: str | os.PathLike | sqlite3.Connection) -> SweepData:
    """Read a results database.

    Args:
        db: a path to a results database or an open connection to one.

    Returns:
        The database as :class:`SweepData`.
    """
    conn = db if isinstance(db, sqlite3.Connection) else store.connect(db, create=False)
    try:
        models = store.model_info(conn)
        ordered = dict(sorted(models.items(), key=lambda kv: _model_sort_key(kv[1])))
        results = sorted(store.read_table(conn, "results", blobs=True), key=lambda r: r["item_id"])
        return SweepData(
            results=results,
            curves=sorted(store.read_table(conn, "curves"), key=lambda r: r["item_id"]),
            models=ordered,
            points=sorted(store.read_table(conn, "points", blobs=True), key=lambda r: r["pos"]),
            units=store.read_table(conn, "units"),
            meta=store.get_meta(conn),
            verifications=read_verifications(conn),
        )
    finally:
        if not isinstance(db, sqlite3.Connection):
            conn.close()


def read_verifications(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Rows of the ``verifications`` table (written by ``vaefast verify``), ordered by (item_id, kind).

    Args:
        conn: an open results database.

    Returns:
        The rows as dicts (empty when the evidence was never re-verified).
    """
    return sorted(store.read_table(conn, "verifications"), key=lambda r: (r["item_id"], r["kind"]))


def _model_sort_key(info: Mapping[str, Any]) -> tuple:
    tc = "tc" in str(info.get("objective") or "").lower()
    beta = info.get("beta")
    return (tc, beta if beta is not None else math.inf, info["name"])


def model_kind(info: Mapping[str, Any]) -> str:
    """``"beta-tcvae"``, ``"beta-vae"`` or ``"other"`` from the stored config."""
    obj = str(info.get("objective") or "").lower()
    if "tc" in obj:
        return "beta-tcvae"
    if info.get("beta") is not None:
        return "beta-vae"
    return "other"


def is_gaussian(info: Mapping[str, Any]) -> bool:
    """Whether a model's likelihood is Gaussian (log p can be near 0 there: degradation is reported in nats)."""
    return str(info.get("likelihood") or "").lower().startswith("gaussian")


# ----------------------------------------------------------------------------------------------------------
# statistics


def _corr(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(Pearson r, Spearman ρ), NaN when fewer than 3 points or a constant input."""
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    return float(stats.pearsonr(x, y)[0]), float(stats.spearmanr(x, y)[0])


def exceeds_box(row: Mapping[str, Any], bound: str = "bound") -> bool:
    """Whether ``row[bound]`` is larger than the largest perturbation the data box allows (``max_radius``)."""
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
    """Certified and bracketed, with a margin: bound and numerical margin can be compared."""
    return bool(row["certified"]) and bool(row["bracketed"]) and row["margin"] is not None


def comparable(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows where bound and numerical margin can be compared: certified and bracketed."""
    return [r for r in rows if is_comparable(r)]


def item_counts(rows: Sequence[Mapping[str, Any]], bound: str = "bound") -> dict[str, int]:
    """How many items are uncertified, unbracketed and comparable, and the two counts that must be read beside them.

    Args:
        rows: results rows.
        bound: the bound column whose ``exceeds box`` count is wanted.

    Returns:
        ``n_items``, ``n_uncertified`` (p̂ ≤ 1/2), ``n_unbracketed`` (certified, search not bracketed or no
        margin), ``n_comparable`` (the rest; the three add up to ``n_items``), ``n_bound_exceeds_box`` (bound >
        max_radius, over all items) and ``n_disagreements`` (certified but margin == 0: must be 0).
    """
    n_unc = sum(1 for r in rows if not r["certified"])
    n_comp = sum(1 for r in rows if is_comparable(r))
    return {
        "n_items": len(rows),
        "n_uncertified": n_unc,
        "n_unbracketed": len(rows) - n_unc - n_comp,
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
        The counts, ``n`` (= ``n_comparable``), ``validity`` (fraction with capped bound <= margin, over
        comparable items), Pearson/Spearman, the least-squares fit bound = slope * margin + intercept and the
        median bound/margin.
    """
    comp = comparable(rows)
    b = np.array([capped_bound(r, bound) for r in comp], float)
    m = np.array([r["margin"] for r in comp], float)
    pearson, spearman = _corr(b, m)
    slope = intercept = math.nan
    if b.size >= 2 and np.ptp(m) > 0:
        slope, intercept = (float(v) for v in np.polyfit(m, b, 1))
    return {
        **item_counts(rows, bound),
        "n": int(b.size),
        "validity": float(np.mean(b <= m)) if b.size else math.nan,
        "pearson": pearson,
        "spearman": spearman,
        "slope": slope,
        "intercept": intercept,
        "median_ratio": float(np.median(b / np.maximum(m, 1e-300))) if b.size else math.nan,
    }


def _median(values: Iterable[Any]) -> float:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.median(v)) if v else math.nan


def summary_rows(data: SweepData) -> list[dict[str, Any]]:
    """One row per (model, r): item counts, medians over points, validity over comparable items and ρ.

    Args:
        data: the sweep.

    Returns:
        Rows with the keys of :data:`SUMMARY_COLUMNS` (``bound`` is the median capped bound, ``rel_ll_deg``
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
                    **{k: st[k] for k in ("n_items", "n_uncertified", "n_unbracketed", "n_comparable")},
                    "p_hat": _median(x["p_hat"] for x in rows),
                    "r_star": _median(x["r_star"] for x in rows),
                    "bound": _median(capped_bound(x) for x in rows),
                    "bound_exceeds_box": st["n_bound_exceeds_box"],
                    "margin": _median(x["margin"] for x in rows),
                    "validity": st["validity"],
                    "pearson": st["pearson"],
                    "spearman": st["spearman"],
                    "rel_ll_deg": _median(x.get("rel_ll_degradation") for x in rows),
                    "ll_drop_nats": _median(x.get("ll_drop") for x in rows),
                    "sec_per_point": _unit_seconds(data, name, r),
                }
            )
    return out


def _unit_seconds(data: SweepData, model: str, r: float) -> float:
    units = [u for u in data.units if u["model"] == model and u["r"] == r]
    n = sum(u["n_points"] for u in units)
    return sum(u["seconds_total"] or 0.0 for u in units) / n if n else math.nan


def beta_trend(data: SweepData) -> dict[float, dict[str, float]]:
    """Per radius: Spearman ρ of β against the β-VAEs' median numerical margin, (capped) bound, σ_min and ‖J‖_F."""
    from scipy import stats

    out = {}
    bvae = [n for n, i in data.models.items() if model_kind(i) == "beta-vae"]
    for r in data.radii:
        betas, cols = [], {"margin": [], "bound": [], "sigma_min": [], "jac_frobenius": []}
        for name in bvae:
            rows = [x for x in data.results if x["model"] == name and x["r"] == r]
            if not rows:
                continue
            betas.append(data.models[name]["beta"])
            for c in cols:
                cols[c].append(_median(capped_bound(x) if c == "bound" else x[c] for x in rows))
        if len(betas) >= 3:
            out[r] = {c: float(stats.spearmanr(betas, v)[0]) for c, v in cols.items()}
    return out


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

    Returns:
        ``n_evidence`` and ``n_evidence_not_breaking`` (p̂ at x + δ above 1/2: must be 0, the search stores a
        δ only where it saw p̂ ≤ 1/2).
    """
    ev = [r for r in data.results if r.get("delta") is not None]
    bad = [r for r in ev if r.get("p_hat_adv") is not None and r["p_hat_adv"] > 0.5]
    return {"n_evidence": len(ev), "n_evidence_not_breaking": len(bad)}


def headline(data: SweepData) -> dict[str, Any]:
    """The numbers a reader wants first.

    Args:
        data: the sweep.

    Returns:
        Sizes, the item counts (:func:`item_counts`), validity over comparable items for every bound variant,
        Pearson/Spearman, the β trend, bound-exceeds-box counts per variant, clean-point decision disagreements,
        evidence and re-verification counts, and the sweep's total time.
    """
    pooled = bound_stats(data.results)
    res = data.results
    return {
        "models": len(data.models),
        "points": len(data.points),
        "radii": data.radii,
        "items": len(res),
        **{k: pooled[k] for k in ("n_items", "n_uncertified", "n_unbracketed", "n_comparable")},
        "certified_fraction": float(np.mean([bool(r["certified"]) for r in res])) if res else math.nan,
        "bracketed_fraction": float(np.mean([bool(r["bracketed"]) for r in res])) if res else math.nan,
        "validity": pooled["validity"],
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
        "sweep_seconds": float(sum(u["seconds_total"] or 0.0 for u in data.units)),
    }


# ----------------------------------------------------------------------------------------------------------
# text


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def _pct(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.1%}"


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A fixed-width text table."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, "-" * len(line), *body])


def format_verification(v: Mapping[str, Any]) -> str:
    """One sentence on re-verification: ``evidence re-verified: N of M ...`` or that it was not done.

    Args:
        v: :func:`verification_summary`'s dict.

    Returns:
        The sentence.
    """
    if not v["checked"]:
        return "evidence not re-verified (run `vaefast verify DB`)"
    parts = []
    for kind, k in v["by_kind"].items():
        avail = "" if k["available"] is None else f", {k['checked']} checked of {k['available']} stored"
        parts.append(f"{kind}: {k['confirmed']} of {k['checked']} confirmed{avail}")
    failed = f"; FAILED: {len(v['failed'])}" if v["failed"] else ""
    return f"evidence re-verified: {v['confirmed']} of {v['checked']} confirmed ({'; '.join(parts)}){failed}"


def format_headline(h: Mapping[str, Any]) -> str:
    """The headline as a few lines of text (counts in words, validity over comparable items only)."""
    box = h["bound_exceeds_box_by_variant"]
    lines = [
        f"items: {h['n_items']} ({h['models']} models x {h['points']} points x {len(h['radii'])} radii): "
        f"{h['n_uncertified']} uncertified (p_hat <= 1/2, no bound), {h['n_unbracketed']} unbracketed (certified, "
        f"margin beyond the search limit), {h['n_comparable']} comparable (certified and bracketed)",
        f"bound validity (bound <= numerical margin, over the {h['n_comparable']} comparable items): "
        f"{_pct(h['validity'])}  [certified bound {_pct(h['certified_bound_validity'])}, spectral "
        f"{_pct(h['spectral_bound_validity'])}, whitened {_pct(h['whitened_bound_validity'])}]",
        f"clean-point decision disagreements (certified but margin 0): {h['clean_point_disagreements']}",
        f"bound exceeds box: {h['bound_exceeds_box']} items (capped to the largest perturbation the box allows; "
        f"certified bound {box['certified_bound']}, spectral {box['spectral_bound']}, whitened "
        f"{box['whitened_bound']})",
        f"bound vs numerical margin: Pearson r = {h['pearson']:.3f}, Spearman rho = {h['spearman']:.3f}, "
        f"median bound/margin = {h['median_bound_over_margin']:.3f}",
        f"evidence (the delta that broke r-robustness at the margin): {h['n_evidence']} items; with p_hat at "
        f"x + delta above 1/2: {h['n_evidence_not_breaking']}",
        format_verification(h["verification"]),
    ]
    for r, t in h["beta_trend"].items():
        lines.append(
            f"beta trend at r={r:.4g} (Spearman rho vs beta over beta-VAEs): margin {t['margin']:+.2f}, "
            f"bound {t['bound']:+.2f}, sigma_min {t['sigma_min']:+.2f}, ||J||_F {t['jac_frobenius']:+.2f}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# the HTML report

SUMMARY_COLUMNS = (
    "model",
    "beta",
    "r",
    "n_items",
    "n_uncertified",
    "n_unbracketed",
    "n_comparable",
    "p_hat",
    "r_star",
    "bound",
    "bound_exceeds_box",
    "margin",
    "validity",
    "pearson",
    "spearman",
    "rel_ll_deg",
    "ll_drop_nats",
    "sec_per_point",
)

FIGURES: tuple[tuple[str, str, str], ...] = (
    (
        "bound_vs_margin.png",
        "Bound vs numerical margin",
        "Each dot is a comparable (point, r) item: certified (p̂ > 1/2) and bracketed by the margin search; the "
        "title says how many items were left out as uncertified or unbracketed. Dots below y = x (dashed) are items "
        "where the lower bound is valid. A bound larger than the largest perturbation the data box allows is "
        "capped to that radius and ringed by a black hexagon.",
    ),
    (
        "degradation_vs_margin.png",
        "Likelihood degradation vs margin",
        "Damage to the likelihood of the clean x, against the point's numerical margin: at a fixed attack budget "
        "(maximum-damage attack, ‖δ‖ ≤ eps) and at the perturbation δ that broke r-robustness at the margin. "
        "Gaussian-likelihood models: the drop log p(x|μ(x)) − log p(x|μ(x+δ)) in nats (log p can be near 0 there); "
        "other models: the relative degradation |log p(x|z*) − log p(x|z)| / |log p(x|z)| ≥ 0. Panel titles count "
        "the items without a value.",
    ),
    (
        "examples.png",
        "Evidence: the perturbation that broke r-robustness",
        "Largest- and smallest-margin points: x, the perturbation δ found by the margin search itself at the "
        "numerical margin (‖δ‖ = margin; diverging colours centred at 0), x + δ, and the reconstructions g(μ(x)) "
        "and g(μ(x + δ)); labelled with the p̂ (Clopper–Pearson interval, samples) the search saw at x + δ, "
        "which is ≤ 1/2: the input is not r-robust there.",
    ),
    (
        "phat_vs_eps.png",
        "p̂ vs attack norm",
        "Median p̂_r over points (band: interquartile range) under the maximum-damage attack with ‖δ‖ ≤ eps.",
    ),
    (
        "beta.png",
        "Against β",
        "Median margins (bounds capped to the box; black hexagon where a bound was capped), min σ and ‖J‖_F per "
        "model against β (β-TCVAE marked separately).",
    ),
    (
        "margin_vs_r.png",
        "Margin against r",
        "Median numerical margin (solid) and bound (dashed, capped to the box; black hexagon where a bound was "
        "capped) per model against r: the ranking of models by robustness can change with r.",
    ),
)

VERIFY_FAILED_COLUMNS = ("item_id", "kind", "p_hat", "ci_low", "ci_high", "num_samples", "reason")


def _html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def model_table(data: SweepData) -> list[dict[str, Any]]:
    """One row per model: kind, β, latent size, likelihood, hidden sizes, source."""
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


_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;"
    "text-align:right}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}"
    "pre{background:#f7f7f7;padding:1em;white-space:pre-wrap}.fail{color:#b00}"
)


def _verification_html(v: Mapping[str, Any]) -> list[str]:
    """The re-verification section: the sentence, and a table of the items not confirmed (if any)."""
    parts = ["<h2>Evidence re-verification</h2>", f"<p>{html.escape(format_verification(v))}.</p>"]
    if v["failed"]:
        parts.append(f"<p class='fail'>{len(v['failed'])} stored claims were NOT confirmed on replay:</p>")
        parts.append(_html_table(v["failed"], VERIFY_FAILED_COLUMNS))
    return parts


def _bound_tables_html(data: SweepData, summary: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-model bound table (with item counts) and the per (model, r) summary table."""
    per_model = [{"model": n, **bound_stats([x for x in data.results if x["model"] == n])} for n in data.model_names]
    pooled = {"model": "pooled", **bound_stats(data.results)}
    cols = ["model", "n_items", "n_uncertified", "n_unbracketed", "n_comparable", "n_bound_exceeds_box"]
    cols += ["n_disagreements", "validity", "pearson", "spearman", "slope", "intercept", "median_ratio"]
    return [
        "<h2>Bound vs numerical margin</h2>",
        "<p>Validity, correlations and the fit are over comparable items (certified and bracketed) only; bounds "
        "larger than the box are capped to <code>max_radius</code> (counted in <code>n_bound_exceeds_box</code>); "
        "<code>n_disagreements</code> counts certified items with margin 0 (must be 0).</p>",
        _html_table([*per_model, pooled], cols),
        "<h2>Per model and radius (medians over points)</h2>",
        "<p><code>bound</code>: median bound capped to the box; <code>rel_ll_deg</code>: median "
        "|log p(x|z*) − log p(x|z)| / |log p(x|z)|; <code>ll_drop_nats</code>: median log p(x|z) − log p(x|z*) "
        "in nats, both at the evidence δ.</p>",
        _html_table(summary, SUMMARY_COLUMNS),
    ]


def _figures_html(made: Mapping[str, Path]) -> list[str]:
    parts = []
    for fname, title, caption in FIGURES:
        if fname in made:
            parts.append(
                f"<h2>{html.escape(title)}</h2><p>{html.escape(caption)}</p>"
                f"<img src='{fname}' alt='{html.escape(title)}'>"
            )
        else:
            parts.append(f"<h2>{html.escape(title)}</h2><p><em>Not drawn: the sweep has no data for it.</em></p>")
    return parts


def write_report(db: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the figures (PNG), ``summary.json`` and ``index.html`` for a results database.

    Args:
        db: the results database.
        out: the output folder (created).

    Returns:
        The path of ``index.html``.
    """
    from vaefast import plots

    data = load(db)
    if not data.results:
        raise ValueError(f"db {str(db)!r} holds no results yet")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = plots.make_all(data, out)
    h = headline(data)
    summary = summary_rows(data)
    (out / "summary.json").write_text(json.dumps({"headline": h, "summary": summary}, indent=2, default=str))
    spec = json.loads(data.meta.get("spec", "{}"))
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>vaefast report</title><style>{_STYLE}</style>"
        "</head><body>",
        "<h1>vaefast robustness report</h1>",
        f"<p>Database: <code>{html.escape(str(db))}</code>. {h['models']} models × {h['points']} points × "
        f"{len(h['radii'])} radii; {spec.get('num_samples', '?')} Monte-Carlo samples per estimate, confidence "
        f"{spec.get('confidence', '?')}, seed {spec.get('seed', '?')}.</p>",
        "<h2>Headline</h2>",
        f"<pre>{html.escape(format_headline(h))}</pre>",
        *_verification_html(h["verification"]),
        "<h2>Models</h2>",
        _html_table(model_table(data), ["model", "kind", "beta", "latent_dim", "likelihood", "hidden", "source"]),
        *_bound_tables_html(data, summary),
        *_figures_html(made),
        "</body></html>",
    ]
    page = out / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
