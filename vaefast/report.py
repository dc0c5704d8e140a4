"""The text and HTML faces of a sweep: tables, the headline, and the report page (figures from :mod:`vaefast.plots`).

On MNIST, Fashion-MNIST and CIFAR-10 the headline text, the page and ``vaefast demo`` set the measured pooled
bound-vs-margin Pearson r beside the published one (:func:`format_published`). The numbers come from
:mod:`vaefast.analysis`; :func:`load`, :func:`headline`, :func:`summary_rows` and
:data:`SUMMARY_COLUMNS` are re-exported here, the names the report is read through.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vaefast._version import __version__
from vaefast.analysis import (
    COUNT_KEYS,
    SUMMARY_COLUMNS,
    SweepData,
    bound_stats,
    headline,
    load,
    model_table,
    summary_rows,
)

__all__ = [
    "SUMMARY_COLUMNS",
    "format_headline",
    "format_published",
    "format_table",
    "format_verification",
    "headline",
    "load",
    "summary_rows",
    "write_report",
]


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
    """A fixed-width text table (numbers to 4 significant digits, ``-`` for NULL).

    Args:
        rows: the rows as dicts.
        columns: the columns to show (default: the first row's keys).

    Returns:
        The table: a header line, a rule and one line per row (``(no rows)`` when empty).
    """
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
        v: :func:`vaefast.analysis.verification_summary`'s dict.

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


def format_published(h: Mapping[str, Any]) -> str:
    """The measured pooled bound-vs-margin Pearson r beside the published one, for a dataset that has one.

    Args:
        h: :func:`vaefast.analysis.headline`'s dict (``dataset``, ``published_pearson``, ``published_source``,
            ``pearson``, ``n_comparable``).

    Returns:
        One line, or ``""`` when the swept dataset has no published value.
    """
    published = h.get("published_pearson")
    if published is None:
        return ""
    measured = h.get("pearson")
    shown = (
        "n/a (fewer than 3 comparable items, or constant)"
        if measured is None or math.isnan(measured)
        else f"{measured:.3f}"
    )
    return (
        f"bound vs numerical margin on {h['dataset']}: measured Pearson r = {shown} (pooled over "
        f"{h['n_comparable']} comparable items); published Pearson r = {published:.3f} "
        f"({h.get('published_source') or 'published'})"
    )


def format_tightness(t: Mapping[str, Mapping[str, float]]) -> list[str]:
    """One line per kind of model: sound certificate against the first-order bound and the numerical margin.

    Args:
        t: :func:`vaefast.analysis.tightness_summary`'s dict.

    Returns:
        The lines (none without certificates).
    """
    return [
        f"sound certificate ({kind} models, {s['n']} items): <= margin on {s['cert_le_margin']}, <= first-order bound "
        f"on {s['cert_le_bound']}; median certificate {s['cert']:.3g}, certificate/bound {s['cert_over_bound']:.3f}, "
        f"certificate/margin {s['cert_over_margin']:.3f}"
        for kind, s in t.items()
    ]


def format_headline(h: Mapping[str, Any]) -> str:
    """The headline as a few lines of text (counts in words, validity over comparable items only).

    Args:
        h: :func:`vaefast.analysis.headline`'s dict.

    Returns:
        The lines joined by newlines.
    """
    box = h["bound_exceeds_box_by_variant"]
    lines = [
        f"items: {h['n_items']} ({h['models']} models x {h['points']} points x {len(h['radii'])} radii): "
        f"{h['n_not_robust']} not robust at delta = 0 (no bound, margin 0), {h['n_undecided']} undecided (p_hat too "
        f"close to 1/2 at this confidence: never compared), {h['n_unbracketed']} unbracketed (robust, no break found "
        f"within the search limit), {h['n_comparable']} comparable (decided robust, with evidence)",
        f"bound validity over the {h['n_comparable']} comparable items: bound <= margin estimate "
        f"{_pct(h['validity'])}, <= margin_upper (the evidence) {_pct(h['validity_upper'])}, <= margin_lower "
        f"{_pct(h['validity_lower'])}  [against the estimate: certified bound {_pct(h['certified_bound_validity'])}, "
        f"spectral {_pct(h['spectral_bound_validity'])}, whitened {_pct(h['whitened_bound_validity'])}]",
        f"clean-point decision disagreements (certified but margin 0): {h['clean_point_disagreements']}",
        f"bound exceeds box: {h['bound_exceeds_box']} items (capped to the largest perturbation the box allows; "
        f"certified bound {box['certified_bound']}, spectral {box['spectral_bound']}, whitened "
        f"{box['whitened_bound']})",
        f"bound vs margin estimate: Pearson r = {h['pearson']:.3f}, Spearman rho = {h['spearman']:.3f}, "
        f"median bound/margin = {h['median_bound_over_margin']:.3f}",
        *([format_published(h)] if format_published(h) else []),
        f"evidence (a delta decided to break r-robustness, at margin_upper): {h['n_evidence']} items; with p_hat at "
        f"x + delta above 1/2: {h['n_evidence_not_breaking']}",
        format_verification(h["verification"]),
        *format_tightness(h.get("tightness", {})),
    ]
    for r, t in h["beta_trend"].items():
        lines.append(
            f"beta trend at r={r:.4g} (Spearman rho vs beta over beta-VAEs): margin {t['margin']:+.2f}, "
            f"bound {t['bound']:+.2f}, sigma_min {t['sigma_min']:+.2f}, ||J||_F {t['jac_frobenius']:+.2f}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# the HTML report

VERIFY_FAILED_COLUMNS = ("item_id", "kind", "p_hat", "ci_low", "ci_high", "num_samples", "reason")


def _html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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


def _published_html(h: Mapping[str, Any]) -> list[str]:
    """A paragraph setting the measured correlation beside the published one (nothing without a published value)."""
    line = format_published(h)
    return [f"<p class='published'><strong>Against the paper:</strong> {html.escape(line)}.</p>"] if line else []


def _bound_tables_html(data: SweepData, summary: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-model bound table (with item counts) and the per (model, r) summary table."""
    per_model = [{"model": n, **bound_stats([x for x in data.results if x["model"] == n])} for n in data.model_names]
    pooled = {"model": "pooled", **bound_stats(data.results)}
    cols = ["model", *COUNT_KEYS, "n_bound_exceeds_box"]
    cols += ["n_disagreements", "validity", "validity_upper", "pearson", "spearman", "slope", "intercept"]
    cols += ["median_ratio"]
    return [
        "<h2>Bound vs numerical margin</h2>",
        "<p>Validity, correlations and the fit are over comparable items (decided robust, with evidence) only: "
        "<code>validity</code> against the margin estimate, <code>validity_upper</code> against the evidence radius "
        "(a bound above it is wrong with the stated confidence); bounds "
        "larger than the box are capped to <code>max_radius</code> (counted in <code>n_bound_exceeds_box</code>); "
        "<code>n_disagreements</code> counts certified items with margin 0 (must be 0).</p>",
        _html_table([*per_model, pooled], cols),
        "<h2>Per model and radius (medians over points)</h2>",
        "<p><code>bound</code>: median bound capped to the box; <code>rel_ll_deg</code>: median "
        "|log p(x|z*) − log p(x|z)| / |log p(x|z)|; <code>ll_drop_nats</code>: median log p(x|z) − log p(x|z*) "
        "in nats, both at the evidence δ.</p>",
        _html_table(summary, SUMMARY_COLUMNS),
    ]


def _figures_html(drawn: Sequence[tuple[Any, Path | None]]) -> list[str]:
    """One section per figure of :data:`vaefast.plots.FIGURES`: title, caption and image, or why it was not drawn."""
    parts = []
    for fig, path in drawn:
        title = f"<h2>{html.escape(fig.title)}</h2>"
        if path is None:
            parts.append(f"{title}<p><em>Not drawn: the sweep has no data for it.</em></p>")
        else:
            parts.append(
                f"{title}<p>{html.escape(fig.caption)}</p><img src='{fig.file}' alt='{html.escape(fig.title)}'>"
            )
    return parts


def _page(db: str | os.PathLike, data: SweepData, summary: Sequence[Mapping[str, Any]], figures: list[str]) -> str:
    """The HTML page: settings, headline, re-verification, models, bound tables and the figures' sections."""
    h = headline(data)
    spec = json.loads(data.meta.get("spec", "{}"))
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>vaefast report</title><style>{_STYLE}</style>"
        "</head><body>",
        "<h1>vaefast robustness report</h1>",
        f"<p>Database: <code>{html.escape(str(db))}</code>. {h['models']} models × {h['points']} points × "
        f"{len(h['radii'])} radii; {spec.get('num_samples', '?')} Monte-Carlo samples per estimate, confidence "
        f"{spec.get('confidence', '?')}, seed {spec.get('seed', '?')}; written by vaefast "
        f"{html.escape(data.meta.get('vaefast_version', '?'))}, reported by vaefast {__version__}.</p>",
        "<h2>Headline</h2>",
        *_published_html(h),
        f"<pre>{html.escape(format_headline(h))}</pre>",
        *_verification_html(h["verification"]),
        "<h2>Models</h2>",
        _html_table(model_table(data), ["model", "kind", "beta", "latent_dim", "likelihood", "hidden", "source"]),
        *_bound_tables_html(data, summary),
        *figures,
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(db: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the figures (PNG), ``summary.json`` and ``index.html`` for a results database.

    Args:
        db: the results database.
        out: the output folder (created).

    Returns:
        The path of ``index.html``.
    """
    from vaefast import plots  # matplotlib: loaded only when figures are drawn
    from vaefast._checks import check_output_dir

    out = check_output_dir("out", out)
    data = load(db)
    if not data.results:
        raise ValueError(f"db {str(db)!r} holds no results yet")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    drawn = plots.make_all(data, out)
    summary = summary_rows(data)
    (out / "summary.json").write_text(
        json.dumps({"headline": headline(data), "summary": summary}, indent=2, default=str)
    )
    page = out / "index.html"
    page.write_text(_page(db, data, summary, _figures_html(drawn)), encoding="utf-8")
    return page
