"""Loads the compiled core ``vaefast._C``; without it vaefast runs on the pure-PyTorch reference.

The extension is compiled against one torch: torch's C++ ABI changes between releases, so an extension loaded into
another release may fail with an undefined symbol, or load and run against an ABI it was not built for. The build
records what it compiled against in ``_build.json`` beside ``_C`` (see setup.py); an extension recorded against another
major.minor release (or, with CUDA kernels, another CUDA version) is not loaded, and the warning says how to rebuild.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import torch

BUILD_INFO = Path(__file__).with_name("_build.json")
REBUILD = (
    "rebuild it against the installed torch: `pip install --no-build-isolation --no-deps --force-reinstall "
    "--no-binary vaefast vaefast` (from a clone: `pip install --no-build-isolation -e .` or scripts/bootstrap.sh)"
)

_LOAD_ERROR: str | None = None


def built_against() -> dict[str, str | None] | None:
    """What the compiled extension was built against, as recorded by the build.

    Returns:
        ``{"torch": version, "cuda": version or None}``, or None when nothing was recorded (no build, or a build
        by an older setup.py).
    """
    try:
        return json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return None


def _release(version: str) -> tuple[str, ...]:
    """``major.minor`` of a torch version (``"2.14.1+cu130"`` -> ``("2", "14")``)."""
    return tuple(version.split("+")[0].split(".")[:2])


def torch_mismatch(record: dict[str, str | None] | None) -> str | None:
    """Why an extension built as ``record`` says must not be loaded into this torch.

    Args:
        record: :func:`built_against`'s answer.

    Returns:
        ``"built against torch A, running torch B"`` when the torch releases differ in major or minor version (torch's
        C++ ABI changes between them), or when the extension has CUDA kernels and this torch another CUDA version (or
        none); else None (no record, or a patch release apart).
    """
    if record is None or not record.get("torch"):
        return None
    cuda = record.get("cuda")
    if _release(record["torch"]) == _release(torch.__version__) and (cuda is None or cuda == torch.version.cuda):
        return None
    return f"built against torch {record['torch']}, running torch {torch.__version__}"


def _load() -> str | None:
    """Import ``vaefast._C`` unless its record names another torch; the reason it is unavailable, or None."""
    record = built_against()
    mismatch = torch_mismatch(record)
    if mismatch is not None:
        return f"vaefast._C was {mismatch}; {REBUILD}"
    try:
        importlib.import_module("vaefast._C")  # registers torch.ops.vaefast.*
    except ImportError as exc:  # a CPU-only / source checkout without a build still imports (cf. pytorch_scatter)
        if record is None and "No module named" in str(exc):
            return f"{exc}; build it with `pip install --no-build-isolation -e .`"
        return f"{exc}; {REBUILD}"
    return None


_LOAD_ERROR = _load()
if _LOAD_ERROR is not None:
    warnings.warn(
        f"vaefast: compiled ops unavailable ({_LOAD_ERROR}); using the pure-PyTorch reference implementations "
        "(slower).",
        RuntimeWarning,
        stacklevel=2,
    )


def has_compiled_ops() -> bool:
    """Whether the compiled ops are available.

    Returns:
        True when the C++ extension ``vaefast._C`` is loaded and its operators are registered.
    """
    return _LOAD_ERROR is None


def compiled_with_cuda() -> bool:
    """Whether the compiled ops include CUDA kernels.

    Returns:
        True when the loaded extension contains CUDA kernels (whether or not a GPU is visible).
    """
    return has_compiled_ops() and bool(torch.ops.vaefast.compiled_with_cuda())
