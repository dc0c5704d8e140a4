"""Intra-op threads of CPU work: one rule for training and the margin search.

Conv-free models on a CPU run small matrix products (a training step, a round of attacks on a few points) that gain
nothing from more intra-op threads and slow down badly when the machine is shared (measured: the margin search on a
784-512-512-10 MLP took 0.54 s/point with 2 threads against 0.10 with 1 on a loaded 2-core machine;
benchmarks/README.md). ``"auto"`` therefore uses one thread for them and leaves torch's setting otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from vaefast._checks import check_positive_int

__all__ = ["intra_op_threads", "resolve_threads"]


def resolve_threads(model: object, device: torch.device, num_threads: int | str | None) -> int | None:
    """The intra-op threads to use.

    Args:
        model: the model (its modules are inspected for convolutions).
        device: where it runs.
        num_threads: ``"auto"`` (1 for a conv-free model on a CPU, else torch's setting), an int, or None (torch's).

    Returns:
        The thread count, or None to leave torch's setting.
    """
    if num_threads is None:
        return None
    if num_threads == "auto":
        modules = model.modules() if isinstance(model, nn.Module) else ()
        has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in modules)
        return 1 if torch.device(device).type == "cpu" and not has_conv else None
    return check_positive_int("num_threads", num_threads)


@contextlib.contextmanager
def intra_op_threads(model: object, device: torch.device, num_threads: int | str | None = "auto") -> Iterator[None]:
    """Run a block with :func:`resolve_threads`'s count (torch's setting restored afterwards).

    Args:
        model, device, num_threads: as in :func:`resolve_threads`.

    Yields:
        Nothing.
    """
    threads = resolve_threads(model, device, num_threads)
    previous = torch.get_num_threads()
    if threads is not None and threads != previous:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
