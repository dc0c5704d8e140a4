"""The demo end to end on tiny files written in the datasets' distribution formats, and its input errors.

MNIST / Fashion-MNIST: gzip-compressed IDX files (``train-images-idx3-ubyte.gz`` ...: 2 zero bytes, type 0x08,
the number of dimensions, big-endian uint32 sizes, then the bytes); CIFAR-10: pickled python batches
(``cifar-10-batches-py/data_batch_1`` ... ``data_batch_5`` and ``test_batch``, each a dict with ``b"data"``, uint8
``[N, 3072]`` channel-major, and ``b"labels"``). Each run uses the dataset's real architecture with tiny settings
(one epoch, a few points, few samples and attack steps) and narrower layers of the recipe's kind (MLP for the
28x28 sets, convolutional for CIFAR-10), so that it takes seconds; the recipes' own architectures are checked
separately.
"""

from __future__ import annotations

import gzip
import pickle
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from vaefast import analysis, report
from vaefast.cli import main
from vaefast.core.options import MarginOptions
from vaefast.demo import DATASETS, MODELS, RECIPES, DemoConfig, demo_models, resolve_points, run_demo, train_models

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
TINY = {
    "epochs": 1, "num_samples": 32, "margin": MarginOptions(tol=0.25, max_radius=2.0, steps=3, num_noise_samples=2),
}  # fmt: skip
SMALL_MLP = {"hidden": (32,), "latent_dim": 4}
SMALL_CONV = {"hidden": (8,), "latent_dim": 3, "conv_channels": (4,)}
TINY_CLI = [
    "--epochs",
    "1",
    "--samples",
    "32",
    "--tol",
    "0.25",
    "--max-radius",
    "2",
    "--attack-steps",
    "3",
    "--no-progress",
]
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 images: a bright random rectangle on a dark, noisy background (some structure to learn)."""
    x = rng.integers(0, 40, size=(n, *shape)).astype(np.uint8)
    h, w = shape[-2:]
    for img in x:
        top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[..., top : top + h // 2, left : left + w // 2] = rng.integers(150, 256)
    return x


def write_idx(path: Path, array: np.ndarray) -> None:
    """One gzip-compressed IDX file of unsigned bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def write_idx_dataset(root: Path, n_train: int = 64, n_test: int = 16, seed: int = 0) -> Path:
    """MNIST-format files (28x28 images, labels 0-9) in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = IDX_FILES[split]
        write_idx(root / images, _images(rng, n, (28, 28)))
        write_idx(root / labels, rng.integers(0, 10, size=n))
    return root


def write_cifar(root: Path, per_batch: int = 8, n_test: int = 4, seed: int = 0) -> Path:
    """CIFAR-10 python batches (five training batches and the test batch) in ``root/cifar-10-batches-py``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        batch = {b"data": _images(rng, n, (3, 32, 32)).reshape(n, 3072), b"labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (the real-set recipes keep torch's setting; tiny models on a shared machine want one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("data")
    return {
        "mnist": write_idx_dataset(base / "mnist", seed=1),
        "fashion-mnist": write_idx_dataset(base / "fashion", seed=2),
        "cifar10": write_cifar(base / "cifar"),
    }


def _check_run(res, data: str, points: int, models: int) -> None:
    """The database and report exist, the sweep covers every model and point, the paper's value is set beside."""
    assert res.db.exists() and res.page.exists() and res.dataset == data
    conn = sqlite3.connect(res.db)
    try:
        datasets = {row[0] for row in conn.execute("SELECT dataset FROM points")}
        n_points = conn.execute("SELECT COUNT(*) FROM points").fetchone()[0]
        n_results = conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    finally:
        conn.close()
    assert datasets == {data} and n_points == points
    assert n_results == models * points * len(res.radii)
    h = res.headline
    published = analysis.PUBLISHED_PEARSON[data]
    assert h["dataset"] == data and h["published_pearson"] == published
    line = report.format_published(h)
    assert f"published Pearson r = {published:.3f}" in line and f"on {data}: measured Pearson r = " in line
    assert line in report.format_headline(h)
    assert f"published Pearson r = {published:.3f}" in res.page.read_text()


# --- real formats, end to end ----------------------------------------------------------------------------------
def test_mnist_demo_from_idx_files(roots: dict[str, Path], tmp_path: Path) -> None:
    lines: list[str] = []
    config = DemoConfig(data="mnist", root=roots["mnist"], points=3, arch=SMALL_MLP, **TINY)
    res = run_demo(tmp_path / "out", config, progress=False, log=lines.append)
    _check_run(res, "mnist", 3, len(MODELS))  # an MLP with even widths: every model, the Lipschitz one included
    data = analysis.load(res.db)
    assert analysis.model_kind(data.models["lipschitz2"]) == "lipschitz"  # not a beta-VAE of beta 1 in the trends
    assert [n for n, i in data.models.items() if analysis.model_kind(i) == "beta-vae"] == ["beta1", "beta2", "beta4",
                                                                                             "beta8"]  # fmt: skip
    assert list(data.models)[-1] == "lipschitz2"  # listed after the beta family
    assert data.models["lipschitz2"]["config"]["lipschitz"] == {"mu": 2.0, "logvar": 2.0}
    cfg = data.models["beta1"]["config"]
    assert cfg["architecture"] == "mlp" and cfg["hidden"] == [32] and cfg["latent_dim"] == 4
    assert cfg["likelihood"] == "bernoulli" and cfg["input_shape"] == [1, 28, 28]  # the recipe's, under the override
    assert any(line.startswith("[demo] mnist: 64 training points, 3 of 16 test points") for line in lines)
    assert any("published Pearson r = 0.840" in line for line in lines)
    assert set(res.seconds) == {"training", "sweep", "verify", "report", "total"}


def test_cifar10_demo_from_python_batches(roots: dict[str, Path], tmp_path: Path) -> None:
    config = DemoConfig(data="cifar10", root=roots["cifar10"], points="all", arch=SMALL_CONV, **TINY)
    res = run_demo(tmp_path / "out", config, progress=False)
    _check_run(res, "cifar10", 4, len(MODELS) - 1)  # 'all' = the whole test batch; no Lipschitz convolutions
    cfg = analysis.load(res.db).models["tcvae4"]["config"]
    assert cfg["architecture"] == "conv" and cfg["input_shape"] == [3, 32, 32] and cfg["likelihood"] == "gaussian"


def test_cli_fashion_mnist_prints_the_published_correlation(roots, tmp_path, capsys, monkeypatch) -> None:
    """Failed starts first (a bad setting, corrupt files: one line, no folder, no training), then the corrected
    command succeeds."""
    recipe = RECIPES["fashion-mnist"]
    monkeypatch.setitem(RECIPES, "fashion-mnist", replace(recipe, arch={**recipe.arch, **SMALL_MLP}))
    out = tmp_path / "out"
    argv = ["demo", "--data", "fashion-mnist", "--root", str(roots["fashion-mnist"]), "--points", "3", *TINY_CLI]
    corrupt = tmp_path / "corrupt"
    shutil.copytree(roots["fashion-mnist"], corrupt)
    body = (corrupt / "t10k-images-idx3-ubyte.gz").read_bytes()
    (corrupt / "t10k-images-idx3-ubyte.gz").write_bytes(body[:40] + bytes(b ^ 0x5A for b in body[40:]))
    for extra, names in [(["--samples", "0"], "num_samples"), (["--epochs", "0"], "epochs"),
                         (["--attack-steps", "0"], "steps"), (["--root", str(corrupt)], "t10k-images")]:  # fmt: skip
        assert main([*argv, *extra, "--out", str(out)]) == 2
        assert names in _one_error_line(capsys) and not out.exists()
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "published Pearson r = 0.831" in printed and "on fashion-mnist: measured Pearson r = " in printed
    assert f"[demo] report: {out / 'report' / 'index.html'}" in printed
    assert (out / "results.db").exists() and (out / "report" / "index.html").exists()


def test_models_are_reused_only_for_the_same_data(roots: dict[str, Path], tmp_path: Path) -> None:
    """mnist and fashion-mnist share an architecture: the recipe records the data, so nothing is mixed up."""
    from vaefast.demo import load_demo_data

    logs: dict[str, list[str]] = {}
    for step, data in enumerate(("mnist", "mnist", "fashion-mnist")):
        config = DemoConfig(data=data, root=roots[data], epochs=1, arch=SMALL_MLP)
        logs[f"{step}:{data}"] = lines = []
        runs = train_models(tmp_path, config, load_demo_data(config), log=lines.append)
        assert sorted(runs) == sorted(MODELS) and all((p / "demo_recipe.json").exists() for p in runs.values())
    trained = {k: sum(line.startswith("[demo] trained") for line in v) for k, v in logs.items()}
    reused = {k: sum(line.startswith("[demo] reusing") for line in v) for k, v in logs.items()}
    assert trained == {"0:mnist": len(MODELS), "1:mnist": 0, "2:fashion-mnist": len(MODELS)}
    assert reused == {"0:mnist": 0, "1:mnist": len(MODELS), "2:fashion-mnist": 0}


def test_demo_models_keep_the_lipschitz_model_where_the_architecture_allows_it() -> None:
    """MLPs with even widths get the encoder-Lipschitz model; convolutions and odd widths (GroupSort pairs) do not."""
    from vaefast.models import VAEConfig

    for arch, expected in (
        (RECIPES["digits"].arch, set(MODELS)),
        (RECIPES["mnist"].arch, set(MODELS)),
        (RECIPES["cifar10"].arch, set(MODELS) - {"lipschitz2"}),
        ({**RECIPES["digits"].arch, "hidden": (15,)}, set(MODELS) - {"lipschitz2"}),
    ):
        models = demo_models(arch)
        assert set(models) == expected
        for obj in models.values():
            VAEConfig.from_dict({**arch, **obj})  # every model the demo keeps can be built


# --- the recipes ------------------------------------------------------------------------------------------------------
def test_real_dataset_recipes() -> None:
    """MLP VAEs 784-512-512-10 with a Bernoulli likelihood on the 28x28 sets, a conv VAE on CIFAR-10."""
    for data in ("mnist", "fashion-mnist"):
        arch = DemoConfig(data=data).model_arch()
        assert arch == {"input_shape": (1, 28, 28), "architecture": "mlp", "hidden": (512, 512), "latent_dim": 10,
                        "likelihood": "bernoulli"}  # fmt: skip
    arch = DemoConfig(data="cifar10").model_arch()
    assert arch["architecture"] == "conv" and arch["input_shape"] == (3, 32, 32) and arch["likelihood"] == "gaussian"
    for name, rec in RECIPES.items():
        assert rec.epochs >= 1 and rec.points >= 1, name
    assert DemoConfig(data="mnist", arch={"latent_dim": 4}).model_arch()["hidden"] == (512, 512)
    with pytest.raises(ValueError, match="unknown VAEConfig field"):
        DemoConfig(data="mnist", arch={"widths": (4,)}).model_arch()
    with pytest.raises(ValueError, match="latent_dim must be >= 1"):
        run_demo("unused", DemoConfig(data="mnist", arch={"latent_dim": 0}))


# --- the digits demo stays the default ----------------------------------------------------------------------------
def test_digits_is_the_default_demo() -> None:
    d = DemoConfig()
    assert d.data == "digits" and d.root is None and d.device == "cpu" and d.recipe() is RECIPES["digits"]
    rec = RECIPES["digits"]
    assert (rec.epochs, rec.batch_size, rec.lr, rec.points, rec.threads) == (40, 64, 2e-3, 48, 1)
    assert rec.arch == {"input_shape": (1, 8, 8), "architecture": "mlp", "hidden": (128, 128), "latent_dim": 8,
                        "likelihood": "gaussian", "gaussian_std": 0.2}  # fmt: skip
    assert (d.num_samples, d.batch_size, d.margin.tol, d.margin.steps) == (200, 16, 0.02, 20)
    assert set(DATASETS) == {"digits", "mnist", "fashion-mnist", "cifar10"}


def test_digits_demo_tiny(tmp_path: Path) -> None:
    config = DemoConfig(points=4, **TINY)
    torch.set_num_threads(2)
    res = run_demo(tmp_path / "out", config, progress=False)
    assert torch.get_num_threads() == 2  # the digits recipe runs on one thread; the caller's count is restored
    assert res.db.exists() and res.page.exists() and res.dataset == "digits" and res.device == "cpu"
    h = res.headline
    assert h["dataset"] == "digits" and h["published_pearson"] is None
    assert report.format_published(h) == "" and "published Pearson" not in report.format_headline(h)
    assert "Against the paper" not in res.page.read_text()


# --- bad inputs: one clear error, before any training ----------------------------------------------------------------
def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("vaefast demo: error: "), err
    return err


@pytest.mark.parametrize("data", ["mnist", "fashion-mnist", "cifar10"])
def test_cli_missing_files(data: str, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["demo", "--data", data, "--root", str(empty), "--out", str(tmp_path / "out"), *TINY_CLI]) == 2
    err = _one_error_line(capsys)
    assert f"{data} test files not found" in err and str(empty) in err
    assert not (tmp_path / "out" / "runs").exists()


def test_cli_too_many_points(roots: dict[str, Path], tmp_path: Path, capsys) -> None:
    argv = ["demo", "--data", "mnist", "--root", str(roots["mnist"]), "--points", "17", "--out", str(tmp_path / "o")]
    assert main([*argv, *TINY_CLI]) == 2
    assert "points 17 is more than mnist/test holds (16 points)" in _one_error_line(capsys)
    assert not (tmp_path / "o" / "runs").exists()


@NO_GPU
def test_cli_cuda_without_gpu(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--device", "cuda", "--out", str(tmp_path / "o"), *TINY_CLI]) == 2
    assert "--device cuda: no CUDA GPU is visible" in _one_error_line(capsys)


@NO_GPU
def test_library_cuda_without_gpu(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="device cuda: no CUDA GPU is visible"):
        run_demo(tmp_path / "o", DemoConfig(device="cuda"), progress=False)


def test_cli_root_for_digits_and_bad_points(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--root", str(tmp_path), "--out", str(tmp_path / "o"), *TINY_CLI]) == 2
    assert "'digits' is generated in memory; root must be None" in _one_error_line(capsys)
    assert main(["demo", "--points", "0", "--out", str(tmp_path / "o"), *TINY_CLI]) == 2
    assert "points must be >= 1, got 0" in _one_error_line(capsys)


def test_library_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data must be one of"):
        run_demo(tmp_path, DemoConfig(data="shapes"))
    with pytest.raises(ValueError, match="points must be a positive int or 'all'"):
        resolve_points("some", 48, 360, "digits/test")
    assert resolve_points(None, 48, 360, "digits/test") == 48
    assert resolve_points(None, 100, 16, "mnist/test") == 16  # the default is capped to a small split
    assert resolve_points("all", 48, 360, "digits/test") == 360
