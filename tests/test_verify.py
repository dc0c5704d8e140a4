"""Evidence of a sweep: properties of every stored δ, one clean-point decision, and `verify` on a clean and on a
tampered database (library and command line)."""

from __future__ import annotations

import shutil
import sqlite3

import numpy as np
import pytest
import torch

from vaefast import __version__, store
from vaefast.cli import main
from vaefast.data import load
from vaefast.models import VAE, VAEConfig, save
from vaefast.sweep import run_sweep
from vaefast.training import train
from vaefast.verify import verify_sweep

torch.set_num_threads(1)

X = load("digits", "test").x[:6]
SWEEP = {"radii": [0.3, 0.6], "num_samples": 256, "batch_size": 3, "margin": {"tol": 0.03, "steps": 8}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = VAEConfig(
        input_shape=(1, 8, 8), hidden=(32,), latent_dim=3, likelihood="gaussian", gaussian_std=0.2, beta=1.0
    )
    run = tmp_path_factory.mktemp("run") / "m"
    model = VAE(cfg, seed=0)
    train(model, load("digits", "train").x, epochs=3, batch_size=64, lr=3e-3, progress=False)  # r* about 0.3
    save(model, run)
    return run


@pytest.fixture
def swept(run_dir, tmp_path):
    db = tmp_path / "r.db"
    run_sweep({"m": str(run_dir)}, X, db=db, progress=False, **SWEEP)
    return db


def _rows(db):
    conn = store.connect(db, create=False)
    try:
        return store.read_table(conn, "results", blobs=True)
    finally:
        conn.close()


def test_every_stored_delta_is_evidence(swept):
    rows = _rows(swept)
    assert any(r["certified"] for r in rows) and any(r["margin"] == 0 for r in rows)
    for row in rows:
        assert bool(row["certified"]) == (row["clean_decision"] == 1)  # one clean-point decision
        assert row["certified"] == (row["margin"] is not None and row["margin"] > 0)
        if row["certified"] and row["bracketed"]:
            delta = store.from_blob(row["delta"]).astype(np.float64)
            x = X[row["pos"]].flatten().double().numpy()
            assert np.linalg.norm(delta) == pytest.approx(row["margin_upper"], rel=1e-5)
            assert row["margin_lower"] <= row["margin"] <= row["margin_upper"]
            assert (x + delta).min() >= -1e-6 and (x + delta).max() <= 1 + 1e-6
            assert row["p_hat_adv"] <= 0.5 and row["hits_adv"] / row["num_samples_adv"] == row["p_hat_adv"]
            assert row["ci_low_adv"] <= row["p_hat_adv"] <= row["ci_high_adv"]
            assert row["adv_norm"] == pytest.approx(row["margin_upper"], rel=1e-5)
            assert row["rel_ll_degradation"] >= 0
        else:
            assert row["delta"] is None and row["p_hat_adv"] is None


def test_verify_confirms_a_clean_database(swept):
    rep = verify_sweep(swept, sample=None)
    assert rep.discrepancies == [] and rep.passed and rep.stored
    rows = _rows(swept)
    n_delta = sum(1 for r in rows if r["certified"] and r["bracketed"])
    n_clean = sum(1 for r in rows if r["certified"])
    assert rep.checked == n_delta + n_clean and n_delta > 0 and n_clean > 0
    assert rep.all_confirmed, rep.failed
    assert all(r["num_samples"] == 4 * SWEEP["num_samples"] for r in rep.rows)
    conn = store.connect(swept, create=False)
    stored = store.read_table(conn, "verifications")
    conn.close()
    assert len(stored) == rep.checked and all(r["confirmed"] == 1 for r in stored)
    # an independent stream: the replay's seeds differ from the sweep's
    assert {r["seed"] for r in rep.rows}.isdisjoint({r["seed"] for r in rows})
    assert verify_sweep(swept, sample=2).checked <= 4
    # family-wise: each interval at 1 - (1 - confidence) / N, so the level holds for all N claims together
    assert rep.claim_confidence == pytest.approx(1 - 0.01 / rep.checked)
    assert all(r["confidence"] == pytest.approx(rep.claim_confidence) for r in rep.rows)
    each = verify_sweep(swept, familywise=False, recompute=False)
    assert each.claim_confidence == 0.99 and all(r["confidence"] == 0.99 for r in each.rows)
    wider = {r["item_id"] + r["kind"]: r["ci_high"] - r["ci_low"] for r in rep.rows}
    assert all(wider[r["item_id"] + r["kind"]] >= r["ci_high"] - r["ci_low"] for r in each.rows)


def _robust_victim(db):
    """An evidence row whose clean point is clearly r-robust (p_hat >= 0.8)."""
    rows = [r for r in _rows(db) if r["delta"] is not None]
    victim = max(rows, key=lambda r: (r["p_hat"], r["item_id"]))
    assert victim["p_hat"] >= 0.8
    return victim


def _tamper(db, item_id, blob):
    conn = sqlite3.connect(db)
    conn.execute("UPDATE results SET delta = ? WHERE item_id = ?", (blob, item_id))
    conn.commit()
    conn.close()


def test_verify_catches_a_zeroed_delta(swept, capsys):
    victim = _robust_victim(swept)
    _tamper(swept, victim["item_id"], store.to_blob(np.zeros(64, np.float32)))
    rep = verify_sweep(swept)
    failed = {(r["item_id"], r["kind"]) for r in rep.failed}
    assert failed == {(victim["item_id"], "delta")}  # x + 0 is r-robust: the replay refutes the claim
    (reason,) = [r["reason"] for r in rep.failed]
    assert reason.startswith("fresh interval")
    assert {d.item_id for d in rep.discrepancies} == {victim["item_id"]}
    assert any("!= margin_upper" in d.reason for d in rep.discrepancies)
    assert not rep.passed
    assert main(["verify", str(swept), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"FAILED {victim['item_id']} [delta]" in out and "claims confirmed" in out
    assert f"DISCREPANCY {victim['item_id']} [evidence]" in out


def test_verify_catches_a_consistent_delta_that_does_not_break(swept):
    """δ and margin shrunk together (the exact checks pass): only the fresh estimate can tell that x + δ is still
    r-robust."""
    victim = _robust_victim(swept)
    small = store.from_blob(victim["delta"]) * 0.05  # toward x: stays in the box
    conn = sqlite3.connect(swept)
    conn.execute(
        "UPDATE results SET delta = ?, margin_upper = ?, adv_norm = ? WHERE item_id = ?",
        (store.to_blob(small), 0.05 * victim["margin_upper"], 0.05 * victim["margin_upper"], victim["item_id"]),
    )
    conn.commit()
    conn.close()
    rep = verify_sweep(swept)
    assert [(r["item_id"], r["kind"]) for r in rep.failed] == [(victim["item_id"], "delta")]
    assert rep.failed[0]["reason"].startswith("fresh interval") and rep.failed[0]["ci_low"] > 0.5


def test_verify_cli_all_confirmed_and_usage_errors(swept, capsys, tmp_path):
    assert main(["verify", str(swept), "--no-progress", "--sample", "3"]) == 0
    out = capsys.readouterr().out
    assert "claims confirmed" in out and "written by" not in out
    conn = store.connect(swept, create=False)
    store.set_meta(conn, {"vaefast_version": "0.2.0"})
    conn.close()
    assert main(["verify", str(swept), "--no-progress", "--sample", "3"]) == 0
    assert (
        capsys.readouterr().out.splitlines()[0]
        == f"{swept} was written by vaefast 0.2.0; this is vaefast {__version__}"
    )
    assert main(["verify", str(tmp_path / "missing.db")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["verify", str(swept), "--factor", "0"]) == 2
    assert "factor" in capsys.readouterr().err


def test_verify_refuses_other_weights(swept, tmp_path):
    other = tmp_path / "other"
    cfg = VAEConfig(
        input_shape=(1, 8, 8), hidden=(32,), latent_dim=3, likelihood="gaussian", gaussian_std=0.2, beta=1.0
    )
    save(VAE(cfg, seed=1), other)
    with pytest.raises(ValueError, match="weights differ"):
        verify_sweep(swept, models={"m": str(other)})
    with pytest.raises(ValueError, match="not in the database"):
        verify_sweep(swept, models={"zz": str(other)})


# --- the report recomputes the reconstructions the database no longer stores ------------------------------------


def _set_source(db, source):
    conn = sqlite3.connect(db)
    conn.execute("UPDATE models SET source = ?", (source,))
    conn.commit()
    conn.close()


def test_reconstructions_are_recomputed_from_the_models(swept, run_dir, tmp_path):
    """The results rows hold δ only; the examples figure recomputes g(μ(x)) and g(μ(x + δ)) from the stored run
    folder (weights checked), or from ``models=`` for a model swept from memory, and says when it cannot."""
    from vaefast import analysis, plots
    from vaefast.models import load as load_model

    data = analysis.load(swept)
    rows = [r for r in data.results if r["delta"] is not None]
    assert rows and "recon_clean" not in rows[0] and "recon_adv" not in rows[0]
    recon, unavailable = plots.example_reconstructions(data, rows)
    assert unavailable == {} and set(recon) == {r["item_id"] for r in rows}
    model = load_model(run_dir)
    for row in rows:
        x = X[row["pos"]][None]
        delta = torch.from_numpy(store.from_blob(row["delta"], X.shape[1:]).copy())[None]
        with torch.no_grad():
            clean, adv = (model.decode(model.encode(v)[0]).flatten().numpy() for v in (x, x + delta))
        np.testing.assert_allclose(recon[row["item_id"]][0], clean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(recon[row["item_id"]][1], adv, rtol=1e-6, atol=1e-7)
    assert plots.plot_examples(data, tmp_path / "ex.png") is not None

    _set_source(swept, "<memory>")  # as if swept from memory: no run folder to load
    data = analysis.load(swept)
    recon, unavailable = plots.example_reconstructions(data, rows)
    assert recon == {} and "swept from memory" in unavailable["m"]
    assert plots.plot_examples(data, tmp_path / "ex2.png") is not None  # drawn, the panels say why they are empty
    recon, unavailable = plots.example_reconstructions(data, rows, models={"m": str(run_dir)})
    assert unavailable == {} and len(recon) == len(rows)
    other = tmp_path / "other"
    save(VAE(model.config, seed=1), other)
    assert "weights differ" in plots.example_reconstructions(data, rows, models={"m": str(other)})[1]["m"]
    with pytest.raises(ValueError, match="not in the sweep"):
        plots.example_reconstructions(data, rows, models={"zz": str(run_dir)})


# --- every tampered column is caught (issue 21) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(run_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("pristine") / "r.db"
    run_sweep({"m": str(run_dir)}, X, db=db, progress=False, attack_eps=[0.2], **SWEEP)
    assert verify_sweep(db).passed
    return db


def _sql(db, query, *args):
    conn = sqlite3.connect(db)
    conn.execute(query, args)
    conn.commit()
    conn.close()


def _tampers(victim, point):
    """``name -> (SQL, parameters)`` over the victim row (an evidence row of a clearly robust point)."""
    from vaefast.stats import clopper_pearson, clopper_pearson_one_sided

    vid, delta = victim["item_id"], store.from_blob(victim["delta"])
    h, n = victim["hits"] - 1, victim["num_samples"]
    low, high = (float(v) for v in clopper_pearson(h, n, 0.95))
    p_low = float(clopper_pearson_one_sided(h, n, 0.05)[0])
    row = "UPDATE results SET {} WHERE item_id = ?"
    return {
        # the six the issue lists as missed
        "clean hits contradicting certified": (row.format("hits = 20"), vid),
        "num_samples": (row.format("num_samples = num_samples + 1"), vid),
        "clean p_hat": (row.format("p_hat = p_hat - 0.01"), vid),
        "bound x 10": (row.format("bound = bound * 10"), vid),
        "deleted row": ("DELETE FROM results WHERE item_id = ?", vid),
        "delta and margin doubled": (row.format("delta = ?, margin = margin * 2"), store.to_blob(2 * delta), vid),
        # and every other column a tamperer could change, alone or consistently
        "delta, margin and its radii doubled": (
            row.format("delta = ?, margin = margin * 2, margin_upper = margin_upper * 2, adv_norm = adv_norm * 2"),
            store.to_blob(2 * delta),
            vid,
        ),  # fmt: skip
        "delta scaled": (row.format("delta = ?"), store.to_blob(1.5 * delta), vid),
        "delta reversed": (row.format("delta = ?"), store.to_blob(-delta), vid),
        "margin inside its bracket": (row.format("margin = (margin + margin_lower) / 2"), vid),
        "margin_lower raised": (row.format("margin_lower = margin"), vid),
        "evidence counts": (row.format("hits_adv = hits_adv - 1, p_hat_adv = (hits_adv - 1.0) / num_samples_adv"), vid),
        "certified flipped": (row.format("certified = 0"), vid),
        "clean decision": (row.format("clean_decision = 0"), vid),
        "ci_high": (row.format("ci_high = ci_high + 0.001"), vid),
        "point changed": ("UPDATE points SET x = ? WHERE pos = ?", store.to_blob(0.9 * point), victim["pos"]),
        "jacobian and bounds together": (
            row.format(
                "jac_frobenius = jac_frobenius * 10, bound = bound / 10, certified_bound = certified_bound / 10"
            ),
            vid,
        ),  # fmt: skip
        "sigma_min and bounds together": (
            row.format(
                "sigma_min = sigma_min * 1.01, bound = bound * 1.01, certified_bound = certified_bound * 1.01, "
                "spectral_bound = spectral_bound * 1.01, latent_margin = latent_margin * 1.01"
            ),
            vid,
        ),  # fmt: skip
        "one hit less, every count column consistent": (
            row.format("hits = ?, p_hat = ?, ci_low = ?, ci_high = ?, p_low = ?"),
            h,
            h / n,
            low,
            high,
            p_low,
            vid,
        ),  # fmt: skip
        "global certificate": (row.format("cert_global = cert_global * 1.01"), vid),
        "local certificate": (row.format("cert_local = cert_local * 1.01"), vid),
        "certificate erased with a reason": (row.format("cert_local = NULL, cert_reason = 'local: refused'"), vid),
        "r_star": (row.format("r_star = r_star * 1.01"), vid),
        "max_radius": (row.format("max_radius = max_radius * 1.01"), vid),
        "likelihoods": (row.format("ll_clean = ll_clean + 1, ll_drop = ll_drop + 1"), vid),
        "seed": (row.format("seed = seed + 1"), vid),
        "deleted unit": ("DELETE FROM units WHERE unit_id = ?", victim["unit_id"]),
        "deleted curve": ("DELETE FROM curves WHERE item_id = (SELECT MIN(item_id) FROM curves)",),
        "spec": (
            "UPDATE meta SET value = replace(value, '\"num_samples\": 256', '\"num_samples\": 257') WHERE key = 'spec'",
        ),  # fmt: skip
    }


TAMPERS = list(_tampers({"item_id": "", "delta": store.to_blob(np.zeros(1, np.float32)), "hits": 2,
                         "num_samples": 4, "pos": 0, "unit_id": ""}, np.zeros(1)))  # fmt: skip


@pytest.mark.parametrize("tamper", TAMPERS)
def test_verify_catches_every_tampered_column(pristine, tmp_path, tamper):
    db = tmp_path / "r.db"
    shutil.copy(pristine, db)
    victim = _robust_victim(db)
    conn = store.connect(db, readonly=True)
    point = store.from_blob(conn.execute("SELECT x FROM points WHERE pos = ?", (victim["pos"],)).fetchone()[0])
    conn.close()
    query, *args = _tampers(victim, point)[tamper]
    _sql(db, query, *args)
    rep = verify_sweep(db)
    assert not rep.passed and rep.discrepancies, tamper
    ids = {d.item_id for d in rep.discrepancies}
    assert ids & {victim["item_id"], victim["unit_id"], "meta"} or tamper == "deleted curve", rep.discrepancies


class _WideEncoder(torch.nn.Module):
    """160 latents (above the exact-Jacobian threshold) behind submodule names the fused op does not read."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.Tanh())
        self.fc_mu, self.fc_var = torch.nn.Linear(64, 160), torch.nn.Linear(64, 160)

    def forward(self, x):
        h = self.body(x)
        return self.fc_mu(h), self.fc_var(h) - 4


def test_verify_rederives_randomized_jacobian_norms(tmp_path):
    """A sweep whose bounds use randomized Jacobian norms (keyed by the unit's seed and each point's id) verifies
    clean; an upper limit of ||J||_F raised together with the certified bound it divides is caught from the model."""
    from vaefast import as_vae
    from vaefast.core.options import MarginOptions
    from vaefast.sweep import PointSet

    torch.manual_seed(0)
    decoder = torch.nn.Sequential(torch.nn.Linear(160, 64), torch.nn.Sigmoid(), torch.nn.Unflatten(1, (1, 8, 8)))
    model = as_vae(_WideEncoder(), decoder, likelihood="gaussian", decoder_output="mean", input_shape=(1, 8, 8))
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    db = tmp_path / "r.db"
    run_sweep({"m": model}, PointSet(x), [0.6], db, num_samples=200, batch_size=4,
              margin=MarginOptions(tol=0.05, steps=5))  # fmt: skip
    rows = _rows(db)
    assert {r["jac_method"] for r in rows} == {"randomized"} and any(r["certified"] for r in rows)
    rep = verify_sweep(db, models={"m": model})
    assert rep.passed, rep.discrepancies
    victim = next(r for r in rows if r["certified"])
    _sql(db, "UPDATE results SET jac_frobenius_upper = jac_frobenius_upper * 1.01, "
         "certified_bound = certified_bound / 1.01 WHERE item_id = ?", victim["item_id"])  # fmt: skip
    found = verify_sweep(db, models={"m": model}, recompute=False).discrepancies
    assert [d.item_id for d in found] == [victim["item_id"]] and "jac_frobenius_upper" in found[0].reason
