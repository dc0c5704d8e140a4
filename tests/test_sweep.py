"""Sweeps: enumeration, sharding, identity-derived seeds, closed-form values, devices, kill -9 + resume, torchrun
equality (several machines without a shared filesystem: tests/test_distributed.py)."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import count_units
from scipy import stats

from vaefast import schema, store
from vaefast.sweep import (
    PointSet,
    SweepSpec,
    WorkUnit,
    auto_radii,
    compute_unit,
    derive_seed,
    enumerate_units,
    item_id,
    run_sweep,
    shard,
)
from vaefast.testing import LinearGaussianVAE

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# --- enumeration and sharding -----------------------------------------------------------------------------


def test_enumeration_is_deterministic_and_complete():
    units = enumerate_units(["a", "b"], 10, 4)
    assert len(units) == 2 * 3
    assert units == enumerate_units(["a", "b"], 10, 4)
    assert [u.n_points for u in units[:3]] == [4, 4, 2]
    ids = [u.unit_id for u in units]
    assert len(set(ids)) == len(ids)
    items = [item_id(u.model, r, p) for u in units for p in u.positions for r in (0.5, 1.0)]
    assert len(items) == len(set(items)) == 2 * 10 * 2
    assert units[0] == WorkUnit("a", 0, 4) and units[0].unit_id == "a|pos=0:4"


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharding_covers_every_unit_exactly_once(world):
    units = enumerate_units(["a", "b", "c"], 7, 2)
    shards = [shard(units, rank, world) for rank in range(world)]
    flat = [u.unit_id for s in shards for u in s]
    assert sorted(flat) == sorted(u.unit_id for u in units)  # no padding, no duplicates, nothing missing
    for rank, s in enumerate(shards):
        assert s == [u for i, u in enumerate(units) if i % world == rank]
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank"):
        shard([], 2, 2)
    with pytest.raises(ValueError, match="unique"):
        enumerate_units(["a", "a"], 3, 2)
    with pytest.raises(ValueError, match="radii"):
        SweepSpec(radii=[1.0, -1.0])
    with pytest.raises(ValueError, match="radii"):
        SweepSpec(radii=[1.0, 1.0])
    with pytest.raises(ValueError, match="curve_radii"):
        SweepSpec(radii=[1.0], attack_eps=[0.1], curve_radii=[2.0])
    with pytest.raises(TypeError, match="num_samples"):
        SweepSpec(radii=[1.0], num_samples=1.5)
    with pytest.raises(TypeError, match="margin"):
        SweepSpec(radii=[1.0], margin=3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        SweepSpec(radii=[1.0], margin_tol=0.1)
    spec = SweepSpec(radii=[1.0, 2.0], margin={"tol": 0.05}, num_samples=300)
    assert spec.margin.tol == 0.05 and spec.margin.num_samples == 300  # the sweep's samples run the search
    assert SweepSpec.from_json(spec.to_json()) == spec


def test_weights_digest_covers_scalar_buffers():
    """A Lipschitz-constrained model holds 0-dim buffers (its ``Scale`` factors): they are hashed like any tensor."""
    from vaefast.models import VAE, VAEConfig
    from vaefast.sweep.inputs import weights_digest

    cfg = VAEConfig(hidden=(16,), latent_dim=2, lipschitz={"mu": 2.0, "logvar": 2.0})
    a, b = VAE(cfg, seed=0), VAE(cfg, seed=0)
    assert weights_digest(a) == weights_digest(b)
    b.encoder.mu[1].factor.fill_(3.0)
    assert weights_digest(a) != weights_digest(b)


def test_seeds_depend_on_identity_only():
    s = derive_seed(0, "mc", "a", repr(0.5))
    assert s == derive_seed(0, "mc", "a", repr(0.5))
    assert 0 <= s < 2**63
    others = {derive_seed(0, "mc", "b", repr(0.5)), derive_seed(1, "mc", "a", repr(0.5)),
              derive_seed(0, "mc", "a", repr(0.25)), derive_seed(0, "margin", "a", repr(0.5))}  # fmt: skip
    assert s not in others and len(others) == 4


# --- a real tiny sweep on the linear-Gaussian VAE (closed forms) -------------------------------------------

LG_KW = {"input_dim": 12, "latent_dim": 3, "sigma": 0.3, "decoder_scale": 1.5}
SWEEP_KW = {
    "radii": [0.8, 1.4],
    "attack_eps": [0.05, 0.2],
    "curve_radii": [0.8],
    "num_samples": 1024,
    "batch_size": 2,
    # 10 steps can miss the top singular direction; unbounded inputs need a search limit
    "margin": {"tol": 0.02, "steps": 25, "mode": "mean", "max_radius": 2.0},
}
TOL = SWEEP_KW["margin"]["tol"]


def _lg_models(order=("lg0", "lg1")):
    made = {"lg0": LinearGaussianVAE(seed=0, **LG_KW), "lg1": LinearGaussianVAE(seed=1, **{**LG_KW, "sigma": 0.5})}
    return {k: made[k] for k in order}


def _lg_points(n=6):
    """Points of the linear models, whose inputs are unbounded (``box=None``)."""
    x = torch.rand(n, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5 + 0.25
    return PointSet(x, box=None)


def _sweep_one_thread(models, db, **kw):
    """run_sweep with one intra-op thread, like the subprocesses below (and fast for these tiny models)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        points = kw.pop("points", None) or _lg_points()
        return run_sweep(models, points, db=db, progress=False, **{**SWEEP_KW, **kw})
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lg_db(tmp_path_factory):
    """The uninterrupted single-process reference run."""
    db = tmp_path_factory.mktemp("lg") / "r.db"
    _sweep_one_thread(_lg_models(), db)
    return db


def test_sweep_matches_closed_forms(lg_db):
    models = _lg_models()
    conn = store.connect(lg_db, create=False)
    rows = store.read_table(conn, "results")
    curves = store.read_table(conn, "curves")
    assert len(rows) == 2 * 6 * 2 and len(curves) == 2 * 6 * 1 * 2
    assert len(store.completed_units(conn)) == 2 * 3
    for row in rows:
        m = models[row["model"]]
        exact = m.bounds(row["r"])
        # p_hat with its CP interval around the exact p (S=1024; 4 standard errors)
        assert abs(row["p_hat"] - exact["p"]) < 4 * (exact["p"] * (1 - exact["p"]) / 1024) ** 0.5 + 1e-9
        assert row["ci_low"] <= row["p_hat"] <= row["ci_high"]
        assert row["jac_frobenius"] == pytest.approx(exact["jac_frobenius"], rel=1e-6)
        assert row["sigma_min"] == pytest.approx(exact["sigma_min"], rel=1e-6)
        q = stats.norm.ppf(row["p_hat"]) if row["certified"] else 0.0
        assert row["bound"] == pytest.approx(exact["sigma_min"] * q / exact["jac_frobenius"], rel=1e-6)
        assert row["spectral_bound"] == pytest.approx(exact["sigma_min"] * q / exact["jac_spectral"], rel=1e-6)
        assert row["r_star"] == pytest.approx(m.r_star(), rel=0.25)
        true = m.true_margin(row["r"])
        assert row["certified"] == (row["clean_decision"] == 1) and row["clean_decision"] in (-1, 1)
        assert row["bracketed"] == 1
        if row["certified"]:  # the three numbers: the truth in the bracket, the estimate near it
            assert row["margin_lower"] <= true <= row["margin_upper"]
            assert row["margin"] == pytest.approx(true, abs=0.02 + 0.1 * true)
            assert row["bound"] <= row["margin"] + 1e-9
            assert row["adv_norm"] == pytest.approx(row["margin_upper"], rel=1e-5)  # the evidence
            assert row["p_hat_adv"] <= 0.5 and row["ci_low_adv"] <= row["p_hat_adv"] <= row["ci_high_adv"]
            assert row["p_hat_adv"] == row["hits_adv"] / row["num_samples_adv"]
            assert row["ll_drop"] == pytest.approx(row["ll_clean"] - row["ll_adv"])
            assert row["rel_ll_degradation"] >= 0
        else:  # decided not robust at delta = 0: no certificate, the clean estimate is the evidence
            assert row["margin"] == row["margin_upper"] == 0 and row["bound"] == 0 and row["adv_norm"] is None
    conn.close()


def test_order_of_models_does_not_change_results(lg_db, tmp_path):
    db = tmp_path / "rev.db"
    _sweep_one_thread(_lg_models(order=("lg1", "lg0")), db)
    a, b = store.connect(lg_db, create=False), store.connect(db, create=False)
    for table in ("results", "curves"):
        assert store.table_rows(a, table) == store.table_rows(b, table)


def test_existing_db_needs_resume_and_same_spec(lg_db):
    with pytest.raises(ValueError, match="resume"):
        run_sweep(_lg_models(), _lg_points(), db=lg_db, progress=False, **SWEEP_KW)
    with pytest.raises(ValueError, match="different sweep"):
        run_sweep(_lg_models(), _lg_points(), db=lg_db, progress=False, resume=True, **{**SWEEP_KW, "seed": 1})
    res = run_sweep(_lg_models(), _lg_points(), db=lg_db, progress=False, resume=True, **SWEEP_KW)
    assert res.units_computed == 0 and res.units_skipped == res.units_total == 6


def test_an_older_schema_is_another_sweep(tmp_path):
    """A database of an older vaefast (schema 2 stored reconstructions) is refused as a different sweep, untouched."""
    from vaefast.sweep import SweepMismatchError

    db = tmp_path / "old.db"
    conn = store.connect(db)
    conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(SweepMismatchError, match="results schema 2, this vaefast reads schema"):
        run_sweep(_lg_models(), _lg_points(), db=db, progress=False, resume=True, **SWEEP_KW)
    assert store.get_meta(sqlite3.connect(db))["schema_version"] == "2"


def test_compute_unit_rows_have_exactly_the_schema_columns(tmp_path):
    """The rows a unit produces, the store's tables and its column constants have the same keys: one schema."""
    model = _lg_models(order=("lg0",))["lg0"]
    spec = SweepSpec(radii=[0.4, 1.4], attack_eps=[0.05], num_samples=256, box=None,
                     margin={"tol": 0.05, "steps": 3, "mode": "mean", "max_radius": 2.0})  # fmt: skip
    conn = store.connect(tmp_path / "s.db")
    unit = WorkUnit("lg0", 0, 3)  # r = 0.4 is below r* (no evidence), r = 1.4 above it (evidence)
    unit_row, results, curves = compute_unit(model, _lg_points().x[:3], unit, spec)
    assert {*unit_row, "rank", "world_size", "finished_at"} == set(schema.UNITS.names) == set(store.UNIT_COLUMNS)
    assert len(results) == 3 * 2 and len(curves) == 3 * 2
    with_evidence = without = 0
    for row in results:
        assert row.keys() == set(schema.RESULTS.names) == set(store.RESULT_COLUMNS)
        with_evidence += row["delta"] is not None
        without += row["delta"] is None
        if row["delta"] is None:  # the evidence columns are NULL together
            assert all(row[c] is None for c in schema.RESULTS.group(schema.EVIDENCE))
    assert all(row.keys() == set(schema.CURVES.names) == set(store.CURVE_COLUMNS) for row in curves)
    store.commit_unit(conn, {**unit_row, "rank": 0, "world_size": 1}, results, curves)  # strict inserts
    assert with_evidence and without
    assert len(store.completed_units(conn)) == 1
    conn.close()


# --- devices -------------------------------------------------------------------------------------------------

EXACT_COLUMNS = ("hits", "num_samples", "robust", "certified", "bracketed", "seed", "p_hat", "ci_low", "ci_high")
CLOSE_COLUMNS = ("r_star", "bound", "certified_bound", "spectral_bound", "whitened_bound", "latent_margin",
                 "sigma_min", "jac_frobenius", "jac_spectral", "max_radius")  # fmt: skip
MARGIN_COLUMNS = ("margin", "margin_lower", "margin_upper", "adv_norm")


def _read(db, table):
    conn = store.connect(db, create=False)
    try:
        return store.read_table(conn, table)
    finally:
        conn.close()


def test_sweep_on_a_device_matches_the_cpu(device, lg_db, tmp_path):
    """``run_sweep(device=...)``: the same table as on the CPU. Monte-Carlo counts (and so p̂ and its interval) are
    identical, the Philox draws being the same bits on every device; other floats agree to rounding; a margin
    search may take another bisection step where rounding moves a decision, so margins agree to the tolerance.
    The caller's models stay where they were."""
    models = _lg_models()
    db = tmp_path / f"{device}.db"
    _sweep_one_thread(models, db, device=device)
    assert all(p.device.type == "cpu" for m in models.values() for p in m.parameters())
    if device == "cpu":  # bit-identical for the same thread count
        assert _tables(db) == _tables(lg_db)
        return
    ref, got = _read(lg_db, "results"), _read(db, "results")
    assert [r["item_id"] for r in got] == [r["item_id"] for r in ref]
    tol = TOL
    for a, b in zip(ref, got, strict=True):
        assert {c: b[c] for c in EXACT_COLUMNS} == {c: a[c] for c in EXACT_COLUMNS}, a["item_id"]
        for c in CLOSE_COLUMNS:
            assert b[c] == pytest.approx(a[c], rel=1e-6, abs=1e-9), (a["item_id"], c)
        for c in MARGIN_COLUMNS:
            assert (a[c] is None) == (b[c] is None) and (a[c] is None or abs(a[c] - b[c]) <= 2 * tol), (a["item_id"], c)
    for a, b in zip(_read(lg_db, "curves"), _read(db, "curves"), strict=True):
        assert a["item_id"] == b["item_id"] and b["adv_norm"] == pytest.approx(a["adv_norm"], rel=1e-4, abs=1e-6)
        assert abs(a["p_hat"] - b["p_hat"]) <= 0.02


def test_device_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="device must be one of"):
        run_sweep(_lg_models(), _lg_points(), db=tmp_path / "x.db", progress=False, device="tpu", **SWEEP_KW)
    with pytest.raises(ValueError, match="device cuda:99: (no CUDA GPU is visible|only)"):
        run_sweep(_lg_models(), _lg_points(), db=tmp_path / "x.db", progress=False, device="cuda:99", **SWEEP_KW)
    assert not (tmp_path / "x.db").exists()


def test_cli_device_errors_are_one_line(tmp_path, capsys):
    from vaefast.cli import main

    db = str(tmp_path / "x.db")
    args = ["sweep", "--model", f"m={tmp_path / 'none'}", "--radii", "0.5", "--points", "2", "--db", db]
    assert main([*args, "--device", "cuda:99"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda:99" in err and len(err.strip().splitlines()) == 1


def test_rank_device_is_the_local_gpu(monkeypatch):
    """Under torchrun a plain ``cuda`` (or ``auto`` with a GPU) is ``cuda:LOCAL_RANK``; an explicit index is kept;
    a rank without its own GPU is a clear error (a GPU machine with 2 GPUs, simulated)."""
    from vaefast.sweep.distributed import rank_device

    chosen = [torch.device("cuda", 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[-1].index)
    assert rank_device("cuda", local_rank=1, world_size=2) == torch.device("cuda", 1) == chosen[-1]
    assert rank_device("auto", local_rank=1, world_size=2) == torch.device("cuda", 1)
    assert rank_device(torch.device("cuda"), local_rank=0, world_size=2) == torch.device("cuda", 0)
    assert rank_device("cuda:0", local_rank=1, world_size=2) == torch.device("cuda", 0)  # asked for explicitly
    assert rank_device("cpu", local_rank=1, world_size=2) == torch.device("cpu")
    with pytest.raises(ValueError, match="LOCAL_RANK 2 would use cuda:2 but only 2 CUDA device"):
        rank_device("cuda", local_rank=2, world_size=4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a launcher that shows each rank only its own GPU
    assert rank_device("cuda", local_rank=3, world_size=4) == torch.device("cuda", 0)


# --- subprocesses: kill -9 + resume, torchrun ---------------------------------------------------------------

SCRIPT = textwrap.dedent(
    f"""
    import sys
    import torch
    from vaefast.sweep import PointSet, run_sweep
    from vaefast.testing import LinearGaussianVAE

    LG_KW = {LG_KW!r}
    SWEEP_KW = {SWEEP_KW!r}
    models = {{"lg0": LinearGaussianVAE(seed=0, **LG_KW),
               "lg1": LinearGaussianVAE(seed=1, **{{**LG_KW, "sigma": 0.5}})}}
    x = torch.rand(int(sys.argv[3]), 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5 + 0.25
    run_sweep(models, PointSet(x, box=None), db=sys.argv[1], resume=sys.argv[2] == "1", progress=False, **SWEEP_KW)
    """
)


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("scripts") / "sweep_lg.py"
    path.write_text(SCRIPT)
    return path


def _tables(db):
    conn = store.connect(db, create=False)
    try:
        return {t: store.table_rows(conn, t) for t in store.DETERMINISTIC_TABLES}
    finally:
        conn.close()


def test_kill9_then_resume_equals_uninterrupted(script, lg_db, tmp_path):
    db = tmp_path / "killed.db"
    total = 2 * 3
    proc = subprocess.Popen([sys.executable, str(script), str(db), "0", "6"], env=_env())
    deadline = time.time() + 90
    while count_units(db) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = count_units(db)
    assert 2 <= done_at_kill < total, f"kill came too late/early: {done_at_kill} of {total} units"
    conn = store.connect(db, create=False)
    before = {r[0]: r for r in store.table_rows(conn, "units")}
    conn.close()
    subprocess.run([sys.executable, str(script), str(db), "1", "6"], env=_env(), check=True, timeout=120)
    assert _tables(db) == _tables(lg_db)
    conn = store.connect(db, create=False)
    after = {r[0]: r for r in store.table_rows(conn, "units")}
    conn.close()
    assert len(after) == total
    # units finished before the kill were kept as they were (same timings/finish stamps): not computed twice
    assert all(after[u] == row for u, row in before.items())


def test_a_second_process_on_the_same_database_stops_at_once(script, lg_db, tmp_path, capsys):
    """Two sweeps of one database at a time: the second one is refused before computing anything (one line, exit
    status 2), and once the first has finished the same command resumes with nothing left to do."""
    from vaefast.cli import main

    db, n = tmp_path / "busy.db", 6
    proc = subprocess.Popen([sys.executable, str(script), str(db), "0", str(n)], env=_env())
    try:
        deadline = time.time() + 90
        while count_units(db) < 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the first sweep finished before the second one started"
        t0 = time.perf_counter()
        with pytest.raises(store.DatabaseBusyError, match="being written by another sweep process"):
            _sweep_one_thread(_lg_models(), db, resume=True, points=_lg_points(n))
        assert time.perf_counter() - t0 < 30  # refused before any unit: not after redoing them
        assert main(["export", str(db), "--csv", str(tmp_path / "while.csv")]) == 0  # readers go on meanwhile
        capsys.readouterr()
    finally:
        proc.wait(timeout=300)
    assert proc.returncode == 0
    res = _sweep_one_thread(_lg_models(), db, resume=True, points=_lg_points(n))
    assert res.units_computed == 0 and res.units_skipped == res.units_total == 2 * n // 2
    assert _tables(db) == _tables(lg_db)
    assert not Path(f"{db}-wal").exists()  # the last writer put the database back in rollback-journal mode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_single_process(script, lg_db, tmp_path):
    db = tmp_path / "dist.db"
    cmd = [str(VENV_BIN / "torchrun"), "--nproc-per-node=2", "--nnodes=1", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(script), str(db), "0", "6"]  # fmt: skip
    subprocess.run(cmd, env=_env(), check=True, timeout=180)
    assert _tables(db) == _tables(lg_db)
    conn = store.connect(db, create=False)
    ranks = conn.execute("SELECT rank, world_size, COUNT(*) FROM units GROUP BY rank, world_size").fetchall()
    conn.close()
    assert sorted(ranks) == [(0, 2, 3), (1, 2, 3)]
    assert not Path(str(db) + ".shards").exists()


def test_auto_radii_from_quantiles_of_r_star(tmp_path):
    """radii="auto": quantiles of the pooled r* (closed form for the linear-Gaussian VAE: one r* for every point)
    and 1.3 x the last; the sweep stores exactly those radii."""
    model = _lg_models(order=("lg0",))
    radii = auto_radii(model, _lg_points().x, num_samples=2000, seed=0)
    r_star = model["lg0"].r_star()
    assert radii == sorted(radii) and len(radii) >= 2
    assert radii[0] == pytest.approx(r_star, rel=0.05) and radii[-1] == pytest.approx(1.3 * r_star, rel=0.05)
    db = tmp_path / "auto.db"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sweep(model, _lg_points(), "auto", db, num_samples=2000, batch_size=6,
                  margin={"steps": 5, "mode": "mean", "max_radius": 2.0}, progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    conn = store.connect(db, create=False)
    stored = sorted({r["r"] for r in store.read_table(conn, "results")})
    conn.close()
    assert stored == radii
    with pytest.raises(ValueError, match="'auto'"):
        run_sweep(model, _lg_points(), "quartiles", tmp_path / "x.db", progress=False)
