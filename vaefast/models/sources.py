"""Where a model comes from, as one string (the command line's ``--model NAME=SOURCE``, a sweep's stored source):

- a run folder written by ``vaefast train`` / :func:`vaefast.models.save` (the default);
- ``diffusers:PATH``: a diffusers ``AutoencoderKL`` saved with ``save_pretrained`` in the local folder ``PATH``,
  wrapped by :func:`vaefast.models.from_diffusers` (nothing is downloaded; needs the optional diffusers package);
- ``module:function``: a Python entry point, ``function()`` imported from ``module`` returns the model (a vaefast
  model, or any encoder/decoder pair wrapped with :func:`~vaefast.models.as_vae` or an adapter). A string of that
  form that names an existing folder is read as a folder.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import torch
from torch import nn

from vaefast._checks import check_device, check_model

__all__ = ["DIFFUSERS_PREFIX", "load_diffusers", "load_source"]

DIFFUSERS_PREFIX = "diffusers:"
_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def load_diffusers(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, scaling: str = "none"):
    """A diffusers ``AutoencoderKL`` from a local folder, as a vaefast model.

    Args:
        path: the folder (``config.json`` and the weights, as ``save_pretrained`` writes them).
        map_location: the device.
        scaling: see :func:`vaefast.models.from_diffusers`.

    Returns:
        The :class:`~vaefast.models.ForeignVAE`, in eval mode.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: diffusers is not installed, or the folder holds no loadable ``AutoencoderKL``.
    """
    from vaefast.models.ecosystem import from_diffusers

    device = check_device("map_location", map_location)
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        raise ValueError(
            f"{DIFFUSERS_PREFIX}{path} needs the optional diffusers package (pip install 'vaefast[diffusers]')"
        ) from exc
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no AutoencoderKL folder at {folder}")
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ValueError(f"cannot load an AutoencoderKL from {folder}: {exc}") from exc
    return from_diffusers(vae.to(device).eval(), scaling=scaling).eval()


def _entry_point(text: str, device: torch.device) -> nn.Module:
    """``module:function`` called without arguments, the model it returns checked and moved to ``device``."""
    module_name, _, attr = text.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model entry point {text!r}: {exc}") from exc
    if not callable(factory):
        raise TypeError(f"model entry point {text!r} is not callable")
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model entry point {text!r} returned {type(model).__name__}, not an nn.Module")
    try:
        check_model(model)
    except TypeError as exc:
        raise TypeError(
            f"model entry point {text!r}: {exc} (wrap foreign models with vaefast.models.as_vae, from_diffusers or "
            "from_encode_decode)"
        ) from None
    return model.to(device).eval()


def load_source(source: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """The model a source string names (module docstring).

    Args:
        source: a run folder, ``diffusers:PATH`` or ``module:function``.
        map_location: the device.

    Returns:
        The model in eval mode on ``map_location``.
    """
    from vaefast.models.io import load

    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a model source must be a str or path, got {type(source).__name__}")
    text = os.fspath(source)
    device = check_device("map_location", map_location)
    if text.startswith(DIFFUSERS_PREFIX):
        return load_diffusers(text[len(DIFFUSERS_PREFIX) :], device)
    if _ENTRY_POINT.match(text) and not Path(text).is_dir():
        return _entry_point(text, device)
    return load(text, map_location=device)
