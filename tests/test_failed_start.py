"""A failed start leaves nothing behind, and the corrected command then succeeds (issue 21's cases, command by command).

Each bad command fails with one line and exit status 2 and leaves the working folder as it was; then the corrected
command (same output paths) succeeds. Also: a full disk in the middle of a sweep keeps the committed units, which
``verify`` and ``report`` read as an unfinished sweep, and ``--resume`` completes it; a read-only database is verified
all the same, and nothing writes into a read-only folder. (The demo's failed starts: ``tests/test_demo.py``; two
processes on one database: ``tests/test_sweep.py``.)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_demo import write_idx_dataset

from vaefast import store
from vaefast.cli import main
from vaefast.data import load
from vaefast.models import VAE, VAEConfig, save
from vaefast.testing import LinearGaussianVAE

TRAIN = ["train", "--hidden", "8", "--latent", "2", "--epochs", "1", "--iw-samples", "2", "--no-progress"]
SWEEP = ["sweep", "--points", "2", "--radii", "0.5", "--samples", "32", "--attack-steps", "2", "--tol", "0.2",
         "--max-radius", "2", "--batch-size", "1", "--no-progress"]  # fmt: skip
TINY = {"num_samples": 32, "batch_size": 1, "margin": {"tol": 0.2, "steps": 2, "max_radius": 2.0}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``run`` (a tiny trained model) and ``nanrun`` (the same with a NaN weight)."""
    from vaefast.training import train

    root = tmp_path_factory.mktemp("runs")
    model = VAE(VAEConfig(hidden=(8,), latent_dim=2, likelihood="gaussian", gaussian_std=0.3), seed=0)
    train(model, load("digits").x[:64], epochs=1, batch_size=32, progress=False)
    save(model, root / "run")
    with torch.no_grad():
        next(iter(model.parameters())).view(-1)[0] = float("nan")
    save(model, root / "nanrun")
    return root


def _state(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}  # fmt: skip


def _fails(argv: list[str], names: str, folder: Path, capsys: pytest.CaptureFixture) -> None:
    """``argv`` exits 2 with one line naming ``names`` and leaves ``folder`` unchanged."""
    before = _state(folder)
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and names.lower() in err.lower() and "Traceback" not in err, err
    assert _state(folder) == before, argv


def _ok(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured.out


def test_train(tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "run")
    mnist = write_idx_dataset(tmp_path / "mnist", n_train=32, n_test=8)
    good = (mnist / "train-images-idx3-ubyte.gz").read_bytes()
    (mnist / "train-images-idx3-ubyte.gz").write_bytes(good[:40] + bytes(b ^ 0x5A for b in good[40:]))
    for extra, names in [
        (["--out", str(tmp_path / "afile" / "run")], "--out"),
        (["--iw-samples", "0", "--out", out], "--iw-samples"),
        (["--objective", "elbo", "--beta", "4", "--out", out], "--beta"),
        (["--data", "mnist", "--root", str(mnist), "--out", out], "train-images-idx3-ubyte.gz"),
        (["--likelihood", "gaussian", "--gaussian-std", "0.001", "--lr", "1e30", "--out", out], "diverged"),
    ]:
        _fails([*TRAIN, *extra], names, tmp_path, capsys)
    (mnist / "train-images-idx3-ubyte.gz").write_bytes(good)
    _ok([*TRAIN, "--objective", "beta_vae", "--beta", "4", "--data", "mnist", "--root", str(mnist), "--out", out],
        capsys)  # fmt: skip
    files = _state(Path(out))
    assert {"config.json", "model.safetensors", "metrics.csv", "metrics.json"} <= set(files)
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
    # a retrain that diverges leaves the earlier run as it was
    diverge = ["--likelihood", "gaussian", "--gaussian-std", "0.001", "--lr", "1e30", "--force", "--out", out]
    _fails([*TRAIN, *diverge], "diverged", tmp_path, capsys)


@pytest.mark.parametrize("command", ["estimate", "margin"])
def test_estimate_and_margin_check_the_output_before_the_work(runs: Path, tmp_path: Path, command, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    base = [command, str(runs / "run"), "--r", "0.5", "--points", "2", "--samples", "16"]
    base += ["--steps", "2"] if command == "margin" else []
    for out in (tmp_path / "afile" / "o.csv", tmp_path):
        _fails([*base, "--out", str(out)], "--out", tmp_path, capsys)
    _ok([*base, "--out", str(tmp_path / "o.csv")], capsys)
    assert (tmp_path / "o.csv").read_text().count("\n") >= 3


def test_sweep_then_verify_report_export(runs: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder.db").mkdir()
    (tmp_path / "zero.db").touch()
    db = str(tmp_path / "zero.db")  # an empty file: read-only commands leave it so, a sweep fills it
    for command in (["verify", db], ["report", db, "--out", str(tmp_path / "rep")], ["export", db, "--csv", "x.csv"]):
        _fails(command, "zero.db", tmp_path, capsys)
    model = ["--model", f"m={runs / 'run'}"]
    for extra, names in [
        (["--db", str(tmp_path / "folder.db")], "folder.db"),
        (["--db", str(tmp_path / "afile" / "r.db")], "--db"),
        (["--attack-steps", "0", "--db", db], "steps"),
        (["--samples", str(10**12), "--db", db], "num_samples"),
        (["--indices", "3", "3", "--db", db], "--indices"),
        (["--model", f"m={runs / 'nanrun'}", "--db", db], "NaN"),
    ]:
        argv = [*SWEEP, *extra] if "--model" in extra else [*SWEEP, *model, *extra]
        if "--indices" in extra:
            argv.remove("--points"), argv.remove("2")
        _fails(argv, names, tmp_path, capsys)
    _ok([*SWEEP, *model, "--db", db], capsys)
    _ok(["verify", db, "--no-progress"], capsys)
    _ok(["report", db, "--out", str(tmp_path / "rep")], capsys)
    _ok(["export", db, "--csv", str(tmp_path / "r.csv")], capsys)


def _lg() -> LinearGaussianVAE:
    return LinearGaussianVAE(input_dim=12, latent_dim=3, seed=0)


class _WrongShape(LinearGaussianVAE):
    def decode(self, z):
        return super().decode(z)[:, :5]


def test_run_sweep_refuses_before_writing(tmp_path: Path) -> None:
    from vaefast.sweep import run_sweep

    x = torch.rand(2, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5 + 0.25
    db = tmp_path / "r.db"
    bad = [
        ({"points": x.clone().fill_(float("nan"))}, ValueError, "points"),
        ({"points": x + 1.0}, ValueError, "outside box"),
        ({"points": x.to(torch.int64)}, TypeError, "points"),
        ({"points": torch.empty(2, 12, device="meta")}, ValueError, "meta"),
        ({"margin": {"tol": 0.2, "steps": 2, "bogus": 1}}, TypeError, "bogus"),
        ({"margin": {"tol": 0.2, "steps": 0}}, ValueError, "steps"),
        ({"radii": "0.5"}, ValueError, "radii"),
        ({"db": 123}, TypeError, "db"),
        ({"db": tmp_path}, ValueError, "folder"),
        ({"num_samples": 10**12}, ValueError, "num_samples"),
        ({"models": {"m": _WrongShape(input_dim=12, latent_dim=3, seed=0)}}, ValueError, "decode"),
    ]
    for change, kind, names in bad:
        kw = {"models": {"m": _lg()}, "points": x, "radii": [0.5], "db": db, **TINY, **change}
        with pytest.raises(kind, match=names):
            run_sweep(kw.pop("models"), kw.pop("points"), kw.pop("radii"), kw.pop("db"), progress=False, **kw)
        assert list(tmp_path.iterdir()) == [], change
    res = run_sweep({"m": _lg()}, x, [0.5], db, progress=False, **TINY)
    assert res.units_computed == 2


def test_a_full_disk_keeps_what_was_committed(runs: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """The disk fills at the first commit: nothing is left. It fills at the second: the first unit stays, verify and
    report read an unfinished sweep, and --resume completes it."""
    db = str(tmp_path / "r.db")
    argv = [*SWEEP, "--model", f"m={runs / 'run'}", "--db", db]
    commit = store.commit_unit
    calls = {"n": 0, "fail_at": 1}

    def full_disk(conn, *args, **kw):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            with store.transaction(conn):  # a real SQLITE_FULL inside the transaction of the unit
                conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
                conn.execute("CREATE TABLE filler (b BLOB)")
                conn.execute("INSERT INTO filler VALUES (zeroblob(100000))")
        return commit(conn, *args, **kw)

    monkeypatch.setattr(store, "commit_unit", full_disk)
    _fails(argv, "the disk is full", tmp_path, capsys)
    assert not Path(db).exists()
    calls.update(n=0, fail_at=2)
    assert main(argv) == 2 and "the disk is full" in capsys.readouterr().err
    monkeypatch.setattr(store, "commit_unit", commit)
    assert main(["verify", db, "--no-progress"]) == 1
    assert "DISCREPANCY m|pos=1:2 [complete]: unit not committed" in capsys.readouterr().out
    _ok(["report", db, "--out", str(tmp_path / "rep")], capsys)
    _ok([*argv, "--resume"], capsys)
    _ok(["verify", db, "--no-progress"], capsys)


def test_verify_of_a_database_it_cannot_write(runs: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    db = str(tmp_path / "r.db")
    _ok([*SWEEP, "--model", f"m={runs / 'run'}", "--db", db], capsys)
    before = hashlib.sha256(Path(db).read_bytes()).hexdigest()
    real = store.connect

    def read_only(path, *, create=True, readonly=False):
        if not readonly:
            raise store.DatabaseError(f"results database {str(path)!r}: cannot open it for writing: read-only")
        return real(path, create=create, readonly=readonly)

    monkeypatch.setattr(store, "connect", read_only)
    out = _ok(["verify", db, "--no-progress"], capsys)
    assert "is read-only: the replayed claims were not stored" in out
    assert hashlib.sha256(Path(db).read_bytes()).hexdigest() == before


READ_ONLY_SCRIPT = """
import sys
from vaefast.cli import main
db, sweep = sys.argv[1], sys.argv[2:]
print("verify", main(["verify", db, "--no-progress"]))
print("resume", main([*sweep, "--db", db, "--resume"]))
print("new", main([*sweep, "--db", db + ".new"]))
print("export", main(["export", db, "--json", db + ".json"]))
"""


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_read_only_database_and_folder(runs: Path, tmp_path: Path, capsys) -> None:
    """A real read-only file in a read-only folder (as root: without the capabilities that bypass permissions):
    verify checks it and says the claims were not stored, a resume and a new database there are one-line errors
    before any work, and nothing is created or changed."""
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "r.db"
    sweep = [*SWEEP, "--model", f"m={runs / 'run'}"]
    _ok([*sweep, "--db", str(db)], capsys)
    db.chmod(0o444)
    folder.chmod(0o555)
    before = _state(folder)
    prefix = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root bypasses permissions and setpriv (to drop that capability) is not installed")
        prefix = [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    try:
        done = subprocess.run([*prefix, sys.executable, "-c", READ_ONLY_SCRIPT, str(db), *sweep], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        folder.chmod(0o755)
    status = dict(line.split() for line in done.stdout.splitlines() if line.split()[0] in ("verify", "resume", "new",
                  "export"))  # fmt: skip
    assert status == {"verify": "0", "resume": "2", "new": "2", "export": "2"}, (done.stdout, done.stderr)
    assert "is read-only: the replayed claims were not stored" in done.stdout
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 3 and "Traceback" not in done.stderr, done.stderr
    assert "not writable" in errors[0] and "cannot write in the folder" in errors[1] and "--json" in errors[2]
    assert _state(folder) == before
