"""The distributions, as a packager builds them: an sdist of this checkout that carries every source the build needs,
and a CPU wheel built from that unpacked sdist (one compile for the whole suite: about 40-80 s on 2 cores) holding
``_C``, the record of the torch it was built against, the package data, every module and the ``vaefast`` command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

import vaefast

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("*.h", "*.cpp", "*.cu")


def _run(args: list[str], cwd: Path, log: Path) -> None:
    """Run a build step (compile-only CPU kernels, 2 jobs); on failure show the end of its log."""
    env = {**os.environ, "FORCE_ONLY_CPU": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    with open(log, "w") as out:
        done = subprocess.run(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    assert done.returncode == 0, log.read_text()[-4000:]


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist of this checkout and the wheel built from it after unpacking (no build isolation: this torch)."""
    tmp = tmp_path_factory.mktemp("dist")
    start = time.perf_counter()
    code = "import sys, setuptools.build_meta as b; b.build_sdist(sys.argv[1])"
    _run([sys.executable, "-c", code, str(tmp)], ROOT, tmp / "sdist.log")
    (sdist,) = tmp.glob("vaefast-*.tar.gz")
    with tarfile.open(sdist) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12 / 3.11.4
        tar.extractall(tmp / "unpacked", **safe)
    (source,) = (tmp / "unpacked").iterdir()
    sdist_seconds = time.perf_counter() - start
    pip = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp / "wheel")]
    _run([*pip, str(source)], tmp, tmp / "wheel.log")
    (wheel,) = (tmp / "wheel").glob("vaefast-*.whl")
    print(f"sdist {sdist_seconds:.1f} s, CPU wheel from it {time.perf_counter() - start - sdist_seconds:.1f} s")
    return {"sdist": sdist, "wheel": wheel, "tmp": tmp}


def _tree(folder: str, patterns: tuple[str, ...]) -> set[str]:
    """The checkout's files under ``folder`` matching ``patterns``, relative to the root."""
    found = {p for pattern in patterns for p in (ROOT / folder).rglob(pattern) if "__pycache__" not in p.parts}
    return {p.relative_to(ROOT).as_posix() for p in found}


def test_sdist_carries_every_source(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = _tree("csrc", SOURCES) | _tree("vaefast", ("*.py",)) | {"vaefast/py.typed", "LICENSE", "README.md"}
    assert {"csrc/common/activations.h", "csrc/cuda/sphere_hits.cu", "csrc/ops.cpp"} <= wanted
    assert wanted <= names, sorted(wanted - names)
    assert not [n for n in names if n.endswith((".so", ".pyd")) or n.endswith("_build.json")], names


def test_wheel_from_sdist_holds_extension_data_and_command(dists: dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
        info = f"vaefast-{vaefast.__version__}.dist-info"
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
        metadata = whl.read(f"{info}/METADATA").decode()
        record = json.loads(whl.read("vaefast/_build.json"))
    assert [n for n in names if n.startswith("vaefast/_C") and n.endswith(".so")], sorted(names)
    assert record == {"torch": torch.__version__, "cuda": None}
    assert "vaefast/py.typed" in names
    assert _tree("vaefast", ("*.py",)) <= names
    assert "vaefast = vaefast.cli:main" in entry_points
    assert f"\nVersion: {vaefast.__version__}\n" in metadata
    core = {line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")}
    assert {"numpy", "scipy", "tqdm", "safetensors"} <= core and "matplotlib" not in core
    assert {'matplotlib; extra == "report"', 'scikit-learn; extra == "data"', 'diffusers; extra == "diffusers"'} <= core


def test_wheel_runs_its_compiled_ops_and_command(dists: dict[str, Path]) -> None:
    """The unpacked wheel alone on the path: its _C loads, and the ``vaefast`` entry point prints the version."""
    site = dists["tmp"] / "site"
    with zipfile.ZipFile(dists["wheel"]) as whl:
        whl.extractall(site)
    script = textwrap.dedent(
        """
        import contextlib, io, sys
        from importlib import metadata
        import vaefast
        assert vaefast.__file__.startswith(sys.argv[1]), vaefast.__file__
        assert vaefast.has_compiled_ops() and metadata.version("vaefast") == vaefast.__version__
        (command,) = metadata.entry_points(group="console_scripts", name="vaefast")
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            command.load()(["--version"])
        print(out.getvalue().strip())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    args = [sys.executable, "-W", "error::RuntimeWarning", "-c", script, str(site)]
    done = subprocess.run(args, cwd=dists["tmp"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"vaefast {vaefast.__version__}"


MISSING_EXTRAS = """
import sys
for name in ("matplotlib", "sklearn", "sklearn.datasets", "sklearn.model_selection"):
    sys.modules[name] = None  # as if not installed
import vaefast
from vaefast._extras import MissingExtraError
from vaefast.cli import main
for extra, call in {"report": lambda: vaefast.report.write_report("r.db", "out"),
                    "data": lambda: vaefast.data.load("digits")}.items():
    try:
        call()
    except MissingExtraError as exc:
        print(exc)
sys.exit(main(["report", "r.db"]))
"""


def test_a_missing_extra_is_one_line_naming_it(tmp_path) -> None:
    """Without matplotlib and scikit-learn the report and the digits say which extra to install, in one line; the
    command line prints it as its one error line (exit status 2)."""
    done = subprocess.run([sys.executable, "-c", MISSING_EXTRAS], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "the report needs matplotlib, which is not installed: pip install 'vaefast[report]'",
        "the digits dataset needs scikit-learn, which is not installed: pip install 'vaefast[data]'",
    ]
    assert done.stderr.strip() == (
        "vaefast report: error: the report needs matplotlib, which is not installed: pip install 'vaefast[report]'"
    )
