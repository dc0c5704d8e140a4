"""The command line's contract: one-line errors with exit status 2, --version, lazy submodules, run folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vaefast
from vaefast._checks import check_device
from vaefast.cli import main

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
TINY = ["--data", "digits", "--hidden", "16", "--latent", "2", "--no-progress", "--iw-samples", "2"]


def one_error_line(capsys: pytest.CaptureFixture, command: str) -> str:
    """The single stderr line of a failed command (checked to be exactly one ``vaefast CMD: error: ...`` line)."""
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith(f"vaefast {command}: error: "), err
    return err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    return out


# --- version and lazy submodules ----------------------------------------------------------------------------------
def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"vaefast {vaefast.__version__}"
    done = subprocess.run([sys.executable, "-m", "vaefast", "--version"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == f"vaefast {vaefast.__version__}", done.stderr


def test_submodules_are_lazy_attributes_without_matplotlib() -> None:
    code = """
import sys
import vaefast
assert "matplotlib" not in sys.modules
assert vaefast.models.VAE is vaefast.VAE
vaefast.attacks.MaxDamageAttack, vaefast.testing.LinearGaussianVAE, vaefast.data.load
assert "matplotlib" not in sys.modules, "vaefast.models/attacks/testing/data imported matplotlib"
for name in sorted(vaefast.public_submodules() - {"plots"}):
    assert getattr(vaefast, name).__name__ == "vaefast." + name
    assert "matplotlib" not in sys.modules, f"vaefast.{name} imported matplotlib"
assert vaefast.plots.__name__ == "vaefast.plots" and "matplotlib" in sys.modules
assert vaefast.public_submodules() <= set(dir(vaefast))
try:
    vaefast.no_such_thing
except AttributeError as exc:
    assert "no_such_thing" in str(exc)
else:
    raise AssertionError("no AttributeError")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_public_submodules() -> None:
    wanted = {"models", "attacks", "testing", "data", "ops", "jacobian", "robustness", "margin", "sweep", "store"}
    wanted |= {"report", "plots", "training", "stats", "reference", "cli"}
    assert wanted <= vaefast.public_submodules()
    assert not any(name.startswith("_") for name in vaefast.public_submodules())


# --- --device ----------------------------------------------------------------------------------------------------
def test_check_device() -> None:
    assert check_device("--device", "cpu") == torch.device("cpu")
    assert check_device("--device", torch.device("cpu")) == torch.device("cpu")
    assert check_device("--device", "auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "mps", "", "cpu:3"):
        with pytest.raises(ValueError, match=r"--device must be one of \['cpu', 'cuda', 'cuda:N', 'auto'\]"):
            check_device("--device", bad)
    with pytest.raises(TypeError, match="device must be a str or torch.device"):
        check_device("device", 0)
    with pytest.raises(ValueError, match=r"cuda:99: only \d+ CUDA device|cuda:99: no CUDA GPU is visible"):
        check_device("--device", "cuda:99")


@NO_GPU
def test_check_device_cuda_without_gpu() -> None:
    with pytest.raises(ValueError, match=r"^--device cuda: no CUDA GPU is visible .*; use --device cpu$"):
        check_device("--device", "cuda")
    with pytest.raises(ValueError, match=r"device='cpu'"):
        check_device("device", torch.device("cuda"))


@NO_GPU
@pytest.mark.parametrize("command", ["estimate", "margin"])
def test_device_cuda_without_gpu_is_one_clear_line(run_dir: Path, capsys: pytest.CaptureFixture, command: str) -> None:
    assert main([command, str(run_dir), "--r", "1.0", "--points", "2", "--device", "cuda"]) == 2
    err = one_error_line(capsys, command)
    assert "--device cuda: no CUDA GPU is visible" in err and "corrupt" not in err


@NO_GPU
def test_train_device_cuda_without_gpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", *TINY, "--epochs", "1", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "--device cuda: no CUDA GPU is visible" in one_error_line(capsys, "train")
    assert not (tmp_path / "r").exists()


def test_device_auto(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["estimate", str(run_dir), "--r", "1.0", "--points", "2", "--samples", "16", "--device", "auto"]
    assert main(argv) == 0
    assert "2 points" in capsys.readouterr().out


# --- --points / --start ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--points", "1000"], "--points 1000 is more than digits/test holds from --start 0: 360 available"),
        (
            ["--points", "20", "--start", "350"],
            "--points 20 is more than digits/test holds from --start 350: 10 available",
        ),
        (["--points", "0"], "--points must be >= 1, got 0"),
        (["--points", "5", "--start", "360"], "--start 360 is past the end of digits/test (360 points)"),
    ],
)
def test_points_errors(run_dir: Path, capsys: pytest.CaptureFixture, extra: list[str], expected: str) -> None:
    assert main(["estimate", str(run_dir), "--r", "1.0", *extra]) == 2
    assert expected in one_error_line(capsys, "estimate")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--points", "0"], "--points must be >= 1, got 0"),
        (["--points", "5000"], "asked for 5000 points but digits/test holds only 360"),
        (["--points", "2", "--radii", "auto", "1.0"], "--radii: give numbers or 'auto' alone"),
    ],
)
def test_sweep_point_and_radii_errors(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], expected: str
) -> None:
    argv = ["sweep", "--model", f"m={run_dir}", "--db", str(tmp_path / "r.db"), "--no-progress"]
    if "--radii" not in extra:
        extra = [*extra, "--radii", "1.0"]
    assert main([*argv, *extra]) == 2
    assert expected in one_error_line(capsys, "sweep")
    assert not (tmp_path / "r.db").exists()


# --- report / export of something that is not a results database --------------------------------------------------
@pytest.mark.parametrize("command", ["report", "export"])
def test_csv_is_not_a_results_database(tmp_path: Path, capsys: pytest.CaptureFixture, command: str) -> None:
    csv_file = tmp_path / "est.csv"
    csv_file.write_text("point,r,p_hat\n0,1.0,0.5\n")
    extra = ["--out", str(tmp_path / "report")] if command == "report" else ["--csv", str(tmp_path / "x.csv")]
    assert main([command, str(csv_file), *extra]) == 2
    err = one_error_line(capsys, command)
    assert "est.csv" in err and "is not a vaefast results database" in err
    assert not (tmp_path / "report").exists() and not (tmp_path / "x.csv").exists()


# --- info validates the weights ------------------------------------------------------------------------------------
def test_info_truncated_weights(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["info", str(broken)]) == 2
    err = one_error_line(capsys, "info")
    assert "model.safetensors" in err and "corrupt or truncated" in err
    weights.unlink()
    assert main(["info", str(broken), "--json"]) == 2
    assert "no weights file" in one_error_line(capsys, "info")


def test_info_bad_metrics_json(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "metrics.json").write_text("{not json")
    assert main(["info", str(copy)]) == 2
    assert "metrics.json is not valid JSON" in one_error_line(capsys, "info")


# --- train: --force and the learned-nothing warning -----------------------------------------------------------------
def test_train_refuses_an_existing_run_without_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    out.mkdir()  # an empty folder is fine
    argv = ["train", *TINY, "--epochs", "1", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    before = (out / "metrics.json").read_text()
    assert main(argv) == 2
    err = one_error_line(capsys, "train")
    assert "--out" in err and "--force" in err and "already holds a run" in err
    assert (out / "metrics.json").read_text() == before
    for name in ("config.json", "model.safetensors"):  # any one of the run files is enough to refuse
        lone = tmp_path / f"lone-{name}"
        lone.mkdir()
        (lone / name).write_text("{}")
        assert main(["train", *TINY, "--epochs", "1", "--out", str(lone)]) == 2
        assert name in one_error_line(capsys, "train")
    assert main([*argv, "--seed", "1", "--force"]) == 0
    assert json.loads((out / "metrics.json").read_text())["seed"] == 1


def test_train_collapsed_model_warns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "collapsed"
    argv = ["train", "--data", "digits", "--beta", "50", "--likelihood", "bernoulli", "--epochs", "2"]
    assert (
        main([*argv, "--hidden", "64", "--latent", "4", "--no-progress", "--iw-samples", "2", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["warnings"]) == 2, metrics["warnings"]
    assert metrics["warnings"][0].startswith("posterior collapse")
    assert "not better than the trivial per-pixel-mean bernoulli baseline" in metrics["warnings"][1]
    assert max(metrics["test_kl_per_dim"]) < 0.01
    for warning in metrics["warnings"]:
        assert f"warning: {warning}" in printed.splitlines()
    assert main(["info", str(out)]) == 0
    assert "warning: posterior collapse" in capsys.readouterr().out


def test_train_informative_model_does_not_warn(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "informative"
    argv = ["train", "--data", "digits", "--likelihood", "gaussian", "--gaussian-std", "0.2", "--beta", "1"]
    assert main([*argv, "--epochs", "10", "--hidden", "64", "--latent", "4", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["warnings"] == [] and "warning" not in printed
    assert metrics["test_elbo"] > metrics["test_pixel_mean_baseline"] + 5
    assert "trivial baseline (per-pixel mean, gaussian likelihood)" in printed
