"""Sweeps over several processes that share no filesystem: rank 1 runs in a folder of its own and never sees the
database (a relative path that exists in rank 0's folder only); its units reach rank 0 over gloo. A kill -9 of any
rank keeps every committed unit, and a resume with 1 or 2 processes ends with the single-process tables."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import count_units

from vaefast import store
from vaefast.sweep import PointSet, SweepMismatchError, run_sweep
from vaefast.sweep.distributed import DistContext
from vaefast.sweep.runner import execute, plan_sweep
from vaefast.testing import LinearGaussianVAE

ROOT = Path(__file__).resolve().parents[1]
DB = "results.db"  # relative: resolves in rank 0's folder only
LG_KW = {"input_dim": 12, "latent_dim": 3, "sigma": 0.3, "decoder_scale": 1.5}
SWEEP_KW = {
    "radii": [0.8, 1.4],
    "attack_eps": [0.05],
    "curve_radii": [0.8],
    "num_samples": 512,
    "batch_size": 2,
    "margin": {"tol": 0.02, "steps": 10, "mode": "mean", "max_radius": 2.0},
}
N_POINTS = 6
TOTAL_UNITS = 2 * 3  # models x blocks of 2 points (a unit holds every radius)

SCRIPT = textwrap.dedent(
    f"""
    import sys
    import torch
    from vaefast.sweep import PointSet, run_sweep
    from vaefast.testing import LinearGaussianVAE

    LG_KW = {LG_KW!r}
    models = {{"lg0": LinearGaussianVAE(seed=0, **LG_KW),
               "lg1": LinearGaussianVAE(seed=1, **{{**LG_KW, "sigma": 0.5}})}}
    n = int(sys.argv[3])
    x = torch.rand(n, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5 + 0.25
    res = run_sweep(models, PointSet(x, box=None), db=sys.argv[1], resume=sys.argv[2] == "1", progress=False,
                    **{SWEEP_KW!r})
    print(f"rank {{res.rank}}: computed {{res.units_computed}}, received {{res.units_received}}", flush=True)
    """
)


def _models() -> dict[str, LinearGaussianVAE]:
    return {"lg0": LinearGaussianVAE(seed=0, **LG_KW), "lg1": LinearGaussianVAE(seed=1, **{**LG_KW, "sigma": 0.5})}


def _points(n: int = N_POINTS) -> PointSet:
    x = torch.rand(n, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5 + 0.25
    return PointSet(x, box=None)  # the linear models' inputs are unbounded


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted single-process run (one intra-op thread, like the processes below)."""
    db = tmp_path_factory.mktemp("single") / "r.db"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sweep(_models(), _points(), db=db, progress=False, **SWEEP_KW)
    finally:
        torch.set_num_threads(threads)
    return db


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "sweep_lg.py"
    path.write_text(SCRIPT)
    return path


@pytest.fixture
def machines(tmp_path) -> tuple[Path, Path]:
    """Two working folders that see nothing of each other: rank 0's (the database's) and rank 1's."""
    a, b = tmp_path / "node0", tmp_path / "node1"
    a.mkdir()
    b.mkdir()
    return a, b


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if world > 1:  # one process per "machine": each is local rank 0 of its node
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    return env


def _launch(script: Path, cwds: list[Path], resume: bool, n_points: list[int] | None = None) -> list[subprocess.Popen]:
    """Start one process per folder (rank = position), each with the same relative database path."""
    port, world = _free_port(), len(cwds)
    n_points = n_points or [N_POINTS] * world
    return [
        subprocess.Popen(
            [sys.executable, str(script), DB, "1" if resume else "0", str(n)],
            cwd=cwd,
            env=_env(rank, world, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank, (cwd, n) in enumerate(zip(cwds, n_points, strict=True))
    ]


def _finish(procs: list[subprocess.Popen], timeout: float = 90) -> list[tuple[int, str]]:
    """Wait for every process; returns ``(returncode, stdout + stderr)`` per rank (killing stragglers)."""
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        out.append((p.returncode, stdout + stderr))
    return out


def _tables(db: Path) -> dict[str, list[tuple]]:
    conn = store.connect(db, create=False)
    try:
        return {t: store.table_rows(conn, t) for t in store.DETERMINISTIC_TABLES}
    finally:
        conn.close()


def _units(db: Path) -> dict[str, tuple]:
    conn = store.connect(db, create=False)
    try:
        return {r[0]: r for r in store.table_rows(conn, "units")}
    finally:
        conn.close()


def _kill_mid_run(script: Path, a: Path, b: Path, victim: int) -> dict[str, tuple]:
    """Start two ranks, kill -9 rank ``victim`` once some units are committed; returns the units committed."""
    procs = _launch(script, [a, b], resume=False)
    deadline = time.time() + 90
    while count_units(a / DB) < 2 and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(procs[victim].pid, signal.SIGKILL)
    results = _finish(procs, timeout=60)
    survivor_rc, survivor_log = results[1 - victim]
    assert survivor_rc != 0, survivor_log  # the other rank stops too (it does not hang, nor claim success)
    assert f"rank {victim} stopped before the sweep was done" in survivor_log, survivor_log
    assert "--resume" in survivor_log
    done = _units(a / DB)
    assert 2 <= len(done) < TOTAL_UNITS, f"kill came too late/early: {len(done)} of {TOTAL_UNITS} units"
    return done


def test_two_machines_without_shared_files_equal_single_process(script, reference, machines):
    a, b = machines
    results = _finish(_launch(script, [a, b], resume=False))
    assert [rc for rc, _ in results] == [0, 0], results
    assert "rank 0: computed 3, received 3" in results[0][1] and "rank 1: computed 3, received 0" in results[1][1]
    assert _tables(a / DB) == _tables(reference)
    assert list(b.iterdir()) == []  # rank 1 wrote nothing: no database, no shard
    assert {p.name for p in a.iterdir()} <= {DB, DB + "-wal", DB + "-shm"}
    conn = store.connect(a / DB, create=False)
    ranks = conn.execute("SELECT rank, world_size, COUNT(*) FROM units GROUP BY rank, world_size").fetchall()
    conn.close()
    assert sorted(ranks) == [(0, 2, 3), (1, 2, 3)]


@pytest.mark.parametrize(("victim", "resume_world"), [(1, 1), (1, 2), (0, 2)])
def test_kill9_of_a_rank_then_resume(script, reference, machines, victim, resume_world):
    """kill -9 of rank ``victim`` mid-run, then ``--resume`` with ``resume_world`` processes: exactly the units not
    committed are computed, and the tables equal the uninterrupted single-process run's."""
    a, b = machines
    before = _kill_mid_run(script, a, b, victim)
    results = _finish(_launch(script, [a, b][:resume_world], resume=True))
    assert all(rc == 0 for rc, _ in results), results
    missing = TOTAL_UNITS - len(before)
    computed = sum(int(log.split("computed ")[1].split(",")[0]) for _, log in results)
    assert computed == missing  # nothing computed twice, nothing left out
    assert _tables(a / DB) == _tables(reference)
    after = _units(a / DB)
    assert len(after) == TOTAL_UNITS
    assert all(after[u] == row for u, row in before.items())  # committed units kept as they were
    assert list(b.iterdir()) == []


class _OtherRank(DistContext):
    """Rank 0 of 2 whose peer (simulated in this process) plans another sweep."""

    def all_gather(self, obj):
        return [obj, "another fingerprint"]

    def broadcast(self, obj):
        return obj


def test_ranks_planning_different_sweeps_are_refused(tmp_path):
    """Every rank checks its sweep against the others' (fingerprints) before rank 0 writes anything."""
    plan = plan_sweep(_models(), _points(), SWEEP_KW["radii"], tmp_path / DB, **{k: v for k, v in SWEEP_KW.items()
                      if k != "radii"})  # fmt: skip
    with pytest.raises(SweepMismatchError, match="rank 1 plans a different sweep"):
        execute(plan, _OtherRank(rank=0, world_size=2), progress=False)
    assert list(tmp_path.iterdir()) == []


class _Peer(DistContext):
    """Rank 1 of 2, receiving what rank 0 (simulated) broadcasts."""

    def __init__(self, sent):
        super().__init__(rank=1, world_size=2)
        self.sent = sent

    def broadcast(self, obj):
        return self.sent


def test_what_rank0_decides_reaches_every_rank():
    """Rank 0 alone chooses the radii and checks the database; the other ranks get its result or its error."""

    def refuse():
        raise SweepMismatchError("db 'x' holds a different sweep")

    alone = DistContext()
    assert alone.on_rank0(lambda: [0.5, 1.0]) == [0.5, 1.0]
    with pytest.raises(SweepMismatchError, match="holds a different sweep"):
        alone.on_rank0(refuse)
    assert _Peer(("ok", [0.5, 1.0])).on_rank0(refuse) == [0.5, 1.0]  # rank 1 never runs the work itself
    with pytest.raises(SweepMismatchError, match="holds a different sweep"):
        _Peer(("error", SweepMismatchError("db 'x' holds a different sweep"))).on_rank0(lambda: None)
