"""Model files: ``config.json`` (a :class:`VAEConfig`) + ``model.safetensors`` (the state dict).

Loading never unpickles anything; files of vaefast 0.2's orthonormal layers are converted on load
(:func:`vaefast.models.lipschitz.upgrade_state_dict`). A missing, unreadable, truncated or mismatched file raises
``FileNotFoundError``/``ValueError`` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vaefast._checks import check_device
from vaefast.models.config import VAEConfig
from vaefast.models.lipschitz import upgrade_state_dict
from vaefast.models.vae import VAE

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write ``model.state_dict()`` to a safetensors file (tensors made contiguous, on CPU; atomic rename).

    Args:
        model: any ``nn.Module``.
        path: the ``.safetensors`` file.

    Returns:
        ``path``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "library": "vaefast"})
    tmp.replace(path)
    return path


def save(model: nn.Module, directory: str | Path) -> Path:
    """Save ``model`` into ``directory``: ``config.json`` (if it has a ``VAEConfig``) and ``model.safetensors``.

    Args:
        model: the model (a :class:`~vaefast.models.VAE` can be rebuilt by :func:`load`).
        directory: the folder (created if needed).

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    if isinstance(config, VAEConfig):
        (directory / CONFIG_FILE).write_text(config.to_json() + "\n")
    save_weights(model, directory / WEIGHTS_FILE)
    return directory


def load_config(directory: str | Path) -> VAEConfig:
    """Read and validate ``directory/config.json``.

    Args:
        directory: the model folder.

    Returns:
        The :class:`VAEConfig`.

    Raises:
        FileNotFoundError / ValueError: naming the file.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no model config at {path} (expected {CONFIG_FILE} written by model.save)")
    try:
        return VAEConfig.from_json(path.read_text())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid model config {path}: {exc}") from exc


def load_weights(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors state dict; a missing or corrupt/truncated file is a clear error naming it.

    Args:
        path: the ``.safetensors`` file.
        map_location: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a ``torch.device`` (checked first, so a CUDA
            request without a GPU is reported as such, not as a corrupt file).

    Returns:
        The state dict, tensors on ``map_location``.
    """
    device = check_device("map_location", map_location)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path} (expected {WEIGHTS_FILE} written by model.save)")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        raise ValueError(f"weights file {path} is corrupt or truncated: {exc}") from exc


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> VAE:
    """Rebuild the :class:`VAE` saved in ``directory`` by ``model.save``.

    Args:
        directory: the folder with ``config.json`` and ``model.safetensors``.
        map_location: the device for the weights (see :func:`load_weights`; ``"auto"``: cuda when visible).

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: a missing folder or file.
        ValueError: an invalid config, a corrupt or truncated weights file, weights that do not fit the config, or a
            device that is not available.
    """
    if not isinstance(directory, (str, Path)):
        raise TypeError(f"directory must be a str or Path, got {type(directory).__name__}")
    map_location = check_device("map_location", map_location)
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    config = load_config(directory)
    state = load_weights(directory / WEIGHTS_FILE, map_location)
    model = VAE(config, seed=None)
    try:
        model.load_state_dict(upgrade_state_dict(state), strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"weights in {directory / WEIGHTS_FILE} do not match the architecture in {directory / CONFIG_FILE}: {exc}"
        ) from exc
    return model.to(map_location).eval()
