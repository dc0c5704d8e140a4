"""MNIST and Fashion-MNIST from their original IDX files (``.gz`` or uncompressed), optionally fetched by torchvision.

IDX format (LeCun et al.): 2 zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int, 0x0D float,
0x0E double), the number of dimensions, then each dimension as a big-endian uint32, then the data (big-endian).
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from vaefast.data.base import DataSplit, default_root

IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TORCHVISION = {"mnist": ("MNIST", "MNIST"), "fashion-mnist": ("FashionMNIST", "FashionMNIST")}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (gzip-compressed if its name ends in ``.gz``).

    Args:
        path: the file.

    Returns:
        The array of the header's shape and element type.

    Raises:
        ValueError: an unreadable, truncated or malformed file, naming it.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError; a damaged body a zlib.error
        raise ValueError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header says {dims} ({expected} bytes) but the file has {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _search_dirs(name: str, root: Path) -> list[Path]:
    sub = TORCHVISION[name][0]
    return [root, root / "raw", root / sub / "raw"]


def _locate(name: str, split: str, root: Path) -> tuple[Path, Path] | None:
    stems = IDX_FILES[split]
    for d in _search_dirs(name, root):
        found = [_find(d, s) for s in stems]
        if all(found):
            return found[0], found[1]  # type: ignore[return-value]
    return None


def _fetch(name: str, root: Path) -> str:
    """Download through torchvision if it is installed; returns an error description ('' on success)."""
    try:
        import torchvision.datasets as tvd
    except ImportError:
        return "torchvision is not installed"
    try:
        cls = getattr(tvd, TORCHVISION[name][1])
        for train in (True, False):
            cls(root=str(root), train=train, download=True)
    except Exception as exc:  # noqa: BLE001  (network/IO failure: reported in the FileNotFoundError)
        return f"torchvision download failed: {exc}"
    return ""


def load_idx_dataset(
    name: str, split: str = "train", root: str | Path | None = None, download: bool = True
) -> DataSplit:
    """MNIST or Fashion-MNIST from the canonical IDX files (``.gz`` or not).

    Looks in ``root``, ``root/raw`` and torchvision's ``root/<MNIST|FashionMNIST>/raw``; if absent and ``download``,
    tries torchvision.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        split: ``"train"`` or ``"test"``.
        root: the folder (None: :func:`~vaefast.data.base.default_root`).
        download: fetch the files with torchvision when they are missing.

    Returns:
        A :class:`DataSplit` of float32 pixels / 255 ``[N, 1, 28, 28]`` with int64 labels.

    Raises:
        FileNotFoundError: the files are missing (and could not be fetched).
    """
    root_path = Path(root) if root is not None else default_root(name)
    files = _locate(name, split, root_path)
    problem = ""
    if files is None and download:
        problem = _fetch(name, root_path)
        files = _locate(name, split, root_path)
    if files is None:
        wanted = ", ".join(f"{s}.gz" for s in IDX_FILES[split])
        dirs = ", ".join(str(d) for d in _search_dirs(name, root_path))
        extra = f" ({problem})" if problem else ""
        raise FileNotFoundError(f"{name} {split} files not found: expected {wanted} in one of {dirs}{extra}")
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{files[0]} / {files[1]}: expected images [N, H, W] and labels [N], got {images.shape} / {labels.shape}"
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1).contiguous()
    y = torch.from_numpy(labels.astype(np.int64))
    return DataSplit(x, y, None, name)
