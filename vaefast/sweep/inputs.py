"""What a sweep runs on: the points, the models, their rows in the database, and radii chosen from the data."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaefast import store
from vaefast._checks import check_device, check_model, check_positive_int, check_tensor, model_input_shape
from vaefast.core.box import UNIT_BOX, Box, as_box
from vaefast.core.options import DEFAULT_NUM_SAMPLES
from vaefast.rng import derive_seed

AUTO_R_QUANTILES = (0.25, 0.5, 0.75, 0.95)
AUTO_R_ABOVE = 1.3

ModelsArg = Mapping[str, nn.Module | str | os.PathLike] | Sequence[str | os.PathLike] | str | os.PathLike


@dataclass
class PointSet:
    """The swept data points and where they came from.

    Attributes:
        x: the points ``[P, *input_shape]``.
        dataset: dataset name (``"tensor"`` for points given directly).
        split: dataset split.
        indices: index of each point in the split (default ``0 .. P-1``).
        labels: class label of each point, if any.
        box: the data range of the points (every vaefast dataset: ``UNIT_BOX``), or None for unbounded inputs; the
            attacks keep ``x + delta`` inside it and it caps the margin search.
    """

    x: torch.Tensor
    dataset: str = "tensor"
    split: str = ""
    indices: list[int] = field(default_factory=list)
    labels: list[int] | None = None
    box: Box | None = UNIT_BOX

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or self.x.dim() < 2 or self.x.shape[0] == 0:
            raise ValueError("points must be a tensor [P, *input_shape] with P >= 1")
        check_tensor("points", self.x)  # floating, finite
        self.box = as_box(self.box, "points.box")
        if self.box is not None:
            self.box.offsets(self.x, "points")  # inside the box (else a ValueError naming points and the box)
        if not self.indices:
            self.indices = list(range(self.x.shape[0]))
        if len(self.indices) != self.x.shape[0]:
            raise ValueError(f"points.indices has {len(self.indices)} entries for {self.x.shape[0]} points")
        if len(set(self.indices)) != len(self.indices):
            raise ValueError("points.indices must be distinct: each point is swept once")

    @classmethod
    def from_dataset(
        cls, name: str, split: str = "test", indices: Sequence[int] | int = 32, root: str | None = None
    ) -> PointSet:
        """Points of ``vaefast.data.load(name, split)``.

        Args:
            name: dataset name.
            split: ``"train"`` or ``"test"``.
            indices: the indices of the points, or a count: the first ``indices`` points.
            root: dataset folder for file-based datasets.

        Returns:
            The point set, with labels when the dataset has them.
        """
        from vaefast.data import load

        data = load(name, split=split, root=root)
        n = data.x.shape[0]
        if isinstance(indices, int):
            check_positive_int("indices", indices)
            if indices > n:
                raise ValueError(f"asked for {indices} points but {name}/{split} holds only {n}")
            indices = list(range(indices))
        indices = [int(i) for i in indices]
        if not indices or min(indices) < 0 or max(indices) >= n:
            raise ValueError(f"indices must be non-empty and within [0, {n}) for {name}/{split}")
        idx = torch.tensor(indices)
        labels = data.y[idx].tolist() if getattr(data, "y", None) is not None else None
        return cls(data.x[idx].contiguous(), dataset=name, split=split, indices=indices, labels=labels, box=data.box)

    def describe(self) -> dict[str, Any]:
        """Where the points came from and a digest of their values (stored in ``meta``, part of the fingerprint).

        Returns:
            ``{"dataset", "split", "indices", "x_sha256", "box"}``.
        """
        digest = hashlib.sha256(store.to_blob(self.x)).hexdigest()
        box = None if self.box is None else list(self.box)
        return {"dataset": self.dataset, "split": self.split, "indices": self.indices, "x_sha256": digest, "box": box}

    def rows(self) -> list[dict[str, Any]]:
        """The ``points`` table rows.

        Returns:
            One row per point, keyed by its position ``pos``, with the point itself as a blob.
        """
        labels = self.labels or [None] * len(self.indices)
        return [
            {
                "pos": p,
                "dataset": self.dataset,
                "split": self.split,
                "idx": int(i),
                "label": None if lab is None else int(lab),
                "x": store.to_blob(self.x[p]),
            }
            for p, (i, lab) in enumerate(zip(self.indices, labels, strict=True))
        ]


def as_point_set(points: PointSet | torch.Tensor) -> PointSet:
    """``points`` as a :class:`PointSet` (a tensor becomes one with default provenance).

    Args:
        points: a point set or a tensor ``[P, *input_shape]``.

    Returns:
        The point set.
    """
    if isinstance(points, torch.Tensor):
        return PointSet(points)
    if not isinstance(points, PointSet):
        raise TypeError(f"points must be a PointSet or a tensor, got {type(points).__name__}")
    return points


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (keys in sorted order, raw tensor bytes).

    Args:
        model: the model.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(
            value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
        )
    return h.hexdigest()


def _config_dict(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg) if isinstance(cfg, Mapping) else {}


def indexed_device(device: str | torch.device, name: str = "device") -> torch.device:
    """A checked device with its index: ``cuda`` is the current CUDA device (``cuda:LOCAL_RANK`` once a ``torchrun``
    rank has chosen its GPU).

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a ``torch.device``.
        name: the argument's name in error messages.

    Returns:
        The device (a missing GPU is a one-line ``ValueError`` from :func:`vaefast._checks.check_device`).
    """
    device = check_device(name, device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _on_device(model: nn.Module, device: torch.device) -> bool:
    """Whether every parameter and buffer of ``model`` is on ``device``."""
    tensors = [*model.parameters(), *model.buffers()]
    return all(t.device == device for t in tensors)


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``: itself when it is there already, else a copy moved there (the caller's module is
    never moved).

    Args:
        model: a module.
        device: a resolved device (``cuda`` with its index).

    Returns:
        The module on ``device``.
    """
    return model if _on_device(model, device) else copy.deepcopy(model).to(device)


def _load_one(name: object, m: object, device: torch.device) -> tuple[nn.Module, str]:
    if not isinstance(name, str) or not name or "|" in name:
        raise ValueError(f"model names must be non-empty strings without '|', got {name!r}")
    if isinstance(m, nn.Module):
        model, source = place(m, device), "<memory>"
    elif isinstance(m, (str, os.PathLike)):
        from vaefast.models import load_source

        model, source = load_source(m, map_location=device), os.fspath(m)
    else:
        raise TypeError(
            f"models[{name!r}] must be an nn.Module or a source (run folder, diffusers:PATH, module:function), got "
            f"{type(m).__name__}"
        )
    try:
        check_model(model, requires=("log_likelihood",))
    except TypeError as exc:
        raise TypeError(f"models[{name!r}]: {exc}") from None
    return model, source


def load_models(models: ModelsArg, device: str | torch.device = "cpu") -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Resolve the models of a sweep to modules on ``device`` (moved once, here).

    Args:
        models: ``{name: nn.Module or source}``, or sources (named by folder); a source is a run folder,
            ``diffusers:PATH`` (an ``AutoencoderKL`` folder) or ``module:function``
            (:func:`vaefast.models.load_source`).
        device: where the models run (:func:`vaefast._checks.check_device`); an in-memory module elsewhere is
            copied there, the caller's own module stays where it is.

    Returns:
        ``({name: model}, {name: source})``, the source being the source string or ``"<memory>"``.
    """
    device = indexed_device(device)
    if isinstance(models, (str, os.PathLike)):
        models = [models]
    if not isinstance(models, Mapping):
        models = {Path(p).name: p for p in models}
    if not models:
        raise ValueError("models is empty")
    loaded, sources = {}, {}
    for name, m in models.items():
        loaded[name], sources[name] = _load_one(name, m, device)
    return loaded, sources


def load_stored_models(
    info: Mapping[str, Mapping[str, Any]],
    names: Sequence[str],
    overrides: Mapping[str, nn.Module | str | os.PathLike] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, nn.Module]:
    """The models of a results database, from ``overrides`` or their stored run folders, checked against the
    weights the sweep stored.

    Args:
        info: the database's ``models`` rows by name (:func:`vaefast.store.model_info`).
        names: the models wanted.
        overrides: ``{name: nn.Module or run folder}`` replacing stored sources (needed for models swept from
            memory).
        device: where to load them.

    Returns:
        ``{name: model}`` on ``device``.

    Raises:
        ValueError: an override names no model of the database, a model was swept from memory and has no
            override, or its weights differ from the stored SHA-256.
    """
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(info)
    if unknown:
        raise ValueError(f"models: {sorted(unknown)} are not in the database (it has {sorted(info)})")
    sources = {}
    for name in sorted(names):
        source = overrides.get(name, info[name]["source"])
        if isinstance(source, str) and source == "<memory>":
            raise ValueError(f"model {name!r} was swept from memory: pass it with models={{{name!r}: ...}} (--model)")
        sources[name] = source
    loaded, _ = load_models(sources, device) if sources else ({}, {})
    for name, model in loaded.items():
        if weights_digest(model) != info[name]["weights_sha256"]:
            raise ValueError(f"model {name!r}: its weights differ from the ones the sweep stored (SHA-256 mismatch)")
    return loaded


def check_point_shape(models: Mapping[str, nn.Module], x: torch.Tensor) -> None:
    """Refuse points whose shape is not every model's input shape.

    Args:
        models: ``{name: model}`` (or one model).
        x: the points ``[P, *input_shape]``.
    """
    for name, m in models.items():
        shape = model_input_shape(m, x)
        if shape != tuple(x.shape[1:]):
            raise ValueError(f"points have shape {tuple(x.shape[1:])} but models[{name!r}] expects {shape}")


def model_row(name: str, model: nn.Module, source: str) -> dict[str, Any]:
    """The ``models`` table row of a model.

    Args:
        name: the model's name in the sweep.
        model: the model.
        source: its run folder or ``"<memory>"``.

    Returns:
        The row; ``beta`` is the KL weight (β-VAE/ELBO) or the TC weight (β-TCVAE).
    """
    cfg = _config_dict(model)
    objective = cfg.get("objective")
    beta = cfg.get("tc_weight") if objective == "beta_tcvae" else cfg.get("beta")
    return {
        "name": name,
        "source": source,
        "config": json.dumps(cfg, sort_keys=True, default=str),
        "beta": float(beta) if isinstance(beta, (int, float)) else None,
        "objective": objective,
        "latent_dim": int(model.latent_dim),
        "input_shape": json.dumps(list(model.input_shape)),
        "likelihood": str(getattr(model, "likelihood", "")),
        "weights_sha256": weights_digest(model),
    }


def on_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the device and in the dtype of the model's parameters (unchanged for a model without any).

    Args:
        model: the model.
        x: a tensor.

    Returns:
        The tensor where the model runs.
    """
    param = next(iter(model.parameters()), None)
    return x if param is None else x.to(device=param.device, dtype=param.dtype)


def auto_radii(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seed: int = 0,
    quantiles: Sequence[float] = AUTO_R_QUANTILES,
    above: float = AUTO_R_ABOVE,
) -> list[float]:
    """Radii r for a study (a sweep's ``radii="auto"``) from the smallest robust radii ``r*(x)`` of the points, pooled
    over the models (``vaefast.auto_radii``).

    A point is r-robust exactly when ``r > r*(x)`` (up to Monte-Carlo noise), so a radius below most ``r*`` leaves
    most points uncertified (margin 0) and one far above them makes every reconstruction ball cover the decoder's
    whole range. The radii are the ``quantiles`` of the pooled ``r*`` and ``above`` × the largest of them, rounded
    to 3 significant digits: every model is studied on both sides of its typical ``r*``.

    Args:
        models: ``{name: model}`` (or one model).
        x: the swept points ``[P, *input_shape]``.
        num_samples: Monte-Carlo samples of the pilot estimate of ``r*``.
        seed: base seed (the pilot's stream is derived from it and each model's name).
        quantiles: quantiles of the pooled ``r*`` to use.
        above: factor for one radius above the largest quantile.

    Returns:
        Distinct sorted radii.
    """
    from vaefast.robustness import estimate_r_robustness

    if isinstance(models, nn.Module):
        models = {"model": models}
    pooled = []
    for name, model in models.items():
        pilot = derive_seed(seed, "auto-radii", name)
        est = estimate_r_robustness(model, on_model(model, x), [1.0], num_samples=num_samples, seed=pilot)
        pooled.append(est.r_star)
    r_star = torch.cat(pooled).double()
    qs = torch.quantile(r_star, torch.tensor([float(q) for q in quantiles], dtype=torch.float64)).tolist()
    return sorted({float(f"{v:.3g}") for v in [*qs, above * qs[-1]] if v > 0})


def resolve_radii(
    radii: Sequence[float] | float | str, models: Mapping[str, nn.Module], x: torch.Tensor, num_samples: int, seed: int
) -> list[float]:
    """The radii of a sweep: the numbers given, or ``"auto"`` (:func:`auto_radii`).

    Args:
        radii: a radius, radii, or ``"auto"``.
        models: ``{name: model}`` (for ``"auto"``).
        x: the points (for ``"auto"``).
        num_samples: samples of the pilot estimate (for ``"auto"``).
        seed: base seed of the pilot estimate (for ``"auto"``).

    Returns:
        The radii as a list.
    """
    if isinstance(radii, str):
        if radii != "auto":
            raise ValueError(f"radii must be numbers or 'auto', got {radii!r}")
        return auto_radii(models, x, num_samples=num_samples, seed=seed)
    if isinstance(radii, (int, float)):
        return [radii]
    return list(radii)
