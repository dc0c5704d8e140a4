"""Shared fixtures and the device parametrisation of the test suite.

- Devices (as torchvision's test_ops runs each op on CPU and CUDA): a test that takes a ``device`` argument runs once
  on ``"cpu"`` and once on ``"cuda"``; the CUDA case carries the ``gpu`` marker and, like every ``gpu`` test, is
  skipped with its reason unless a GPU is visible and ``vaefast._C`` was built with CUDA kernels.
- ``devices``: the devices available here (``["cpu"]`` or ``["cpu", "cuda"]``).
- ``linear_vae``: the default :class:`~vaefast.testing.LinearGaussianVAE` (D = 12, d = 3, sigma = 0.3, w = 1.5,
  seed 0, float64), the ground truth of the estimator and margin tests.
- ``digits``: the (train, test) splits of the embedded 8x8 digits.
- ``digits_vae`` / ``digits_vae_run``: a small MLP VAE trained on 800 digits for 10 epochs, and the folder it is
  saved in (for the command-line tests).

Markers (registered in pyproject.toml): ``gpu`` (needs CUDA), ``slow`` (training or long statistical tests).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

import vaefast
from vaefast.data import DataSplit
from vaefast.testing import LinearGaussianVAE

CUDA_SKIP_REASON = "needs a visible CUDA GPU and vaefast._C built with CUDA kernels"


def cuda_usable() -> bool:
    """Whether the CUDA cases can run: a visible GPU and compiled CUDA kernels."""
    return torch.cuda.is_available() and vaefast.compiled_with_cuda()


def _parametrized_names(metafunc: pytest.Metafunc) -> set[str]:
    """The argument names a test already parametrises itself."""
    names: set[str] = set()
    for marker in metafunc.definition.iter_markers("parametrize"):
        args = marker.args[0]
        if isinstance(args, str):
            args = args.split(",")
        names.update(a.strip() for a in args)
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test with a ``device`` argument on CPU and on CUDA (the latter marked ``gpu``)."""
    if "device" in metafunc.fixturenames and "device" not in _parametrized_names(metafunc):
        metafunc.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests, with the reason, where CUDA cannot run."""
    if cuda_usable():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def devices() -> list[str]:
    """The devices every op test runs on here."""
    return ["cpu", "cuda"] if cuda_usable() else ["cpu"]


@pytest.fixture(scope="session")
def linear_vae() -> LinearGaussianVAE:
    """The default linear-Gaussian VAE (read-only: tests must not change its weights)."""
    return LinearGaussianVAE(input_dim=12, latent_dim=3, sigma=0.3, decoder_scale=1.5, seed=0)


@pytest.fixture(scope="session")
def digits() -> tuple[DataSplit, DataSplit]:
    """The digits' (train, test) splits."""
    from vaefast import data

    return data.load("digits"), data.load("digits", "test")


@pytest.fixture(scope="session")
def digits_vae(digits: tuple[DataSplit, DataSplit]) -> torch.nn.Module:
    """A small Bernoulli MLP VAE (hidden 64, latent 4) trained on the first 800 training digits, in eval mode."""
    from vaefast.models import VAE, VAEConfig
    from vaefast.training import train

    model = VAE(VAEConfig(hidden=(64,), latent_dim=4), seed=0)
    train(model, digits[0].x[:800], epochs=10, batch_size=64, lr=3e-3, seed=0, progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def digits_vae_run(digits_vae: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder ``digits_vae`` is saved in (``config.json`` + ``model.safetensors``)."""
    from vaefast.models import save as save_model

    run = tmp_path_factory.mktemp("digits_vae")
    save_model(digits_vae, run)
    return run


def count_units(db: Path) -> int:
    """Committed work units in a results database (0 while it does not exist or is locked)."""
    try:
        conn = sqlite3.connect(db, timeout=1)
        try:
            return conn.execute("SELECT COUNT(*) FROM units").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0
