"""CIFAR-10 from its original python batches (``cifar-10-batches-py/data_batch_{1..5}``, ``test_batch``).

Each batch is a pickled dict with ``b"data"`` (uint8 ``[N, 3072]``, channel-major 3x32x32) and ``b"labels"``.
Unpickling is restricted to numpy arrays and plain containers: a batch file cannot execute code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from vaefast.data.base import DataSplit, default_root

BATCH_DIR = "cifar-10-batches-py"
SPLIT_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 batch file (restricted unpickling: numpy arrays and plain containers only).

    Args:
        path: the batch file.

    Returns:
        ``(images, labels)``: uint8 ``[N, 3, 32, 32]`` and int64 ``[N]``.

    Raises:
        ValueError: an unreadable or malformed file, naming it.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            batch = _SafeUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001  (a damaged pickle fails in many ways: EOFError, KeyError, struct.error...)
        raise ValueError(f"cannot read CIFAR batch {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 batch (need a dict with b'data' and b'labels')")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}: expected uint8 data [N, 3072] and N labels, got {data.dtype} {data.shape} / {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _batch_dir(root: Path) -> Path | None:
    for d in (root / BATCH_DIR, root):
        if (d / "test_batch").is_file() or (d / "data_batch_1").is_file():
            return d
    return None


def load_cifar10(split: str = "train", root: str | Path | None = None, download: bool = True) -> DataSplit:
    """CIFAR-10 from its python batches in ``root/cifar-10-batches-py`` (or ``root`` itself).

    Args:
        split: ``"train"`` (the five data batches) or ``"test"``.
        root: the folder (None: :func:`~vaefast.data.base.default_root`).
        download: fetch the files with torchvision when they are missing.

    Returns:
        A :class:`DataSplit` of float32 pixels / 255 ``[N, 3, 32, 32]`` with int64 labels.

    Raises:
        FileNotFoundError: the files are missing (and could not be fetched).
    """
    root_path = Path(root) if root is not None else default_root("cifar10")
    names = SPLIT_FILES[split]
    directory = _batch_dir(root_path)
    problem = ""
    if (directory is None or not all((directory / n).is_file() for n in names)) and download:
        try:
            import torchvision.datasets as tvd

            tvd.CIFAR10(root=str(root_path), train=split == "train", download=True)
        except ImportError:
            problem = "torchvision is not installed"
        except Exception as exc:  # noqa: BLE001
            problem = f"torchvision download failed: {exc}"
        directory = _batch_dir(root_path)
    if directory is None or not all((directory / n).is_file() for n in names):
        extra = f" ({problem})" if problem else ""
        raise FileNotFoundError(
            f"cifar10 {split} files not found: expected {', '.join(names)} in {root_path / BATCH_DIR}{extra}"
        )
    parts = [read_cifar_batch(directory / n) for n in names]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0)
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return DataSplit(x.contiguous(), y, None, "cifar10")
