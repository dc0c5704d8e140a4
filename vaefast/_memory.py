"""The one memory budget: ``max_memory`` bytes per device, from which every batch size of an analysis is derived
(the decoder's sample chunks, the attack batch, the Jacobian batch).

A batch size is ``floor(max_memory / bytes per row)``, where a row's bytes are measured once per model and shape by
:func:`activation_bytes` (the bytes of every module output of one row's forward pass). A request whose single row
does not fit is a :class:`MemoryBudgetError` (a ``ValueError`` naming ``max_memory``) raised before any work.

Defaults (:func:`default_max_memory`): on a CPU a quarter of the physical memory, at most 4 GiB; on a GPU half of
the device's memory. The budget bounds the working set of an analysis, not the model's own weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["MemoryBudgetError", "activation_bytes", "check_max_memory", "default_max_memory", "rows_that_fit"]

CPU_CAP = 4 * 2**30  # bytes: the CPU default's ceiling


class MemoryBudgetError(ValueError):
    """A request that cannot fit in ``max_memory`` (raised before any work)."""


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 16 GiB
        return 16 * 2**30


def default_max_memory(device: torch.device | str) -> int:
    """The default budget of a device.

    Args:
        device: where the analysis runs.

    Returns:
        Bytes: ``min(4 GiB, physical memory / 4)`` on a CPU; ``total device memory / 2`` on a GPU.
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory // 2)
    return int(min(CPU_CAP, _physical_memory() // 4))


def check_max_memory(value: object, device: torch.device | str) -> int:
    """``max_memory`` checked (a positive int of bytes), or the device's default for None.

    Args:
        value: None or bytes.
        device: the device of the analysis (for the default).

    Returns:
        The budget in bytes.

    Raises:
        TypeError / ValueError: naming ``max_memory``.
    """
    if value is None:
        return default_max_memory(device)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_memory must be an int (bytes) or None, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"max_memory must be > 0 bytes, got {value}")
    return value


def rows_that_fit(bytes_per_row: int, max_memory: int, what: str) -> int:
    """How many rows of ``bytes_per_row`` fit in the budget.

    Args:
        bytes_per_row: the working set of one row (> 0).
        max_memory: the budget in bytes.
        what: the work, for the error message (e.g. ``"decoding one sample"``).

    Returns:
        ``floor(max_memory / bytes_per_row)`` (at least 1).

    Raises:
        MemoryBudgetError: not even one row fits.
    """
    rows = int(max_memory // max(1, int(bytes_per_row)))
    if rows < 1:
        raise MemoryBudgetError(
            f"max_memory={max_memory} bytes is too small: {what} needs about {int(bytes_per_row)} bytes; "
            "raise max_memory"
        )
    return rows


def activation_bytes(fn: Callable[..., Any], *inputs: torch.Tensor) -> int:
    """The bytes of every module output (and of the result) of one call ``fn(*inputs)`` under ``no_grad``.

    Every ``nn.Module`` called during ``fn`` reports its output through a global forward hook, so the sum counts
    the intermediates a forward pass creates (nested modules count twice: an over-estimate). Measured on one row,
    it is the per-row working set of inference; a backward pass keeps about as much again.

    Args:
        fn: e.g. ``model.decode``.
        *inputs: one row's inputs (a batch of 1).

    Returns:
        The bytes (at least those of the inputs and the result).
    """
    total = [sum(t.numel() * t.element_size() for t in inputs)]

    def count(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            total[0] += value.numel() * value.element_size()
        elif isinstance(value, (tuple, list)):
            for v in value:
                count(v)
        elif isinstance(value, dict):
            for v in value.values():
                count(v)

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        count(output)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with torch.no_grad():
            count(fn(*inputs))
    finally:
        handle.remove()
    return int(total[0])
