"""Loads the compiled core ``vaefast._C``; without it vaefast runs on the pure-PyTorch reference."""

from __future__ import annotations

import importlib
import warnings

import torch

_LOAD_ERROR: str | None = None

try:
    importlib.import_module("vaefast._C")  # registers torch.ops.vaefast.*
except ImportError as exc:  # a CPU-only / source checkout without a build still imports (cf. pytorch_scatter)
    _LOAD_ERROR = str(exc)
    warnings.warn(
        f"vaefast: compiled ops unavailable ({exc}); using the pure-PyTorch reference implementations. "
        "Build them with `pip install --no-build-isolation -e .`.",
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
