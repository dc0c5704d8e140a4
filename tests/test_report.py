"""Report and figures on a small synthetic sweep (rows written with the store's schema, no sweep run).

The synthetic sweep has 4 models (three Bernoulli β-VAEs and a Gaussian β-TCVAE) × 6 points × 2 radii; at every
(model, r) point 0 is not robust at δ = 0, point 1 unbracketed, point 2 has a bound larger than the box, points 2-5 are
comparable and carry evidence (the δ that broke r-robustness, p̂ ≤ 1/2 there); certified items carry a global sound
certificate (and a local one for every other model).
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
from scipy import stats

import vaefast
from vaefast import analysis, plots, report, store

SHAPE = (1, 4, 4)
RADII = (0.5, 1.0)
N_POINTS = 6
MODELS = {  # name: (beta, objective, likelihood)
    "b1": (1.0, "beta_vae", "bernoulli"),
    "b4": (4.0, "beta_vae", "bernoulli"),
    "b8": (8.0, "beta_vae", "bernoulli"),
    "tc2": (2.0, "beta_tcvae", "gaussian"),
}
N_GROUPS = len(MODELS) * len(RADII)
UNIT = "{}|pos=0:" + str(N_POINTS)  # one unit per model holds every radius


def _points(shape: tuple[int, ...] = SHAPE) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {"pos": p, "dataset": "synthetic", "split": "test", "idx": p, "label": p % 3,
         "x": store.to_blob(rng.uniform(0, 1, shape))}
        for p in range(N_POINTS)
    ]  # fmt: skip


def _evidence(rng, x: np.ndarray, margin: float, gaussian: bool, pos: int) -> dict:
    """Evidence columns of a row whose search broke r-robustness at ``margin``."""
    delta = rng.normal(size=x.shape)
    delta *= margin / np.linalg.norm(delta)
    ll_clean = -1.5 if gaussian else -50.0
    drop = (-0.3, 0.0, 0.2, 10.0)[pos - 2] if gaussian else 2.0 * pos  # a Gaussian drop can be <= 0
    ll_adv = ll_clean - drop
    return {
        "adv_norm": margin, "p_hat_adv": 0.4, "ci_low_adv": 0.35, "ci_high_adv": 0.45, "hits_adv": 400,
        "num_samples_adv": 1000, "ll_clean": ll_clean, "ll_adv": ll_adv, "ll_drop": drop,
        "rel_ll_degradation": abs(ll_adv - ll_clean) / abs(ll_clean), "delta": store.to_blob(delta),
        "recon_clean": store.to_blob(np.clip(x + 0.1, 0, 1)), "recon_adv": store.to_blob(np.clip(x + delta, 0, 1)),
    }  # fmt: skip


def _result(name: str, mi: int, r: float, point: dict, rng) -> dict:
    """One results row; its kind depends on the point's position (see the module docstring)."""
    pos = point["pos"]
    x = store.from_blob(point["x"])
    box = float(np.linalg.norm(np.maximum(x, 1 - x)))  # distance to the farthest corner of [0, 1]^D
    certified = pos != 0
    bound = 0.0 if not certified else (2.0 * box if pos == 2 else 0.05 * (pos + 1) * (mi + 1) * r)
    margin = {0: 0.0, 1: 5.0, 2: 0.9 * box}.get(pos, 2.0 * bound + 0.01 * pos)
    row = {
        "item_id": f"{name}|r={r!r}|pos={pos}", "unit_id": UNIT.format(name), "model": name, "pos": pos, "r": r,
        "seed": 7, "p_hat": 0.9 if certified else 0.3, "ci_low": 0.85 if certified else 0.25,
        "ci_high": 0.94 if certified else 0.35, "hits": 900 if certified else 300, "num_samples": 1000,
        "robust": int(certified), "r_star": 0.4 * r, "bound": bound, "certified_bound": 0.8 * bound,
        "spectral_bound": 1.1 * bound, "whitened_bound": 1.5 * bound, "latent_margin": 0.3,
        "sigma_min": 0.1 * (mi + 1), "jac_frobenius": 3.0 / (mi + 1), "jac_spectral": 1.0, "certified": int(certified),
        "max_radius": box, "margin": margin, "margin_lower": max(margin - 0.01, 0.0), "bracketed": int(pos != 1),
        "margin_upper": None if pos == 1 else margin + 0.01 * (pos > 0), "clean_decision": 1 if certified else -1,
        "p_low": 0.86 if certified else 0.26, "jac_whitened_spectral": 2.0, "cert_reason": None,
        "jac_frobenius_upper": 3.0 / (mi + 1), "jac_method": "fused", "jac_confidence": 1.0,
        "margin_evals": 12, "cert_global": 0.3 * bound if certified else None,
        "cert_local": 0.6 * bound if certified and mi % 2 == 0 else None,
    }  # fmt: skip
    evidence = _evidence(rng, x, row["margin_upper"] or 0.0, MODELS[name][2] == "gaussian", pos)
    # like the store: the evidence columns are NULL unless margin > 0 and bracketed
    row.update(evidence if certified and pos != 1 else dict.fromkeys(evidence))
    return row


def _curves(name: str, r: float, pos: int, gaussian: bool) -> list[dict]:
    return [
        {"item_id": f"{name}|r={r!r}|eps={e!r}|pos={pos}", "unit_id": UNIT.format(name), "model": name, "pos": pos,
         "r": r, "eps": e, "p_hat": 0.9 - e, "ci_low": 0.8 - e, "ci_high": 0.95 - e, "adv_norm": e,
         "ll_drop": (pos - 2) * e, "rel_ll_degradation": (pos * e / 1.5) if gaussian else pos * e / 50}
        for e in (0.1, 0.4)
    ]  # fmt: skip


VERIFICATIONS = [  # for b1 at r = 1.0: two deltas confirmed, one delta not, one clean point confirmed
    {"item_id": "b1|r=1.0|pos=2", "kind": "delta", "p_hat": 0.41, "confirmed": 1},
    {"item_id": "b1|r=1.0|pos=3", "kind": "delta", "p_hat": 0.39, "confirmed": 1},
    {"item_id": "b1|r=1.0|pos=4", "kind": "delta", "p_hat": 0.56, "confirmed": 0, "reason": "p_hat above 1/2"},
    {"item_id": "b1|r=1.0|pos=3", "kind": "clean", "p_hat": 0.9, "confirmed": 1},
]


def _verification_row(v: dict) -> dict:
    p = v["p_hat"]
    return {"ci_low": p - 0.03, "ci_high": p + 0.03, "hits": int(p * 1000), "num_samples": 1000, "seed": 99,
            "confidence": 0.95, "reason": None, "checked_at": "2024-01-01", **v}  # fmt: skip


def _model_rows(shape: tuple[int, ...] = SHAPE) -> list[dict]:
    return [
        {"name": n, "source": "<memory>", "config": json.dumps({"hidden": [16]}), "beta": b, "objective": o,
         "latent_dim": 2, "input_shape": json.dumps(list(shape)), "likelihood": lik, "weights_sha256": "0"}
        for n, (b, o, lik) in MODELS.items()
    ]  # fmt: skip


def _tables(verifications: bool = True, shape: tuple[int, ...] = SHAPE) -> dict[str, list[dict]]:
    """Every table of the synthetic sweep as rows (points of ``shape``)."""
    rng = np.random.default_rng(1)
    points = _points(shape)
    results, curves, units = [], [], []
    for mi, name in enumerate(MODELS):
        for r in RADII:
            if r == RADII[0]:
                units.append({"unit_id": f"{name}|pos=0:{N_POINTS}", "model": name, "first_pos": 0,
                              "n_points": N_POINTS, "rank": 0, "world_size": 1, "seconds_total": 1.2,
                              "finished_at": "2024-01-01"})  # fmt: skip
            for p in points:
                results.append(_result(name, mi, r, p, rng))
                curves.extend(_curves(name, r, p["pos"], MODELS[name][2] == "gaussian"))
    ver = [_verification_row(v) for v in VERIFICATIONS] if verifications else []
    return {"models": _model_rows(shape), "points": points, "results": results, "curves": curves, "units": units,
            "verifications": ver}  # fmt: skip


def sweep_data(verifications: bool = True, shape: tuple[int, ...] = SHAPE) -> analysis.SweepData:
    """The synthetic sweep as :class:`analysis.SweepData`, the way :func:`analysis.load` returns it."""
    t = _tables(verifications, shape)
    models = {}
    for m in t["models"]:
        models[m["name"]] = {**m, "config": json.loads(m["config"]), "input_shape": tuple(json.loads(m["input_shape"]))}
    spec = json.dumps({"num_samples": 1000, "confidence": 0.95, "seed": 0})
    return analysis.SweepData(t["results"], t["curves"], models, t["points"], t["units"], {"spec": spec},
                              t["verifications"])  # fmt: skip


def _insert(conn: sqlite3.Connection, table: str, rows: list[dict]) -> None:
    cols = [c[1] for c in conn.execute(f"PRAGMA table_info({table})")]
    for row in rows:
        keys = [k for k in row if k in cols]
        sql = f"INSERT INTO {table} ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})"
        conn.execute(sql, [row[k] for k in keys])


@pytest.fixture
def db(tmp_path):
    """The synthetic sweep written into a results database with the store's schema."""
    path = tmp_path / "results.db"
    conn = store.connect(path)
    store.set_meta(conn, {"spec": json.dumps({"num_samples": 1000, "confidence": 0.95, "seed": 0})})
    with store.transaction(conn):
        for table, rows in _tables().items():
            _insert(conn, table, rows)
    conn.close()
    return path


def _capture(monkeypatch) -> dict:
    """Make ``plots._save`` record each figure's axes texts (ylabel, xlabels, titles) before writing it."""
    seen = {}
    save = plots._save

    def capture(fig, path):
        seen[path.name] = [
            {"ylabel": ax.get_ylabel(), "xlabel": ax.get_xlabel(), "title": ax.get_title(), "yscale": ax.get_yscale()}
            for ax in fig.axes
        ]
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    return seen


# ----------------------------------------------------------------------------------------------------------
# counts and statistics


def test_headline_counts():
    h = analysis.headline(sweep_data())
    assert h["n_items"] == h["items"] == N_GROUPS * N_POINTS
    assert (h["n_not_robust"], h["n_unbracketed"], h["n_comparable"]) == (N_GROUPS, N_GROUPS, 4 * N_GROUPS)
    assert h["bound_exceeds_box"] == N_GROUPS  # point 2 of every (model, r)
    assert h["bound_exceeds_box_by_variant"]["certified_bound"] == N_GROUPS  # 1.6 box > box
    assert h["clean_point_disagreements"] == 0
    assert h["n_evidence"] == 4 * N_GROUPS and h["n_evidence_not_breaking"] == 0
    v = h["verification"]
    assert (v["checked"], v["confirmed"]) == (4, 3)
    assert v["by_kind"]["delta"] == {"checked": 3, "confirmed": 2, "available": 4 * N_GROUPS}
    assert v["by_kind"]["clean"] == {"checked": 1, "confirmed": 1, "available": 5 * N_GROUPS}
    assert [f["item_id"] for f in v["failed"]] == ["b1|r=1.0|pos=4"]
    text = report.format_headline(h)
    assert f"{N_GROUPS} not robust" in text and f"{N_GROUPS} unbracketed" in text
    assert f"{4 * N_GROUPS} comparable" in text and f"over the {4 * N_GROUPS} comparable items" in text
    assert "clean-point decision disagreements (certified but margin 0): 0" in text
    assert f"bound exceeds box: {N_GROUPS} items" in text
    assert "evidence re-verified: 3 of 4 confirmed" in text and "FAILED: 1" in text


def test_disagreements_are_counted_not_explained_away():
    data = sweep_data()
    row = next(r for r in data.results if r["pos"] == 3)
    row.update(margin=0.0, margin_lower=0.0)
    h = analysis.headline(data)
    assert h["clean_point_disagreements"] == 1
    assert h["n_comparable"] == 4 * N_GROUPS  # still comparable: it shows up as an invalid bound, not hidden
    assert "clean-point decision disagreements (certified but margin 0): 1" in report.format_headline(h)


def test_summary_rows_counts_and_capping():
    data = sweep_data()
    rows = analysis.summary_rows(data)
    assert len(rows) == N_GROUPS and set(analysis.SUMMARY_COLUMNS) <= set(rows[0])
    for s in rows:
        assert (s["n_items"], s["n_not_robust"], s["n_unbracketed"], s["n_comparable"]) == (6, 1, 1, 4)
        assert s["bound_exceeds_box"] == 1
        sub = [r for r in data.results if r["model"] == s["model"] and r["r"] == s["r"]]
        capped = [min(r["bound"], r["max_radius"]) for r in sub]
        assert s["bound"] == pytest.approx(float(np.median(capped)))
        drops = [r["ll_drop"] for r in sub if r.get("ll_drop") is not None]
        assert s["ll_drop_nats"] == pytest.approx(float(np.median(drops)))
        assert s["rel_ll_deg"] >= 0
    # the bound larger than the box is reported as max_radius, flagged, never above it
    big = next(r for r in data.results if r["pos"] == 2)
    assert analysis.exceeds_box(big) and analysis.capped_bound(big) == pytest.approx(big["max_radius"])
    assert all(analysis.capped_bound(r) <= r["max_radius"] + 1e-12 for r in data.results)
    # no box: no cap, no flag
    free = {**big, "max_radius": None}
    assert not analysis.exceeds_box(free) and analysis.capped_bound(free) == big["bound"]


def test_statistics_against_scipy():
    data = sweep_data()
    comp = [r for r in data.results if r["certified"] and r["bracketed"]]
    b = np.array([min(r["bound"], r["max_radius"]) for r in comp])
    m = np.array([r["margin"] for r in comp])
    h = analysis.headline(data)
    assert h["n_comparable"] == len(comp)
    assert h["validity"] == pytest.approx(float(np.mean(b <= m)))
    assert h["validity"] == pytest.approx(3 / 4)  # the capped bound at point 2 is the box > margin = 0.9 box
    assert h["pearson"] == pytest.approx(stats.pearsonr(b, m)[0])
    assert h["spearman"] == pytest.approx(stats.spearmanr(b, m)[0])


def test_not_reverified_without_rows():
    h = analysis.headline(sweep_data(verifications=False))
    assert h["verification"]["checked"] == 0
    assert "evidence not re-verified (run `vaefast verify DB`)" in report.format_headline(h)


# ----------------------------------------------------------------------------------------------------------
# figures


def test_degradation_plot_uses_nats_for_gaussian(tmp_path, monkeypatch):
    seen = _capture(monkeypatch)
    assert plots.plot_degradation_vs_margin(sweep_data(), tmp_path / "deg.png") is not None
    axes = seen["deg.png"]
    assert len(axes) == 4  # (relative: bernoulli models, nats: gaussian model) x (fixed budget, at the evidence)
    rel, nats = axes[:2], axes[2:]
    assert all("relative degradation" in a["ylabel"] and "nats" not in a["ylabel"] for a in rel)
    assert all("[nats]" in a["ylabel"] for a in nats)
    # the Gaussian drops include -0.3 and 0: shown on a symlog axis, none dropped
    assert nats[1]["yscale"] == "symlog" and "n = 8" in nats[1]["title"]
    # the evidence panel says how many items have no value, and why
    assert "2 not robust" in nats[1]["title"] and "2 unbracketed" in nats[1]["title"]
    assert f"{3 * 2} not robust" in rel[1]["title"]


def test_degradation_plot_relative_only_without_gaussian(tmp_path, monkeypatch):
    data = sweep_data()
    data.models = {n: i for n, i in data.models.items() if i["likelihood"] != "gaussian"}
    seen = _capture(monkeypatch)
    plots.plot_degradation_vs_margin(data, tmp_path / "deg.png")
    assert all("nats" not in a["ylabel"] for a in seen["deg.png"])


def test_examples_use_evidence_rows_only(tmp_path, monkeypatch):
    data = sweep_data()
    picked = plots._pick_examples(data)
    assert picked and all(r["delta"] is not None and r["p_hat_adv"] <= 0.5 for r in picked)
    assert {r["model"] for r in picked} == {"b1", "b8"}  # extreme β
    seen = _capture(monkeypatch)
    assert plots.plot_examples(data, tmp_path / "ex.png") is not None
    texts = [a["xlabel"] for a in seen["ex.png"]]
    assert sum("at x + δ: p̂ = 0.40 [0.35, 0.45], n = 1000" in t for t in texts) == len(picked)
    assert not any("robust" in t and "not r-robust" not in t for t in texts)
    assert sum(t.startswith("‖δ‖ = margin") for t in texts) == len(picked)
    titles = [a["title"] for a in seen["ex.png"]]
    for col in ("x", "δ (0 = white)", "x + δ", "g(μ(x))", "g(μ(x + δ))"):
        assert col in titles
    # without evidence there is no examples figure
    for r in data.results:
        r["delta"] = None
    assert plots.plot_examples(data, tmp_path / "none.png") is None


@pytest.mark.parametrize(
    ("shape", "drawn"),
    [((3, 64, 64), (64, 64, 3)), ((4, 8, 8), (8, 35)), ((1, 16, 16), (16, 16)), ((64,), (8, 8)), ((10,), (1, 10))],
)
def test_examples_draw_any_image_size_and_channel_count(tmp_path, shape, drawn):
    """RGB as colour, other channel counts side by side, square vectors as squares: every panel is a readable map."""
    data = sweep_data(shape=shape)
    assert plots.plot_examples(data, tmp_path / "ex.png") is not None
    x = store.from_blob(data.points[0]["x"]).reshape(-1)
    img, cmap = plots._image(x, shape)
    assert img.shape == drawn and (cmap is None) == (len(drawn) == 3)
    assert plots._signed_image(x, shape).shape == (drawn[:2] if len(drawn) == 3 else drawn)
    np.testing.assert_allclose(np.nansum(plots._image(x, shape)[0]), np.clip(x, 0, 1).sum())


def test_bound_plot_marks_capped(tmp_path, monkeypatch):
    seen = _capture(monkeypatch)
    plots.plot_bound_vs_margin(sweep_data(), tmp_path / "b.png")
    title = seen["b.png"][0]["title"]
    assert f"{4 * N_GROUPS} comparable items" in title
    assert f"{N_GROUPS} not robust, 0 undecided, {N_GROUPS} unbracketed" in title
    assert f"bound exceeds box: {N_GROUPS} items" in title


# ----------------------------------------------------------------------------------------------------------
# the page, from a database


def test_report_files(db, tmp_path):
    page = report.write_report(db, tmp_path / "rep")
    htm = page.read_text()
    for fname in plots.FIGURES:
        png = tmp_path / "rep" / fname
        assert png.exists(), fname
        blob = png.read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 10_000, fname
        assert f"src='{fname}'" in htm
    assert "<table>" in htm and "Pearson" in htm
    assert "evidence re-verified: 3 of 4 confirmed" in htm
    assert "b1|r=1.0|pos=4" in htm and "p_hat above 1/2" in htm  # the failed item is listed
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["headline"]["items"] == N_GROUPS * N_POINTS
    assert summary["headline"]["bound_exceeds_box"] == N_GROUPS


def test_load_matches_rows(db):
    data = analysis.load(db)
    ref = sweep_data()
    assert len(data.results) == len(ref.results) and len(data.verifications) == 4
    assert analysis.headline(data)["n_comparable"] == analysis.headline(ref)["n_comparable"]
    by_id = {r["item_id"]: r for r in data.results}
    for r in ref.results:
        assert by_id[r["item_id"]]["max_radius"] == pytest.approx(r["max_radius"])


def test_no_verifications_table(db, tmp_path):
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE verifications")
    conn.commit()
    conn.close()
    data = analysis.load(db)
    assert data.verifications == []
    page = report.write_report(db, tmp_path / "rep")
    assert "evidence not re-verified (run `vaefast verify DB`)" in page.read_text()


def test_older_schema_is_refused_with_a_clear_error(db):
    """A database written by an older vaefast (schema 1, no evidence columns) is refused, not half-read."""
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="results schema 1, this vaefast reads schema"):
        analysis.load(db)


def test_cli_report(db, tmp_path, capsys):
    from vaefast.cli import main

    conn = store.connect(db, create=False)
    store.set_meta(conn, {"vaefast_version": "0.1.0"})  # written by another version: one line says so
    conn.close()
    assert main(["report", str(db), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "bound validity" in out and "bound exceeds box" in out and str(tmp_path / "rep" / "index.html") in out
    assert out.splitlines()[0] == f"{db} was written by vaefast 0.1.0; this is vaefast {vaefast.__version__}"


# ----------------------------------------------------------------------------------------------------------
# the published correlations beside the measured one


@pytest.mark.parametrize(("dataset", "published"), [("mnist", 0.840), ("fashion-mnist", 0.831), ("cifar10", 0.879)])
def test_published_correlation_beside_the_measured(dataset, published, db, tmp_path):
    data = sweep_data()
    for p in data.points:
        p["dataset"] = dataset
    h = analysis.headline(data)
    assert h["dataset"] == dataset and h["published_pearson"] == published
    line = report.format_published(h)
    assert line == (
        f"bound vs numerical margin on {dataset}: measured Pearson r = {h['pearson']:.3f} (pooled over "
        f"{4 * N_GROUPS} comparable items); published Pearson r = {published:.3f} (Camuto et al., AISTATS 2021)"
    )
    assert line in report.format_headline(h).splitlines()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE points SET dataset = ?", (dataset,))
    conn.commit()
    conn.close()
    htm = report.write_report(db, tmp_path / "rep").read_text()
    assert "Against the paper" in htm and f"published Pearson r = {published:.3f}" in htm
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["headline"]["published_pearson"] == published


def test_no_published_correlation_for_other_datasets(db, tmp_path):
    h = analysis.headline(sweep_data())
    assert h["dataset"] == "synthetic" and h["published_pearson"] is None
    assert report.format_published(h) == "" and "published" not in report.format_headline(h)
    assert "Against the paper" not in report.write_report(db, tmp_path / "rep").read_text()
    data = sweep_data()
    data.points[0]["dataset"] = "mnist"  # a mix of datasets has no single published value
    assert analysis.headline(data)["dataset"] is None and analysis.headline(data)["published_pearson"] is None
    assert "measured Pearson r = n/a (fewer than 3 comparable items, or constant)" in report.format_published(
        {**h, "dataset": "mnist", "published_pearson": 0.84, "pearson": float("nan")}
    )


def test_published_pearson_names():
    assert analysis.published_pearson("MNIST") == 0.840
    assert analysis.published_pearson("fashion_mnist") == analysis.published_pearson("FashionMNIST") == 0.831
    assert analysis.published_pearson("CIFAR-10") == 0.879
    assert analysis.published_pearson("digits") is None and analysis.published_pearson(None) is None
