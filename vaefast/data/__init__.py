"""Datasets as tensors in [0, 1]: ``load(name, split, root)`` -> :class:`DataSplit`.

- ``digits``: scikit-learn's 8x8 digits (embedded, the default); ``shapes``: procedural dSprites-style 64x64;
- ``mnist``, ``fashion-mnist`` (IDX files), ``cifar10`` (python batches): read from ``root`` (default
  ``$VAEFAST_DATA/<name>`` or ``~/.cache/vaefast/data/<name>``) or fetched with torchvision when available.
"""

from __future__ import annotations

from pathlib import Path

from vaefast.data.base import DataSplit, default_root
from vaefast.data.cifar import load_cifar10, read_cifar_batch
from vaefast.data.digits import load_digits
from vaefast.data.idx import load_idx_dataset, read_idx
from vaefast.data.shapes import FACTOR_NAMES, SHAPE_NAMES, render_shapes, shape_factors

DATASETS = ("digits", "shapes", "mnist", "fashion-mnist", "cifar10")
SPLITS = ("train", "test")


def load(name: str, split: str = "train", root: str | Path | None = None, **kwargs) -> DataSplit:
    """Load one split of a dataset.

    Args:
        name: one of :data:`DATASETS`.
        split: ``"train"`` or ``"test"``.
        root: the folder of a file-based set (None: :func:`default_root`); must be None for digits and shapes.
        **kwargs: for the dataset's loader (e.g. ``num_rotations`` for shapes, ``download=False`` for the
            file-based sets).

    Returns:
        The :class:`DataSplit`, pixels in [0, 1].
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {list(DATASETS)}, got {name!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if root is not None and not isinstance(root, (str, Path)):
        raise TypeError(f"root must be a str or Path, got {type(root).__name__}")
    if name in ("digits", "shapes") and root is not None:
        raise ValueError(f"{name!r} is generated in memory; root must be None")
    if name == "digits":
        if kwargs:
            raise TypeError(f"unexpected keyword arguments for digits: {sorted(kwargs)}")
        return load_digits(split)
    if name == "shapes":
        from vaefast.data.shapes import load_shapes

        return load_shapes(split, **kwargs)
    if name == "cifar10":
        return load_cifar10(split, root, **kwargs)
    return load_idx_dataset(name, split, root, **kwargs)


__all__ = [
    "DATASETS",
    "FACTOR_NAMES",
    "SHAPE_NAMES",
    "DataSplit",
    "default_root",
    "load",
    "load_cifar10",
    "load_digits",
    "load_idx_dataset",
    "read_cifar_batch",
    "read_idx",
    "render_shapes",
    "shape_factors",
]
