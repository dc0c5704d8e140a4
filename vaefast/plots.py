"""The report's figures, drawn from a sweep database with matplotlib (Agg backend, PNG files).

Each ``plot_*`` function takes :class:`vaefast.analysis.SweepData` and an output path, draws one figure and
returns the path, or ``None`` when the sweep holds no data for that figure (e.g. no attack budgets, no β). Each is
registered in :data:`FIGURES` with its file name, title and caption by the :func:`figure` decorator above it.
Bounds are always shown capped to the largest perturbation the data box allows
(:func:`vaefast.analysis.capped_bound`), with capped values marked; no value is left out of a figure without the
figure saying how many.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaefast._extras import require

matplotlib = require("matplotlib", "report", "the report")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from vaefast import store  # noqa: E402
from vaefast.analysis import (  # noqa: E402
    SweepData,
    bound_stats,
    capped_bound,
    comparable,
    exceeds_box,
    is_gaussian,
    model_kind,
    tightness_items,
)

DPI = 120
CAPPED_STYLE = {"marker": "H", "s": 80, "facecolors": "none", "edgecolors": "k", "linewidths": 0.9}
CAPPED_LABEL = "black hexagon: bound(s) capped to the box"

Plotter = Callable[..., "Path | None"]  # draw(data, path) or, for a figure that uses models, draw(data, path, models=)
ModelsArg = Mapping[str, Any]  # {name: nn.Module or run folder}


@dataclass(frozen=True)
class Figure:
    """One figure of the report.

    Attributes:
        file: its PNG file name in the report folder.
        title: its section title.
        caption: what it shows, for the report page.
        draw: the plotter: ``draw(data, path)`` writes the PNG and returns ``path``, or ``None`` without data.
        uses_models: whether ``draw`` also takes ``models=`` (``{name: nn.Module or run folder}`` overriding the
            models' stored sources).
    """

    file: str
    title: str
    caption: str
    draw: Plotter
    uses_models: bool = False


FIGURES: dict[str, Figure] = {}  # file name -> figure, in the order of the report


def figure(file: str, title: str, caption: str, uses_models: bool = False) -> Callable[[Plotter], Plotter]:
    """Decorator: register the plotter below as the report's figure ``file`` with its title and caption.

    Args:
        file: the PNG file name.
        title: the section title.
        caption: the caption.
        uses_models: the plotter takes ``models=`` too (it recomputes something from the models).

    Returns:
        The decorator (the plotter itself is returned unchanged).
    """

    def register(draw: Plotter) -> Plotter:
        FIGURES[file] = Figure(file, title, caption, draw, uses_models)
        return draw

    return register


def _colors(names: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("viridis" if len(names) > 6 else "tab10")
    n = max(len(names) - 1, 1)
    return {name: cmap(i / n if len(names) > 6 else i) for i, name in enumerate(names)}


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _spread(values: np.ndarray) -> bool:
    """True when positive values span more than ~1.5 decades (then log axes read better)."""
    v = values[values > 0]
    return v.size > 1 and v.max() / v.min() > 30


def _set_value_scale(ax, values: np.ndarray, axis: str = "y") -> str:
    """Pick a scale that shows every value: log (all > 0 and spread), symlog (zeros/negatives and spread), linear.

    Args:
        ax: the axes.
        values: the plotted values of that axis.
        axis: ``"x"`` or ``"y"``.

    Returns:
        The scale chosen.
    """
    v = np.asarray(values, float)
    nz = np.abs(v[v != 0])
    setter = ax.set_yscale if axis == "y" else ax.set_xscale
    if v.size and (v > 0).all() and _spread(v):
        setter("log")
        return "log"
    if nz.size > 1 and (v <= 0).any() and nz.max() / nz.min() > 30:
        setter("symlog", linthresh=float(np.quantile(nz, 0.1)))
        return "symlog"
    return "linear"


# ----------------------------------------------------------------------------------------------------------
# figure 1: bound vs margin


def _bound_margin_title(rows: Sequence[Mapping[str, Any]], left_out: int) -> str:
    """Title of figure 1: correlations, validity over comparable items, and the counts left out or capped."""
    st = bound_stats(rows)
    extra = f"; {left_out} items with a value ≤ 0 not on the log axes" if left_out else ""
    return (
        f"Bound vs margin estimate — pooled Pearson r = {st['pearson']:.3f}, Spearman ρ = {st['spearman']:.3f}\n"
        f"valid on {st['n_comparable']} comparable items: ≤ estimate {st['validity']:.1%}, ≤ margin_upper "
        f"{st['validity_upper']:.1%}; left out: {st['n_not_robust']} not robust, {st['n_undecided']} undecided, "
        f"{st['n_unbracketed']} unbracketed{extra}\n"
        f"bound exceeds box: {st['n_bound_exceeds_box']} items (capped to max_radius, black hexagons)"
    )


def _scatter_bounds(ax, data: SweepData, comp: Sequence[Mapping[str, Any]]) -> None:
    """One colour per model, one marker per radius; capped bounds get a black hexagon around them."""
    colors = _colors(data.model_names)
    markers = "osD^v<>pP*"
    for name in data.model_names:
        rows = [r for r in comp if r["model"] == name]
        if not rows:
            continue
        st = bound_stats(rows)
        label = f"{name} (ρ={st['spearman']:.2f}, valid {st['validity']:.0%})"
        for k, rr in enumerate(data.radii):
            sub = [r for r in rows if r["r"] == rr]
            if sub:
                m = np.array([r["margin"] for r in sub], float)
                # margin_lower = 0 (no attacked radius decided robust) would run off a log axis: no left part
                left = [r["margin"] - r["margin_lower"] if r["margin_lower"] > 0 else 0.0 for r in sub]
                xerr = np.array([left, [r["margin_upper"] - r["margin"] for r in sub]], float).clip(min=0)
                ax.errorbar(m, [capped_bound(r) for r in sub], xerr=xerr, fmt="none", ecolor=colors[name], alpha=0.25,
                            lw=0.6)  # fmt: skip
                ax.scatter(
                    [r["margin"] for r in sub],
                    [capped_bound(r) for r in sub],
                    s=14,
                    alpha=0.7,
                    color=colors[name],
                    marker=markers[k % len(markers)],
                    edgecolors="none",
                    label=label,
                )
                label = None
    capped = [r for r in comp if exceeds_box(r)]
    if capped:
        label = f"bound > box, capped to max_radius ({len(capped)})"
        ax.scatter([r["margin"] for r in capped], [capped_bound(r) for r in capped], label=label, **CAPPED_STYLE)


def _fit_line(ax, m: np.ndarray, b: np.ndarray, xs: np.ndarray, log_axes: bool, pooled: Mapping) -> None:
    positive = (m > 0) & (b > 0)
    if log_axes and positive.sum() >= 2:  # a power law is a straight line on these axes
        a, c = np.polyfit(np.log(m[positive]), np.log(b[positive]), 1)
        label = f"least squares in log-log: bound = {np.exp(c):.3g}·margin^{a:.2f}"
        ax.plot(xs, np.exp(c) * xs**a, color="crimson", lw=1.2, label=label)
    elif not math.isnan(pooled["slope"]):
        label = f"least squares: bound = {pooled['slope']:.3f}·margin {pooled['intercept']:+.3g}"
        ax.plot(xs, pooled["slope"] * xs + pooled["intercept"], color="crimson", lw=1.2, label=label)


@figure(
    "bound_vs_margin.png",
    "Bound vs numerical margin",
    "Each dot is a comparable (point, r) item: decided robust at δ = 0 and with a decided break; x is the margin "
    "estimate (where p̂ crosses 1/2 along the attack path) and its horizontal bar the bracket [margin_lower, "
    "margin_upper] of radii decided robust and broken at the sweep's confidence (no left part where margin_lower = 0: "
    "no attacked radius was decided robust). The title says how many items were "
    "left out (not robust, undecided, unbracketed). Dots below y = x (dashed) are items where the lower bound is "
    "valid. A bound larger than the largest perturbation the data box allows is capped to that radius and ringed by "
    "a black hexagon.",
)
def plot_bound_vs_margin(data: SweepData, path: Path) -> Path | None:
    """Figure 1: capped bound (y) vs numerical margin (x) over comparable items, y = x, fit, ρ per model and pooled.

    Args:
        data: the sweep.
        path: the PNG to write.

    Returns:
        ``path``, or ``None`` with fewer than 2 comparable items.
    """
    comp = comparable(data.results)
    if len(comp) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.6, 5.8))
    m = np.array([r["margin"] for r in comp], float)
    b = np.array([capped_bound(r) for r in comp], float)
    _scatter_bounds(ax, data, comp)
    lo = max(min(m.min(), b[b > 0].min() if (b > 0).any() else m.min()) * 0.8, 1e-6)
    hi = max(m.max(), b.max()) * 1.2
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    log_axes = _spread(m) or _spread(b)
    xs = np.geomspace(lo, hi, 200) if log_axes else np.linspace(0, hi, 200)
    _fit_line(ax, m, b, xs, log_axes, bound_stats(data.results))
    left_out = int(((m <= 0) | (b <= 0)).sum()) if log_axes else 0
    if log_axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlim(lo if log_axes else 0, hi)
    ax.set_ylim(lo if log_axes else 0, hi)
    ax.set_xlabel("numerical margin estimate $R_{num}$ with [margin_lower, margin_upper]")
    ax.set_ylabel("bound  $\\min_i\\sigma_i\\,\\Phi^{-1}(\\hat p_r)\\,/\\,\\|J_\\mu\\|_F$  (capped to the box)")
    radii = ", ".join(f"{r:.3g}" for r in data.radii)
    ax.set_title(_bound_margin_title(data.results, left_out) + f"; markers = radius r ({radii})", fontsize=8)
    ax.legend(fontsize=7, loc="upper left", framealpha=0.85)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------
# figure 2: likelihood degradation vs margin

NATS_LABEL = "log-likelihood drop  log p(x|μ(x)) − log p(x|μ(x+δ))  [nats]"
REL_LABEL = "relative degradation  |log p(x|z*) − log p(x|z)| / |log p(x|z)|"


def _quantity(info: Mapping[str, Any]) -> str:
    """The degradation column plotted for a model: ``ll_drop`` (Gaussian likelihood) or ``rel_ll_degradation``."""
    return "ll_drop" if is_gaussian(info) else "rel_ll_degradation"


def _why_missing(res: Mapping[str, Any] | None) -> str:
    """Why an item has no point in a degradation panel."""
    if res is None:
        return "without a result row"
    if res["clean_decision"] == 0:
        return "undecided at δ = 0 (never compared)"
    if not res["certified"]:
        return "not robust at δ = 0 (no δ)"
    if not res["bracketed"] or res["margin"] is None:
        return "unbracketed (margin unknown)"
    return "without a value"


def _degradation_panel(data: SweepData, source: str, column: str) -> dict[str, Any] | None:
    """Points of one panel: ``source`` ``"fixed"`` (curves at the middle budget) or ``"margin"`` (evidence δ).

    Returns:
        ``{"title", "points": [(model, margin, value)], "missing": {reason: count}}``, or ``None`` when the panel
        has no candidate item.
    """
    names = {n for n, i in data.models.items() if _quantity(i) == column}
    by_item = {(r["model"], r["pos"], r["r"]): r for r in data.results}
    if source == "fixed":
        if not data.curves:
            return None
        eps_all = sorted({c["eps"] for c in data.curves})
        eps = eps_all[len(eps_all) // 2]
        cands = [(c, by_item.get((c["model"], c["pos"], c["r"]))) for c in data.curves if c["eps"] == eps]
        title = f"fixed attack budget ‖δ‖ ≤ {eps:.3g} (max-damage attack)"
    else:
        cands = [(r, r) for r in data.results]
        title = "at the evidence δ: broke r-robustness, ‖δ‖ = margin"
    cands = [(row, res) for row, res in cands if row["model"] in names]
    if not cands:
        return None
    points, missing = [], {}
    for row, res in cands:
        if res is not None and res["bracketed"] and res["margin"] is not None and row.get(column) is not None:
            points.append((row["model"], float(res["margin"]), float(row[column])))
        else:
            why = _why_missing(res)
            missing[why] = missing.get(why, 0) + 1
    return {"title": title, "points": points, "missing": missing}


def _draw_degradation(ax, data: SweepData, panel: Mapping[str, Any], column: str) -> None:
    colors = _colors(data.model_names)
    pts = panel["points"]
    for name in data.model_names:
        sub = [(m, v) for n, m, v in pts if n == name]
        if sub:
            ax.scatter(*zip(*sub, strict=True), s=14, alpha=0.7, color=colors[name], label=name, edgecolors="none")
    values = np.array([v for _, _, v in pts], float)
    scale = _set_value_scale(ax, values)
    if column == "ll_drop" or scale != "linear" or (values < 0).any():
        ax.axhline(0, color="k", lw=0.6, ls=":")
    miss = ", ".join(f"{n} {why}" for why, n in sorted(panel["missing"].items()))
    tail = f"; not shown: {miss}" if miss else "; every item shown"
    ax.set_title(f"{panel['title']}\nn = {len(pts)}{tail}; {scale} axis", fontsize=8)
    ax.set_xlabel("numerical margin $R_{num}$")
    ax.set_ylabel(NATS_LABEL if column == "ll_drop" else REL_LABEL, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    if pts:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no item with a value here", ha="center", va="center", transform=ax.transAxes, fontsize=9)


@figure(
    "degradation_vs_margin.png",
    "Likelihood degradation vs margin",
    "Damage to the likelihood of the clean x, against the point's numerical margin: at a fixed attack budget "
    "(maximum-damage attack, ‖δ‖ ≤ eps) and at the perturbation δ that broke r-robustness at the margin. "
    "Gaussian-likelihood models: the drop log p(x|μ(x)) − log p(x|μ(x+δ)) in nats (log p can be near 0 there); "
    "other models: the relative degradation |log p(x|z*) − log p(x|z)| / |log p(x|z)| ≥ 0. Panel titles count the "
    "items without a value.",
)
def plot_degradation_vs_margin(data: SweepData, path: Path) -> Path | None:
    """Figure 2: likelihood degradation vs numerical margin, at a fixed budget and at the evidence δ.

    One row of panels per quantity: the drop in nats for Gaussian-likelihood models, the relative degradation
    for the others (one definition: ``|ll_adv − ll_clean| / |ll_clean|``, plotted as stored, never patched).

    Args:
        data: the sweep.
        path: the PNG to write.

    Returns:
        ``path``, or ``None`` when no panel has a value to show.
    """
    columns = sorted({_quantity(i) for i in data.models.values()}, key=lambda c: c != "rel_ll_degradation")
    grid = [[_degradation_panel(data, s, c) for s in ("fixed", "margin")] for c in columns]
    grid = [[p for p in row if p is not None] for row in grid]
    keep = [(c, row) for c, row in zip(columns, grid, strict=True) if row]
    if not any(p["points"] for _, row in keep for p in row):
        return None
    ncols = max(len(row) for _, row in keep)
    fig, axes = plt.subplots(len(keep), ncols, figsize=(6 * ncols, 4.8 * len(keep)), squeeze=False)
    for i, (column, row) in enumerate(keep):
        for j in range(ncols):
            if j < len(row):
                _draw_degradation(axes[i, j], data, row[j], column)
            else:
                axes[i, j].axis("off")
    fig.suptitle("Likelihood of the clean x after the perturbation (z = μ(x), z* = μ(x + δ))", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------
# figure 3: evidence examples


def _tiles(img: np.ndarray) -> np.ndarray:
    """Channels ``[C, H, W]`` side by side as one ``[H, C W + C - 1]`` map (NaN columns between them)."""
    c, h, _ = img.shape
    gap = np.full((h, 1), np.nan)
    return np.concatenate([part for k in range(c) for part in ((img[k],) if k == 0 else (gap, img[k]))], axis=1)


def _as_map(vec: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """An input as a 2-d map (or ``[H, W, 3]`` RGB): ``(1, H, W)`` and ``(H, W)`` as they are, ``(3, H, W)`` as RGB,
    any other channel count as the channels side by side, a vector of square length as a square, else a strip."""
    shape = tuple(shape)
    if len(shape) == 3:
        img = vec.reshape(shape)
        if shape[0] == 1:
            return img[0]
        return img.transpose(1, 2, 0) if shape[0] == 3 else _tiles(img)
    if len(shape) == 2:
        return vec.reshape(shape)
    side = math.isqrt(vec.size)
    return vec.reshape(side, side) if side * side == vec.size and side > 1 else vec.reshape(1, -1)


def _image(vec: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, str | None]:
    """The map of :func:`_as_map` and its colour map (None for RGB, clipped to [0, 1])."""
    img = _as_map(vec, shape)
    return (np.clip(img, 0, 1), None) if img.ndim == 3 else (img, "gray")


def _signed_image(vec: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A signed 2-d map of δ (the channel mean for colour images, channels side by side for other counts)."""
    shape = tuple(shape)
    if len(shape) == 3 and shape[0] == 3:
        return vec.reshape(shape).mean(axis=0)
    return _as_map(vec, shape)


def _panel_aspect(shape: Sequence[int]) -> float:
    """Width / height of the map an input is drawn as (1 for square images)."""
    img = _as_map(np.zeros(int(np.prod(shape))), shape)
    return img.shape[1] / img.shape[0]


def _pick_examples(data: SweepData) -> list[Mapping[str, Any]]:
    """Largest- and smallest-margin evidence rows at the middle radius, for the smallest- and largest-β model.

    Only rows with evidence (``delta`` not NULL: margin > 0 and bracketed) are candidates.
    """
    with_delta = [x for x in data.results if x.get("delta") is not None]
    radii = sorted({x["r"] for x in with_delta})
    if not radii:
        return []
    r_mid = radii[len(radii) // 2]
    names = [n for n in data.model_names if any(x["model"] == n and x["r"] == r_mid for x in with_delta)]
    bvae = [n for n in names if model_kind(data.models[n]) == "beta-vae"]
    if len(bvae) >= 2:  # the extremes of β when there are β-VAEs (models are sorted by kind, then β)
        names = bvae
    chosen: list[Mapping[str, Any]] = []
    for name in dict.fromkeys([names[0], names[-1]]):
        rows = sorted(
            (x for x in with_delta if x["model"] == name and x["r"] == r_mid), key=lambda x: (x["margin"], x["pos"])
        )
        chosen.extend([{**rows[-1], "_which": "largest R"}, {**rows[0], "_which": "smallest R"}][: len(rows)])
    return chosen


def _interval(p: Any, lo: Any, hi: Any, n: Any) -> str:
    if p is None:
        return "p̂ not stored"
    ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
    return f"p̂ = {p:.2f}{ci}, n = {n if n is not None else '?'}"


def _verified_tag(data: SweepData, item_id: str) -> str:
    v = [x for x in data.verifications if x["item_id"] == item_id and x["kind"] == "delta"]
    if not v:
        return "not re-verified"
    return "re-verified" if v[0]["confirmed"] else "RE-VERIFICATION FAILED"


Recon = tuple[np.ndarray, np.ndarray]  # g(μ(x)), g(μ(x + δ)) of one example, flat


def _decode_means(model: Any, x: Any) -> np.ndarray:
    """g(μ(x)) of a batch, flat float32 rows, with the model in eval mode."""
    import torch

    from vaefast._checks import eval_mode
    from vaefast.sweep.inputs import on_model

    with torch.no_grad(), eval_mode(model):
        y = model.decode(model.encode(on_model(model, x))[0])
    return y.detach().cpu().float().flatten(1).numpy()


def _model_reconstructions(data: SweepData, name: str, rows: Sequence[Mapping[str, Any]], model: Any) -> list[Recon]:
    """g(μ(x)) and g(μ(x + δ)) of ``rows`` (one model's examples) from the stored x and δ."""
    import torch

    shape = data.models[name]["input_shape"]
    points = {p["pos"]: p for p in data.points}
    x = torch.stack([torch.from_numpy(store.from_blob(points[r["pos"]]["x"], shape).copy()) for r in rows])
    delta = torch.stack([torch.from_numpy(store.from_blob(r["delta"], shape).copy()) for r in rows])
    clean, adv = _decode_means(model, x), _decode_means(model, x + delta)
    return list(zip(clean, adv, strict=True))


def example_reconstructions(
    data: SweepData, rows: Sequence[Mapping[str, Any]], models: ModelsArg | None = None
) -> tuple[dict[str, Recon], dict[str, str]]:
    """Recompute the reconstructions of evidence rows from the sweep's models (the database stores only x and δ).

    Args:
        data: the sweep.
        rows: results rows with evidence (``delta`` not NULL).
        models: ``{name: nn.Module or run folder}`` overriding the stored sources (needed for models swept from
            memory); weights must match the stored SHA-256.

    Returns:
        ``({item_id: (g(μ(x)), g(μ(x + δ)))}, {model: why its reconstructions are unavailable})``.

    Raises:
        ValueError: ``models`` names a model the sweep does not hold.
    """
    from vaefast.sweep.inputs import load_stored_models

    overrides = dict(models or {})
    unknown = sorted(set(overrides) - set(data.models))
    if unknown:
        raise ValueError(f"models: {unknown} are not in the sweep (it has {sorted(data.models)})")
    recon: dict[str, Recon] = {}
    unavailable: dict[str, str] = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        try:
            model = load_stored_models(data.models, [name], overrides)[name]
        except (ValueError, TypeError, OSError) as exc:
            unavailable[name] = str(exc)
            continue
        sub = [r for r in rows if r["model"] == name]
        values = _model_reconstructions(data, name, sub, model)
        recon.update({r["item_id"]: v for r, v in zip(sub, values, strict=True)})
    return recon, unavailable


def _unavailable(ax, why: str) -> None:
    """Write in an empty panel why the reconstruction is not shown."""
    lines = textwrap.wrap(why, 30)
    text = "\n".join(["reconstruction unavailable:", *lines[:5], *(["..."] if len(lines) > 5 else [])])
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=5)


def _example_images(ax_list, fig, shape, imgs: Sequence[np.ndarray | None], delta: np.ndarray, why: str) -> None:
    """Draw x | δ (diverging, colorbar) | x + δ | g(μ(x)) | g(μ(x + δ)) on one shared grey scale."""
    present = [v for v in imgs if v is not None]
    lo, hi = min(float(v.min()) for v in present), max(float(v.max()) for v in present)
    if imgs[0].min() >= 0 and imgs[0].max() <= 1:
        lo, hi = min(lo, 0.0), max(hi, 1.0)
    for j, vec in enumerate(imgs):
        ax = ax_list[j]
        ax.set_xticks([])
        ax.set_yticks([])
        if j == 1:
            lim = max(float(np.abs(delta).max()), 1e-12)
            im = ax.imshow(_signed_image(delta, shape), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
        elif vec is not None:
            img, cmap = _image(vec, shape)
            ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        else:
            _unavailable(ax, why)


def _example_row(fig, axes, data: SweepData, row: Mapping[str, Any], x: np.ndarray, recon: Recon | None, why: str,
                 first: bool) -> None:  # fmt: skip
    """One example: x | δ | x + δ | g(μ(x)) | g(μ(x + δ)), labelled with the evidence.

    ``recon`` holds the recomputed reconstructions, or is ``None`` (then ``why`` says why they are not shown).
    """
    shape = data.models[row["model"]]["input_shape"]
    delta = store.from_blob(row["delta"])
    clean, adv = recon if recon is not None else (None, None)
    _example_images(axes, fig, shape, [x, None, x + delta, clean, adv], delta, why)
    if first:
        for ax, title in zip(axes, ["x", "δ (0 = white)", "x + δ", "g(μ(x))", "g(μ(x + δ))"], strict=True):
            ax.set_title(title, fontsize=8)
    lower = row.get("margin_lower")
    bracket = f"; bracket ({lower:.3g}, {row['margin']:.3g}]" if lower is not None else ""
    axes[1].set_xlabel(f"‖δ‖ = margin = {row['margin']:.3g}{bracket}", fontsize=7)
    clean_ci = _interval(row["p_hat"], row.get("ci_low"), row.get("ci_high"), row.get("num_samples"))
    axes[3].set_xlabel(f"at δ = 0: {clean_ci}", fontsize=7)
    adv_ci = _interval(row.get("p_hat_adv"), row.get("ci_low_adv"), row.get("ci_high_adv"), row.get("num_samples_adv"))
    axes[4].set_xlabel(f"at x + δ: {adv_ci}\nnot r-robust ({_verified_tag(data, row['item_id'])})", fontsize=7)


@figure(
    "examples.png",
    "Evidence: the perturbation that broke r-robustness",
    "Largest- and smallest-margin points: x, the perturbation δ found by the margin search itself at the "
    "numerical margin (‖δ‖ = margin; diverging colours centred at 0), x + δ, and the reconstructions g(μ(x)) and "
    "g(μ(x + δ)), recomputed from the sweep's models (the database stores x and δ only; a model swept from memory "
    "has no run folder to load, and its reconstructions are then marked unavailable unless the models are passed "
    "in); labelled with the p̂ (Clopper–Pearson interval, samples) the search saw at x + δ, which is ≤ 1/2: the "
    "input is not r-robust there.",
    uses_models=True,
)
def plot_examples(data: SweepData, path: Path, models: ModelsArg | None = None) -> Path | None:
    """Figure 3: the evidence δ that broke r-robustness at the margin, for the largest and smallest margins.

    Args:
        data: the sweep.
        path: the PNG to write.
        models: ``{name: nn.Module or run folder}`` to recompute the reconstructions with (default: the run folders
            the database names, checked against the stored weights).

    Returns:
        ``path``, or ``None`` when no row carries evidence.
    """
    examples = _pick_examples(data)
    if not examples:
        return None
    recon, unavailable = example_reconstructions(data, examples, models)
    points = {p["pos"]: p for p in data.points}
    aspect = min(max(_panel_aspect(data.models[r["model"]]["input_shape"]) for r in examples), 4.0)
    width = 11.5 * max(1.0, aspect**0.5)
    fig, axes = plt.subplots(len(examples), 5, figsize=(width, 2.6 * len(examples) / min(aspect, 1.0) ** 0.5),
                             squeeze=False)  # fmt: skip
    for i, row in enumerate(examples):
        point = points[row["pos"]]
        why = unavailable.get(row["model"], "")
        _example_row(fig, axes[i], data, row, store.from_blob(point["x"]), recon.get(row["item_id"]), why, i == 0)
        label = point.get("label")
        axes[i, 0].set_ylabel(
            f"{row['model']}, r = {row['r']:.3g}\n{row['_which']}: point {row['pos']}"
            + (f"\n(label {label})" if label is not None else ""),
            fontsize=7,
        )
    fig.suptitle(
        "Evidence: the perturbation δ that broke r-robustness at the numerical margin (found by the margin search)",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------
# figures 4-6


@figure(
    "phat_vs_eps.png",
    "p̂ vs attack norm",
    "Median p̂_r over points (band: interquartile range) under the maximum-damage attack with ‖δ‖ ≤ eps.",
)
def plot_phat_vs_eps(data: SweepData, path: Path) -> Path | None:
    """Figure 4: median p̂_r (IQR band) under the max-damage attack against its budget, one panel per r.

    Args:
        data: the sweep.
        path: the PNG to write.

    Returns:
        ``path``, or ``None`` without curves.
    """
    if not data.curves:
        return None
    radii = sorted({c["r"] for c in data.curves})
    colors = _colors(data.model_names)
    fig, axes = plt.subplots(1, len(radii), figsize=(5.2 * len(radii), 4.2), squeeze=False)
    clean = {(r["model"], r["pos"], r["r"]): r["p_hat"] for r in data.results}
    for ax, rr in zip(axes[0], radii, strict=True):
        for name in data.model_names:
            sub = [c for c in data.curves if c["model"] == name and c["r"] == rr]
            if not sub:
                continue
            eps = sorted({c["eps"] for c in sub})
            vals = [np.array([c["p_hat"] for c in sub if c["eps"] == e]) for e in eps]
            base = np.array([clean[(name, c["pos"], rr)] for c in sub if c["eps"] == eps[0]])
            xs = [0.0, *eps]
            vals = [base, *vals]
            med = [np.median(v) for v in vals]
            ax.plot(xs, med, "-o", ms=3, color=colors[name], label=name)
            ax.fill_between(
                xs,
                [np.quantile(v, 0.25) for v in vals],
                [np.quantile(v, 0.75) for v in vals],
                color=colors[name],
                alpha=0.15,
                lw=0,
            )
        ax.axhline(0.5, color="k", ls=":", lw=1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("attack budget ‖δ‖₂ ≤ eps")
        ax.set_ylabel(f"p̂_r (r = {rr:.3g})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("r-robustness probability under the maximum-damage attack (dotted: p = 1/2)", fontsize=10)
    return _save(fig, path)


def _group_medians(data: SweepData, name: str, r: float | None) -> tuple[float, float, int]:
    """(median margin, median capped bound, number of capped bounds) of one model at one radius (all radii: None),
    over the items whose clean point was decided (undecided items have no margin)."""
    rows = [x for x in data.results if x["model"] == name and (r is None or x["r"] == r) and x["margin"] is not None]
    margin = float(np.median([x["margin"] for x in rows])) if rows else math.nan
    bound = float(np.median([capped_bound(x) for x in rows])) if rows else math.nan
    return margin, bound, sum(1 for x in rows if exceeds_box(x))


def _ring_capped(ax, xs: Sequence[float], ys: Sequence[float], n_capped: Sequence[int]) -> None:
    """Ring (black hexagon) the medians whose group holds capped bounds; one legend entry per axes."""
    pick = [(x, y) for x, y, n in zip(xs, ys, n_capped, strict=True) if n > 0]
    if pick:
        labelled = any(c.get_label() == CAPPED_LABEL for c in ax.collections)
        ax.scatter(*zip(*pick, strict=True), label=None if labelled else CAPPED_LABEL, **CAPPED_STYLE)


def _beta_margins(ax, data: SweepData, names: Sequence[str], marker: str, line: str, kind: str) -> int:
    """Median numerical margin (solid) and capped bound (dashed) per radius; returns the number of capped items."""
    radii = data.radii
    rcolors = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(radii), 1)))
    betas = [data.models[n]["beta"] for n in names]
    total = 0
    for k, rr in enumerate(radii):
        med, bnd, capped = zip(*(_group_medians(data, n, rr) for n in names), strict=True)
        label = f"r = {rr:.3g}" if kind == "beta-vae" else None
        ax.plot(betas, med, marker=marker, ls=line, color=rcolors[k], label=label)
        dashed = "--" if line == "-" else "none"
        ax.plot(betas, bnd, marker=marker, ls=dashed, mfc="none", color=rcolors[k], alpha=0.8)
        _ring_capped(ax, betas, bnd, capped)
        total += sum(capped)
    return total


@figure(
    "beta.png",
    "Against β",
    "Median margins (bounds capped to the box; black hexagon where a bound was capped), min σ and ‖J‖_F per model "
    "against β (β-TCVAE marked separately).",
)
def plot_beta(data: SweepData, path: Path) -> Path | None:
    """Figure 5: median numerical margin (solid) and capped bound (dashed) per radius, min σ and ‖J‖_F against β.

    β-VAEs are joined by lines; a β-TCVAE is drawn as squares at its TC weight.

    Args:
        data: the sweep.
        path: the PNG to write.

    Returns:
        ``path``, or ``None`` when no model has a β.
    """
    models = {n: i for n, i in data.models.items() if i.get("beta") is not None}
    if not models:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    capped = 0
    for kind, marker in (("beta-vae", "o"), ("beta-tcvae", "s"), ("other", "^")):
        names = sorted((n for n, i in models.items() if model_kind(i) == kind), key=lambda n: models[n]["beta"])
        if not names:
            continue
        line = "-" if kind == "beta-vae" and len(names) > 1 else "none"
        capped += _beta_margins(axes[0], data, names, marker, line, kind)
        tag = {"beta-vae": "β-VAE", "beta-tcvae": "β-TCVAE", "other": "other"}[kind]
        betas = [models[n]["beta"] for n in names]
        color = "tab:blue" if kind == "beta-vae" else "tab:red"
        for ax, col in ((axes[1], "sigma_min"), (axes[2], "jac_frobenius")):
            vals = [np.median([x[col] for x in data.results if x["model"] == n]) for n in names]
            ax.plot(betas, vals, marker=marker, ls=line, color=color, label=tag)
    titles = [
        "median margins: numerical (solid), bound (dashed, open)\n"
        f"bounds capped to the box: {capped} items (black hexagons)",
        "min$_i$ σ(x)$_i$ (median over points)",
        "$\\|J_\\mu(x)\\|_F$ (median over points)",
    ]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("β (β-TCVAE: TC weight, squares)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return _save(fig, path)


@figure(
    "margin_vs_r.png",
    "Margin against r",
    "Median numerical margin (solid) and bound (dashed, capped to the box; black hexagon where a bound was "
    "capped) per model against r: the ranking of models by robustness can change with r.",
)
def plot_margin_vs_r(data: SweepData, path: Path) -> Path | None:
    """Figure 6: median numerical margin (solid) and capped bound (dashed) against r, one colour per model.

    Args:
        data: the sweep.
        path: the PNG to write.

    Returns:
        ``path``, or ``None`` without results.
    """
    radii = data.radii
    if not radii:
        return None
    colors = _colors(data.model_names)
    fig, ax = plt.subplots(figsize=(6.6, 4.6))
    total = 0
    for name in data.model_names:
        m, b, capped = zip(*(_group_medians(data, name, r) for r in radii), strict=True)
        ax.plot(radii, m, "-o", ms=4, color=colors[name], label=f"{name}: numerical")
        ax.plot(radii, b, "--", marker="s", ms=3, mfc="none", color=colors[name], label=f"{name}: bound")
        _ring_capped(ax, radii, b, capped)
        total += sum(capped)
    ax.set_xlabel("r (radius of the reconstruction ball)")
    ax.set_ylabel("median margin over points (bound capped to the box)")
    ax.set_title(
        "Margins against r: a single r can mislead about which model is more robust\n"
        f"bounds capped to the box: {total} items (black hexagons)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _tightness_panel(ax, items, colors, key: str, other: str) -> None:
    """Scatter ``key`` against ``other`` per model on log axes, with y = x."""
    values = np.array([[i[other], i[key]] for i in items], float)
    positive = values[(values > 0).all(1)]
    for name in dict.fromkeys(i["model"] for i in items):
        sub = np.array([[i[other], i[key]] for i in items if i["model"] == name and i[other] > 0 and i[key] > 0])
        if sub.size:
            ax.scatter(sub[:, 0], sub[:, 1], s=12, alpha=0.7, color=colors[name], edgecolors="none", label=name)
    if positive.size:
        lo, hi = positive.min() * 0.8, positive.max() * 1.25
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
    below = int(sum(i[key] <= i[other] * (1 + 1e-9) for i in items))
    ratio = np.median([i[key] / i[other] for i in items if i[other] > 0]) if items else math.nan
    ax.set_title(f"{key} ≤ {other} on {below} of {len(items)}; median {key}/{other} = {ratio:.3g}", fontsize=9)
    ax.set_xlabel(other)
    ax.set_ylabel(key)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


@figure(
    "tightness.png",
    "Tightness: sound certificate ≤ first-order bound ≤ numerical margin",
    "Per comparable item with a certificate: the sound certified radius (vaefast.certify, local Lipschitz constants "
    "where the encoder is an MLP, else global), the first-order bound and the numerical margin, against each "
    "other; the certificate holds for every δ in the ball with the sweep's confidence, the bound only to first order.",
)
def plot_tightness(data: SweepData, path: Path) -> Path | None:
    """Certified radius vs bound and vs margin, and bound vs margin, per model (log axes)."""
    items = tightness_items(data)
    if not items:
        return None
    colors = _colors(data.model_names)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, (key, other) in zip(axes, (("cert", "bound"), ("cert", "margin"), ("bound", "margin")), strict=True):
        _tightness_panel(ax, items, colors, key, other)
    fig.suptitle("Sound certificate ≤ first-order bound ≤ numerical margin?", fontsize=11)
    return _save(fig, path)


def make_all(data: SweepData, out: str | Path, models: ModelsArg | None = None) -> list[tuple[Figure, Path | None]]:
    """Draw every figure of :data:`FIGURES` the data supports.

    Args:
        data: the sweep.
        out: the output folder (created).
        models: ``{name: nn.Module or run folder}`` for the figures that recompute from the models (default: the
            run folders the database names; models swept from memory have none).

    Returns:
        Per figure, in report order, the figure and its path (``None`` when it was not drawn).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    drawn = []
    for fig in FIGURES.values():
        path = fig.draw(data, out / fig.file, models=models) if fig.uses_models else fig.draw(data, out / fig.file)
        drawn.append((fig, path))
    return drawn
