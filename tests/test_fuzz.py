"""Bad input, table-driven: every command-line case and every API case fails cleanly and changes nothing.

Each command-line case runs ``vaefast.cli.main`` in a sandbox folder (the working directory, so that default outputs
would land there too) and asserts: the exit status, exactly one line on stderr (``vaefast <command>: error: ...``)
that names the argument or file, no traceback, and no file created or changed in the sandbox. Each API case calls a
public function and asserts the exception's type, a one-line message naming the argument or file, and no file
created or changed. The cases cover paths (folders in a file's place, a file in a folder's place, missing files),
databases (empty, not a database, another schema, another sweep), corrupt data and model files, non-finite models
and inputs, wrong shapes and dtypes, and every numeric setting out of range.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from vaefast.cli import main
from vaefast.models import VAE, VAEConfig, save
from vaefast.testing import LinearGaussianVAE

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
ROOT_USER = pytest.mark.skipif(os.geteuid() == 0, reason="root may write in a read-only folder")
TINY = {"radii": [0.5], "num_samples": 32, "batch_size": 2, "margin": {"tol": 0.2, "steps": 2, "max_radius": 2.0}}


# --- the sandbox -------------------------------------------------------------------------------------------------
def _corrupt_gzip(path: Path, header: bytes) -> None:
    """A gzip file whose first block holds ``header`` and whose body is damaged (zlib fails mid-stream)."""
    raw = gzip.compress(header + bytes(range(256)) * 40)
    damaged = raw[:30] + bytes(b ^ 0x5A for b in raw[30:-8]) + raw[-8:]
    path.write_bytes(damaged)


def _tiny_model(seed: int = 0) -> VAE:
    from vaefast.data import load
    from vaefast.training import train

    model = VAE(VAEConfig(hidden=(8,), latent_dim=2, likelihood="gaussian", gaussian_std=0.3), seed=seed)
    train(model, load("digits").x[:64], epochs=1, batch_size=32, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a run, a results database and every kind of bad file the cases point at."""
    sb = tmp_path_factory.mktemp("fuzz")
    save(_tiny_model(), sb / "run")
    save(_tiny_model(seed=1), sb / "other")
    nan = _tiny_model()
    with torch.no_grad():
        next(iter(nan.parameters())).fill_(float("nan"))
    save(nan, sb / "nanrun")
    shutil.copytree(sb / "run", sb / "truncated")
    weights = sb / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (sb / "noconfig").mkdir()
    argv = [a.replace("{sb}", str(sb)) for a in _with(SWEEP, "--db", "{sb}/results.db")]
    assert main(argv) == 0  # the database the cases resume, verify, report and export
    (sb / "zero.db").touch()
    (sb / "notdb.csv").write_text("point,r,p_hat\n0,1.0,0.5\n")
    (sb / "folder.db").mkdir()
    (sb / "afile").write_text("not a folder\n")
    old = sqlite3.connect(sb / "old.db")
    for table in ("meta", "models", "points", "units", "results", "curves"):
        old.execute(f"CREATE TABLE {table} (key TEXT, value TEXT)")
    old.execute("INSERT INTO meta VALUES ('schema_version', '4')")
    old.commit()
    old.close()
    (sb / "mnist").mkdir()
    images = bytes([0, 0, 8, 3, 0, 0, 0, 10, 0, 0, 0, 28, 0, 0, 0, 28])  # IDX header: 10 images of 28 x 28
    labels = bytes([0, 0, 8, 1, 0, 0, 0, 10])
    for stem, header in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        _corrupt_gzip(sb / "mnist" / f"{stem}.gz", header)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(sb / "mnist" / f"{stem.replace('t10k', 'train')}.gz", sb / "mnist" / f"{stem}.gz")
    batches = sb / "cifar" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (batches / name).write_bytes(b"\x80\x04\x95garbage that is no pickle")
    (sb / "readonly").mkdir()
    (sb / "readonly").chmod(0o555)
    return sb


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: folders, and files with their size and content hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = ("file", path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


@pytest.fixture
def unchanged(sandbox: Path, monkeypatch: pytest.MonkeyPatch):
    """Run in the sandbox and assert afterwards that nothing in it was created or changed."""
    monkeypatch.chdir(sandbox)
    before = _snapshot(sandbox)
    yield sandbox
    after = _snapshot(sandbox)
    created, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    assert (created, removed, changed) == ([], [], []), "the failed command touched files"


# --- the command line --------------------------------------------------------------------------------------------
TRAIN = ["train", "--data", "digits", "--hidden", "8", "--latent", "2", "--epochs", "1", "--iw-samples", "2",
         "--no-progress", "--out", "{sb}/newrun"]  # fmt: skip
EST = ["estimate", "{sb}/run", "--r", "0.5", "--points", "2", "--samples", "16"]
MARGIN = ["margin", "{sb}/run", "--r", "0.5", "--points", "2", "--samples", "16", "--steps", "2"]
SWEEP = ["sweep", "--model", "m={sb}/run", "--points", "2", "--radii", "0.5", "--samples", "32", "--attack-steps",
         "2", "--tol", "0.2", "--max-radius", "2", "--batch-size", "2", "--no-progress",
         "--db", "{sb}/new.db"]  # fmt: skip
VERIFY = ["verify", "{sb}/results.db", "--no-progress"]
REPORT = ["report", "{sb}/results.db", "--out", "{sb}/rep"]
EXPORT = ["export", "{sb}/results.db", "--csv", "{sb}/out.csv"]
DEMO = ["demo", "--out", "{sb}/demo", "--epochs", "1", "--samples", "16", "--points", "2", "--no-progress"]


def _with(base: list[str], *extra: str, drop: tuple[str, ...] = ()) -> list[str]:
    """``base`` without the options in ``drop`` (and their value), then ``extra`` (later options win)."""
    out, skip = [], False
    for token in base:
        if skip:
            skip = False
            continue
        if token in drop:
            skip = True
            continue
        out.append(token)
    return [*out, *extra]


CLI_CASES = [
    # train: output location, options checked before any data is read, the objective's weights, corrupt data
    ("train-out-under-file", _with(TRAIN, "--out", "{sb}/afile/run"), "--out"),
    ("train-out-is-file", _with(TRAIN, "--out", "{sb}/afile"), "--out"),
    ("train-out-under-devnull", _with(TRAIN, "--out", "/dev/null/run"), "--out"),
    ("train-out-holds-run", _with(TRAIN, "--out", "{sb}/run"), "already holds a run"),
    ("train-iw-samples-0", _with(TRAIN, "--iw-samples", "0"), "--iw-samples"),
    ("train-epochs-0", _with(TRAIN, "--epochs", "0"), "--epochs"),
    ("train-epochs-text", _with(TRAIN, "--epochs", "ten"), "--epochs"),
    ("train-elbo-beta", _with(TRAIN, "--objective", "elbo", "--beta", "4"), "--beta"),
    ("train-tc-weight-beta-vae", _with(TRAIN, "--beta", "2", "--tc-weight", "3"), "--tc-weight"),
    ("train-lr-negative", _with(TRAIN, "--lr", "-1"), "--lr"),
    ("train-lr-nan", _with(TRAIN, "--lr", "nan"), "--lr"),
    ("train-val-fraction", _with(TRAIN, "--val-fraction", "1.5"), "--val-fraction"),
    ("train-batch-size-0", _with(TRAIN, "--batch-size", "0"), "--batch-size"),
    ("train-hidden-0", _with(TRAIN, "--hidden", "0"), "--hidden"),
    ("train-latent-0", _with(TRAIN, "--latent", "0"), "--latent"),
    ("train-threads-0", _with(TRAIN, "--threads", "0"), "--threads"),
    ("train-patience-0", _with(TRAIN, "--patience", "0"), "--patience"),
    ("train-seed-negative", _with(TRAIN, "--seed", "-3"), "--seed"),
    ("train-lipschitz-decoder", _with(TRAIN, "--lipschitz-decoder", "abc"), "--lipschitz-decoder"),
    ("train-gaussian-std-0", _with(TRAIN, "--likelihood", "gaussian", "--gaussian-std", "0"), "gaussian_std"),
    ("train-unknown-data", _with(TRAIN, "--data", "imagenet"), "--data"),
    ("train-corrupt-mnist", _with(TRAIN, "--data", "mnist", "--root", "{sb}/mnist"), "train-images-idx3-ubyte.gz"),
    ("train-corrupt-cifar", _with(TRAIN, "--data", "cifar10", "--root", "{sb}/cifar"), "data_batch_1"),
    # estimate / margin: output checked before the work, run folders, options
    ("estimate-out-folder", _with(EST, "--out", "{sb}/folder.db"), "--out"),
    ("estimate-out-under-file", _with(EST, "--out", "{sb}/afile/est.csv"), "--out"),
    ("estimate-samples-0", _with(EST, "--samples", "0"), "--samples"),
    ("estimate-samples-huge", _with(EST, "--samples", str(10**12)), "--samples"),
    ("estimate-confidence", _with(EST, "--confidence", "1.5"), "--confidence"),
    ("estimate-r-negative", _with(EST, "--r", "-1"), "--r"),
    ("estimate-r-nan", _with(EST, "--r", "nan"), "--r"),
    ("estimate-points-0", _with(EST, "--points", "0"), "--points"),
    ("estimate-start-past-end", _with(EST, "--start", "10000"), "--start"),
    ("estimate-seed-negative", _with(EST, "--seed", "-1"), "--seed"),
    ("estimate-device-tpu", _with(EST, "--device", "tpu"), "--device"),
    ("estimate-missing-run", ["estimate", "{sb}/nothere", "--r", "0.5"], "nothere"),
    ("estimate-nan-weights", ["estimate", "{sb}/nanrun", "--r", "0.5", "--points", "2"], "NaN"),
    ("estimate-truncated-weights", ["estimate", "{sb}/truncated", "--r", "0.5"], "model.safetensors"),
    ("estimate-corrupt-mnist", _with(EST, "--data", "mnist", "--root", "{sb}/mnist"), "t10k-images-idx3-ubyte.gz"),
    ("margin-out-folder", _with(MARGIN, "--out", "{sb}/folder.db"), "--out"),
    ("margin-steps-0", _with(MARGIN, "--steps", "0"), "steps"),
    ("margin-tol-0", _with(MARGIN, "--tol", "0"), "tol"),
    ("margin-max-radius-negative", _with(MARGIN, "--max-radius", "-1"), "max_radius"),
    ("margin-restarts-0", _with(MARGIN, "--restarts", "0"), "restarts"),
    ("margin-granularity-0", _with(MARGIN, "--granularity", "0"), "granularity"),
    ("margin-r-0", _with(MARGIN, "--r", "0"), "--r"),
    ("margin-method", _with(MARGIN, "--method", "newton"), "--method"),
    # sweep: the database, the points, every setting, the models
    ("sweep-db-folder", _with(SWEEP, "--db", "{sb}/folder.db"), "folder.db"),
    ("sweep-db-under-file", _with(SWEEP, "--db", "{sb}/afile/r.db"), "--db"),
    ("sweep-db-csv", _with(SWEEP, "--db", "{sb}/notdb.csv"), "notdb.csv"),
    ("sweep-db-old-schema", _with(SWEEP, "--db", "{sb}/old.db"), "schema"),
    ("sweep-db-holds-results", _with(SWEEP, "--db", "{sb}/results.db"), "--resume"),
    ("sweep-db-other-sweep", _with(SWEEP, "--db", "{sb}/results.db", "--resume", "--samples", "48"), "different"),
    ("sweep-duplicate-indices", _with(SWEEP, "--indices", "3", "3", drop=("--points",)), "--indices"),
    ("sweep-negative-index", _with(SWEEP, "--indices", "-1", drop=("--points",)), "indices"),
    ("sweep-points-0", _with(SWEEP, "--points", "0"), "--points"),
    ("sweep-samples-0", _with(SWEEP, "--samples", "0"), "num_samples"),
    ("sweep-samples-huge", _with(SWEEP, "--samples", str(10**12)), "num_samples"),
    ("sweep-attack-steps-0", _with(SWEEP, "--attack-steps", "0"), "steps"),
    ("sweep-confidence", _with(SWEEP, "--confidence", "2"), "confidence"),
    ("sweep-batch-size-0", _with(SWEEP, "--batch-size", "0"), "batch_size"),
    ("sweep-radius-negative", _with(SWEEP, "--radii", "-1"), "radii"),
    ("sweep-radii-auto-and-number", _with(SWEEP, "--radii", "auto", "1.0"), "--radii"),
    ("sweep-radius-text", _with(SWEEP, "--radii", "big"), "--radii"),
    ("sweep-eps-negative", _with(SWEEP, "--eps", "-1"), "attack_eps"),
    ("sweep-curve-r-unknown", _with(SWEEP, "--eps", "0.1", "--curve-r", "0.7"), "curve_radii"),
    ("sweep-tol-0", _with(SWEEP, "--tol", "0"), "tol"),
    ("sweep-max-radius-0", _with(SWEEP, "--max-radius", "0"), "max_radius"),
    ("sweep-seed-negative", _with(SWEEP, "--seed", "-1"), "seed"),
    ("sweep-split", _with(SWEEP, "--split", "validation"), "split"),
    ("sweep-unknown-data", _with(SWEEP, "--data", "imagenet"), "imagenet"),
    ("sweep-corrupt-mnist", _with(SWEEP, "--data", "mnist", "--root", "{sb}/mnist"), "t10k-images-idx3-ubyte.gz"),
    ("sweep-nan-model", _with(SWEEP, "--model", "m={sb}/nanrun", drop=("--model",)), "NaN"),
    ("sweep-missing-model", _with(SWEEP, "--model", "m={sb}/nothere", drop=("--model",)), "nothere"),
    ("sweep-truncated-model", _with(SWEEP, "--model", "m={sb}/truncated", drop=("--model",)), "model.safetensors"),
    ("sweep-model-without-config", _with(SWEEP, "--model", "m={sb}/noconfig", drop=("--model",)), "config.json"),
    ("sweep-duplicate-model-names", [*SWEEP, "--model", "m={sb}/other"], "unique"),
    ("sweep-model-empty-name", _with(SWEEP, "--model", "={sb}/run", drop=("--model",)), "--model"),
    ("sweep-device-tpu", _with(SWEEP, "--device", "tpu"), "--device"),
    # verify / report / export: read-only opens, outputs checked first
    ("verify-empty-file", ["verify", "{sb}/zero.db"], "zero.db"),
    ("verify-missing-db", ["verify", "{sb}/nothere.db"], "nothere.db"),
    ("verify-folder", ["verify", "{sb}/folder.db"], "folder.db"),
    ("verify-csv", ["verify", "{sb}/notdb.csv"], "notdb.csv"),
    ("verify-old-schema", ["verify", "{sb}/old.db"], "schema"),
    ("verify-factor-0", _with(VERIFY, "--factor", "0"), "factor"),
    ("verify-confidence-1", _with(VERIFY, "--confidence", "1"), "confidence"),
    ("verify-sample-0", _with(VERIFY, "--sample", "0"), "sample"),
    ("verify-seed-negative", _with(VERIFY, "--seed", "-1"), "seed"),
    ("verify-unknown-model", _with(VERIFY, "--model", "zz={sb}/run"), "zz"),
    ("verify-other-weights", _with(VERIFY, "--model", "m={sb}/other"), "weights differ"),
    ("report-empty-file", ["report", "{sb}/zero.db", "--out", "{sb}/rep"], "zero.db"),
    ("report-out-is-file", _with(REPORT, "--out", "{sb}/afile"), "--out"),
    ("report-out-under-file", _with(REPORT, "--out", "{sb}/afile/rep"), "--out"),
    ("report-missing-db", ["report", "{sb}/nothere.db", "--out", "{sb}/rep"], "nothere.db"),
    ("report-csv", ["report", "{sb}/notdb.csv", "--out", "{sb}/rep"], "notdb.csv"),
    ("export-empty-file", ["export", "{sb}/zero.db", "--csv", "{sb}/out.csv"], "zero.db"),
    ("export-no-output", ["export", "{sb}/results.db"], "--csv"),
    ("export-csv-folder", _with(EXPORT, "--csv", "{sb}/folder.db"), "--csv"),
    ("export-json-under-file", _with(EXPORT, "--json", "{sb}/afile/x.json", drop=("--csv",)), "--json"),
    ("export-unknown-table", _with(EXPORT, "--table", "nope"), "--table"),
    ("export-missing-db", ["export", "{sb}/nothere.db", "--csv", "{sb}/out.csv"], "nothere.db"),
    # demo: every setting before any training or folder
    ("demo-samples-0", _with(DEMO, "--samples", "0"), "num_samples"),
    ("demo-epochs-0", _with(DEMO, "--epochs", "0"), "epochs"),
    ("demo-points-0", _with(DEMO, "--points", "0"), "points"),
    ("demo-points-text", _with(DEMO, "--points", "many"), "--points"),
    ("demo-out-is-file", _with(DEMO, "--out", "{sb}/afile"), "--out"),
    ("demo-out-under-file", _with(DEMO, "--out", "{sb}/afile/demo"), "--out"),
    ("demo-confidence-0", _with(DEMO, "--confidence", "0"), "confidence"),
    ("demo-attack-steps-0", _with(DEMO, "--attack-steps", "0"), "steps"),
    ("demo-batch-size-0", _with(DEMO, "--batch-size", "0"), "batch_size"),
    ("demo-digits-with-root", _with(DEMO, "--root", "{sb}/mnist"), "root"),
    ("demo-corrupt-mnist", _with(DEMO, "--data", "mnist", "--root", "{sb}/mnist"), "idx"),
    # info, and the parser itself
    ("info-missing", ["info", "{sb}/nothere"], "nothere"),
    ("info-truncated", ["info", "{sb}/truncated"], "model.safetensors"),
    ("info-no-config", ["info", "{sb}/noconfig"], "config.json"),
    ("unknown-command", ["nope"], "nope"),
    ("unknown-option", [*EST, "--fast"], "--fast"),
]
CLI_PARAMS = [pytest.param(*case, id=case[0]) for case in CLI_CASES] + [
    pytest.param("estimate-device-cuda", _with(EST, "--device", "cuda"), "--device", marks=NO_GPU, id="cuda"),
    pytest.param(
        "train-out-readonly",
        _with(TRAIN, "--out", "{sb}/readonly/run"),
        "--out",
        marks=ROOT_USER,
        id="train-out-readonly",
    ),  # fmt: skip
    pytest.param(
        "sweep-db-readonly", _with(SWEEP, "--db", "{sb}/readonly/r.db"), "--db", marks=ROOT_USER, id="sweep-db-readonly"
    ),  # fmt: skip
]


def _command(argv: list[str]) -> str:
    return next((a for a in argv if not a.startswith("-")), "")


@pytest.mark.parametrize(("case", "argv", "names"), CLI_PARAMS)
def test_cli_case_fails_cleanly(case: str, argv: list[str], names: str, unchanged: Path, capsys) -> None:
    args = [a.replace("{sb}", str(unchanged)) for a in argv]
    try:
        status = main(args)
    except SystemExit as exc:  # argparse's usage errors
        status = exc.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert status == 2, (case, status, err, captured.out[-500:])
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"vaefast {_command(args)}: error: ") or err.startswith("vaefast: error: "), err
    assert names.lower() in err.lower(), (names, err)


def test_the_cli_table_is_large() -> None:
    assert len(CLI_CASES) >= 60 and len({c[0] for c in CLI_CASES}) == len(CLI_CASES)


def test_debug_shows_the_traceback(sandbox: Path) -> None:
    with pytest.raises(ValueError, match="not a vaefast results database"):
        main(["--debug", "verify", str(sandbox / "notdb.csv")])
    with pytest.raises(ValueError, match="not a vaefast results database"):
        main(["export", str(sandbox / "notdb.csv"), "--csv", str(sandbox / "x.csv"), "--debug"])


# --- the library -------------------------------------------------------------------------------------------------
class _Broken(LinearGaussianVAE):
    """The linear-Gaussian VAE with one defect."""

    def __init__(self, defect: str) -> None:
        super().__init__(input_dim=12, latent_dim=3, sigma=0.3, decoder_scale=1.5, seed=0)
        self.defect = defect

    def encode(self, x):
        mu, logvar = super().encode(x)
        if self.defect == "encode-one":
            return mu
        if self.defect == "encode-shape":
            return mu[:, :2], logvar[:, :2]
        return mu, logvar

    def decode(self, z):
        g = super().decode(z)
        if self.defect == "decode-shape":
            return g[:, :5]
        if self.defect == "decode-nan":
            return g * float("nan")
        return g


def _nan_weights() -> LinearGaussianVAE:
    model = LinearGaussianVAE(input_dim=12, latent_dim=3, seed=0)
    with torch.no_grad():
        next(iter(model.parameters())).view(-1)[0] = float("inf")
    return model


def _x12(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5 + 0.25


def _sweep(sb: Path, *, models=None, points=None, radii=(0.5,), db=None, **kw) -> Callable[[], object]:
    from vaefast.sweep import run_sweep

    settings = {**TINY, **kw}
    settings.pop("radii")
    models = {"lg": LinearGaussianVAE(input_dim=12, latent_dim=3, seed=0)} if models is None else models
    points = _x12() if points is None else points
    return lambda: run_sweep(models, points, radii, sb / "new.db" if db is None else db, progress=False, **settings)


def _estimate(model=None, x=None, radii=(0.5,), **kw) -> Callable[[], object]:
    from vaefast import estimate_r_robustness

    model = LinearGaussianVAE(input_dim=12, latent_dim=3, seed=0) if model is None else model
    x = _x12() if x is None else x
    return lambda: estimate_r_robustness(model, x, radii, **{"num_samples": 16, **kw})


def _call(module: str, name: str, *args, **kw) -> Callable[[], object]:
    import importlib

    return lambda: getattr(importlib.import_module(module), name)(*args, **kw)


def _api_cases(sb: Path) -> list[tuple[str, Callable[[], object], type[BaseException], str]]:
    """``(id, call, exception type, text the one-line message names)``."""
    from vaefast.demo import DemoConfig
    from vaefast.sweep import PointSet

    x = _x12()
    meta = torch.empty(2, 12, device="meta")
    lg = LinearGaussianVAE(input_dim=12, latent_dim=3, seed=0)
    run = str(sb / "run")
    verify, export, report = "vaefast.verify", "vaefast.store", "vaefast.report"
    db, demo = sb / "results.db", "vaefast.demo"
    # fmt: off
    return [
        # run_sweep: the database, the points, the radii, every setting, the models
        ("sweep-radii-text", _sweep(sb, radii="0.5"), ValueError, "radii"),
        ("sweep-radii-empty", _sweep(sb, radii=[]), ValueError, "radii"),
        ("sweep-radii-repeated", _sweep(sb, radii=[0.5, 0.5]), ValueError, "radii"),
        ("sweep-radii-nan", _sweep(sb, radii=[float("nan")]), ValueError, "radii"),
        ("sweep-radii-dict", _sweep(sb, radii={"r": 1}), TypeError, "radii"),
        ("sweep-db-int", _sweep(sb, db=123), TypeError, "db"),
        ("sweep-db-folder", _sweep(sb, db=sb / "folder.db"), ValueError, "folder.db"),
        ("sweep-db-under-file", _sweep(sb, db=sb / "afile" / "r.db"), ValueError, "afile"),
        ("sweep-db-csv", _sweep(sb, db=sb / "notdb.csv"), ValueError, "notdb.csv"),
        ("sweep-db-old-schema", _sweep(sb, db=sb / "old.db"), ValueError, "schema"),
        ("sweep-points-int64", _sweep(sb, points=torch.zeros(2, 12, dtype=torch.int64)), TypeError, "points"),
        ("sweep-points-nan", _sweep(sb, points=x.clone().fill_(float("nan"))), ValueError, "points"),
        ("sweep-points-outside-box", _sweep(sb, points=x + 5), ValueError, "points"),
        ("sweep-points-meta", _sweep(sb, points=meta), ValueError, "points"),
        ("sweep-points-empty", _sweep(sb, points=x[:0]), ValueError, "points"),
        ("sweep-points-list", _sweep(sb, points=[[0.5] * 12]), TypeError, "points"),
        ("sweep-points-wrong-shape", _sweep(sb, points=torch.rand(2, 7, dtype=torch.float64)), ValueError, "points"),
        ("sweep-points-repeated-indices", lambda: PointSet(x, indices=[0, 0]), ValueError, "indices"),
        ("sweep-margin-unknown", _sweep(sb, margin={"bogus": 1}), TypeError, "bogus"),
        ("sweep-margin-steps-0", _sweep(sb, margin={"steps": 0}), ValueError, "steps"),
        ("sweep-margin-type", _sweep(sb, margin=3), TypeError, "margin"),
        ("sweep-samples-huge", _sweep(sb, num_samples=10**12), ValueError, "num_samples"),
        ("sweep-samples-0", _sweep(sb, num_samples=0), ValueError, "num_samples"),
        ("sweep-samples-float", _sweep(sb, num_samples=32.0), TypeError, "num_samples"),
        ("sweep-confidence-1", _sweep(sb, confidence=1.0), ValueError, "confidence"),
        ("sweep-seed-negative", _sweep(sb, seed=-1), ValueError, "seed"),
        ("sweep-batch-size-0", _sweep(sb, batch_size=0), ValueError, "batch_size"),
        ("sweep-eps-negative", _sweep(sb, attack_eps=[-1.0]), ValueError, "attack_eps"),
        ("sweep-curve-radii", _sweep(sb, attack_eps=[0.1], curve_radii=[9.0]), ValueError, "curve_radii"),
        ("sweep-unknown-setting", _sweep(sb, fast=True), TypeError, "fast"),
        ("sweep-resume-text", _sweep(sb, resume="yes"), TypeError, "resume"),
        ("sweep-spec-type", _sweep(sb, spec="fast"), TypeError, "spec"),
        ("sweep-device", _sweep(sb, device="tpu"), ValueError, "device"),
        ("sweep-models-empty", _sweep(sb, models={}), ValueError, "models"),
        ("sweep-model-name", _sweep(sb, models={"a|b": lg}), ValueError, "model names"),
        ("sweep-model-int", _sweep(sb, models={"m": 123}), TypeError, "models['m']"),
        ("sweep-model-nan", _sweep(sb, models={"m": _nan_weights()}), ValueError, "models['m']"),
        ("sweep-model-decode-shape", _sweep(sb, models={"m": _Broken("decode-shape")}), ValueError, "decode"),
        ("sweep-model-decode-nan", _sweep(sb, models={"m": _Broken("decode-nan")}), ValueError, "decode"),
        ("sweep-model-encode-one", _sweep(sb, models={"m": _Broken("encode-one")}), TypeError, "encode"),
        ("sweep-model-encode-shape", _sweep(sb, models={"m": _Broken("encode-shape")}), ValueError, "encode"),
        ("sweep-model-missing-folder", _sweep(sb, models={"m": str(sb / "nothere")}), FileNotFoundError, "nothere"),
        ("sweep-model-truncated", _sweep(sb, models={"m": str(sb / "truncated")}), ValueError, "model.safetensors"),
        # the estimators
        ("estimate-x-int", _estimate(x=torch.zeros(2, 12, dtype=torch.int64)), TypeError, "x"),
        ("estimate-x-nan", _estimate(x=x * float("nan")), ValueError, "x"),
        ("estimate-x-meta", _estimate(x=meta), ValueError, "x"),
        ("estimate-x-shape", _estimate(x=torch.rand(2, 5, dtype=torch.float64)), ValueError, "x"),
        ("estimate-x-empty", _estimate(x=x[:0]), ValueError, "x"),
        ("estimate-radii-text", _estimate(radii="0.5"), TypeError, "radii"),
        ("estimate-radii-negative", _estimate(radii=[-1.0]), ValueError, "radii"),
        ("estimate-samples-0", _estimate(num_samples=0), ValueError, "num_samples"),
        ("estimate-samples-huge", _estimate(num_samples=10**12), ValueError, "num_samples"),
        ("estimate-confidence-0", _estimate(confidence=0.0), ValueError, "confidence"),
        ("estimate-seed-negative", _estimate(seed=-1), ValueError, "seed"),
        ("estimate-model-object", _estimate(model=object()), TypeError, "model"),
        ("estimate-model-nan", _estimate(model=_nan_weights()), ValueError, "model"),
        ("estimate-model-decode-shape", _estimate(model=_Broken("decode-shape")), ValueError, "decode"),
        ("estimate-delta-shape", _estimate(delta=torch.zeros(3, 12, dtype=torch.float64)), ValueError, "delta"),
        ("estimate-max-memory", _estimate(max_memory=-1), ValueError, "max_memory"),
        ("bound-r-0", _call("vaefast", "margin_bound", lg, x, 0.0), ValueError, "r"),
        ("bound-estimate-type", _call("vaefast", "margin_bound", lg, x, 0.5, estimate="e"), TypeError, "estimate"),
        ("margin-r-negative", _call("vaefast", "numerical_margin", lg, x, -0.5), ValueError, "r"),
        ("sequential-samples-0", _call("vaefast", "is_r_robust", lg, x, 0.5, max_samples=0), ValueError,
         "max_samples"),
        ("sequential-confidence", _call("vaefast", "is_r_robust", lg, x, 0.5, confidence=2.0), ValueError,
         "confidence"),
        ("options-steps-0", _call("vaefast.core.options", "MarginOptions", steps=0), ValueError, "steps"),
        ("options-method", _call("vaefast.core.options", "MarginOptions", method="newton"), ValueError, "method"),
        # verify, export, report, analysis: read-only opens
        ("verify-empty-file", _call(verify, "verify_sweep", sb / "zero.db"), ValueError, "zero.db"),
        ("verify-missing", _call(verify, "verify_sweep", sb / "nothere.db"), FileNotFoundError, "nothere"),
        ("verify-folder", _call(verify, "verify_sweep", sb / "folder.db"), ValueError, "folder.db"),
        ("verify-db-int", _call(verify, "verify_sweep", 123), TypeError, "db"),
        ("verify-factor-0", _call(verify, "verify_sweep", db, factor=0), ValueError, "factor"),
        ("verify-confidence", _call(verify, "verify_sweep", db, confidence=1.5), ValueError, "confidence"),
        ("verify-sample-0", _call(verify, "verify_sweep", db, sample=0), ValueError, "sample"),
        ("verify-seed", _call(verify, "verify_sweep", db, seed=-2), ValueError, "seed"),
        ("verify-unknown-model", _call(verify, "verify_sweep", db, models={"zz": run}), ValueError, "zz"),
        ("export-empty-file", _call(export, "export", sb / "zero.db", csv_path=sb / "o.csv"), ValueError, "zero.db"),
        ("export-no-output", _call(export, "export", db), ValueError, "csv_path"),
        ("export-csv-folder", _call(export, "export", db, csv_path=sb / "folder.db"), ValueError, "csv_path"),
        ("export-table", _call(export, "export", db, csv_path=sb / "o.csv", table="x"), ValueError, "table"),
        ("report-empty-file", _call(report, "write_report", sb / "zero.db", sb / "rep"), ValueError, "zero.db"),
        ("report-out-file", _call(report, "write_report", db, sb / "afile"), ValueError, "out"),
        ("analysis-empty-file", _call("vaefast.analysis", "load", sb / "zero.db"), ValueError, "zero.db"),
        ("store-readonly-empty", _call(export, "connect", sb / "zero.db", readonly=True), ValueError, "zero.db"),
        # data and model files
        ("data-corrupt-mnist", _call("vaefast.data", "load", "mnist", "train", sb / "mnist"), ValueError, "idx"),
        ("data-corrupt-cifar", _call("vaefast.data", "load", "cifar10", "test", sb / "cifar"), ValueError,
         "test_batch"),
        ("data-unknown", _call("vaefast.data", "load", "imagenet"), ValueError, "name"),
        ("data-split", _call("vaefast.data", "load", "digits", "val"), ValueError, "split"),
        ("model-truncated", _call("vaefast.models", "load", sb / "truncated"), ValueError, "model.safetensors"),
        ("model-no-config", _call("vaefast.models", "load", sb / "noconfig"), FileNotFoundError, "config.json"),
        # training and the demo: every setting before any work or folder
        ("train-epochs-0", _call("vaefast.training", "train", VAE(VAEConfig(hidden=(4,), latent_dim=2)),
         torch.rand(8, 1, 8, 8), epochs=0, out=sb / "newrun"), ValueError, "epochs"),
        ("demo-samples-0", _call(demo, "run_demo", sb / "demo", DemoConfig(num_samples=0)), ValueError, "num_samples"),
        ("demo-epochs-0", _call(demo, "run_demo", sb / "demo", DemoConfig(epochs=0)), ValueError, "epochs"),
        ("demo-points-0", _call(demo, "run_demo", sb / "demo", DemoConfig(points=0)), ValueError, "points"),
        ("demo-out-file", _call(demo, "run_demo", sb / "afile", DemoConfig()), ValueError, "out"),
        ("demo-margin-unknown", _call(demo, "run_demo", sb / "demo", DemoConfig(margin={"x": 1})), TypeError,
         "margin"),
        ("as-vae-decoder-output", _call("vaefast", "as_vae", torch.nn.Identity(), torch.nn.Identity()), TypeError,
         "decoder_output"),
    ]
    # fmt: on


API_IDS = [c[0] for c in _api_cases(Path("/nonexistent"))]


@pytest.mark.parametrize("case", API_IDS)
def test_api_case_fails_cleanly(case: str, unchanged: Path) -> None:
    (_, call, kind, names), *_ = [c for c in _api_cases(unchanged) if c[0] == case]
    with pytest.raises(kind) as info:
        call()
    message = str(info.value)
    assert "\n" not in message.strip(), message
    assert names.lower() in message.lower(), (names, message)


def test_the_api_table_is_large() -> None:
    assert len(API_IDS) >= 60 and len(set(API_IDS)) == len(API_IDS)
