"""Optional dependencies: the core needs torch, numpy, scipy, tqdm and safetensors; each extra of the package adds
what one feature needs (``report``: matplotlib, ``data``: scikit-learn, ``diffusers``: diffusers). A feature imports
its dependency through :func:`require`, so a missing one is a one-line error naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]

DISTRIBUTIONS = {"sklearn": "scikit-learn"}  # import name -> the package pip installs, where they differ


class MissingExtraError(ImportError):
    """An optional dependency of vaefast is not installed (the message names the extra that installs it)."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import an optional dependency of ``feature``.

    Args:
        module: the module to import (e.g. ``"matplotlib"``).
        extra: the vaefast extra that installs it (e.g. ``"report"``).
        feature: what needs it, for the message (e.g. ``"the report"``).

    Returns:
        The module.

    Raises:
        MissingExtraError: the module's package is not installed: ``<feature> needs <package>, which is not
            installed: pip install 'vaefast[<extra>]'``. An import error from inside an installed package is
            raised unchanged.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        if exc.name is None or exc.name.split(".")[0] != top:
            raise
        package = DISTRIBUTIONS.get(top, top)
        raise MissingExtraError(
            f"{feature} needs {package}, which is not installed: pip install 'vaefast[{extra}]'"
        ) from None
