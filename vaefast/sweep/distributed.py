"""Sweeps under ``torchrun``: this process's rank, its device, and a gloo group for the objects ranks exchange.

Nothing here touches the filesystem: a sweep over several machines needs no shared folder. Every object that moves
between processes (rank 0's checks of the database, the units computed elsewhere) is pickled and travels over a
**gloo** group of its own, created even when the default group is NCCL: no tensor moves between GPUs. That group's
timeout is :data:`GROUP_TIMEOUT` (a unit may compute for long while rank 0 waits for it); a process that dies closes
its connections, which the others see at once.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from vaefast.sweep.inputs import indexed_device

GROUP_TIMEOUT = timedelta(days=7)  # of the object group: a peer that dies is seen at once, a slow unit is no error

T = TypeVar("T")


@dataclass
class DistContext:
    """This process's place in a (possibly single-process) run.

    Attributes:
        rank: this process.
        world_size: the number of processes.
        local_rank: this process's index on its machine (``LOCAL_RANK``; picks its GPU).
        owns_group: whether this context created the default process group (and so destroys it in :meth:`close`).
        group: the gloo group the sweep's objects travel over (``None`` alone).
        leave_open: set when threads may still wait on ``group``: :meth:`close` then destroys nothing.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    group: Any = None
    leave_open: bool = False

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank.

        Args:
            obj: a picklable object (only rank 0's matters).

        Returns:
            Rank 0's object.
        """
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank.

        Args:
            obj: a picklable object.

        Returns:
            The objects of ranks ``0 .. world_size - 1``.
        """
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def on_rank0(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and give every rank its result, or raise its error on every rank.

        Args:
            fn: the work.

        Returns:
            Rank 0's result.

        Raises:
            Exception: the error ``fn`` raised on rank 0 (an error that does not pickle arrives elsewhere as a
                ``RuntimeError`` with its text).
        """
        outcome: tuple[str, Any] = ("ok", None)
        if self.rank == 0:
            try:
                outcome = ("ok", fn())
            except Exception as exc:
                if not self.distributed:
                    raise
                outcome = ("error", _picklable(exc))
        kind, value = self.broadcast(outcome)
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        """Free the object group, and the default group if this context created it (unless :attr:`leave_open`)."""
        if not self.distributed or self.leave_open:
            return
        import torch.distributed as dist

        if self.owns_group:
            dist.destroy_process_group()
        elif self.group is not None:
            dist.destroy_process_group(self.group)


def _picklable(exc: Exception) -> Exception:
    """``exc`` itself when it survives a pickle round trip, else a ``RuntimeError`` with its type and text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def rank_device(device: str | torch.device, local_rank: int, world_size: int) -> torch.device:
    """The device of one process: a plain ``cuda`` (or ``auto`` on a GPU machine) under ``torchrun`` is the rank's
    own GPU ``cuda:LOCAL_RANK``; where a launcher shows each process only its own GPU (one visible device, e.g.
    ``CUDA_VISIBLE_DEVICES`` set per rank) it is ``cuda:0``; an explicit ``cuda:N`` is kept.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a ``torch.device``.
        local_rank: the process's index on its machine.
        world_size: the number of processes.

    Returns:
        The device, with its index for CUDA.

    Raises:
        ValueError: no GPU is visible for a CUDA device, or this rank's local GPU does not exist.
    """
    from vaefast._checks import check_device

    resolved = check_device("device", device)
    if resolved.type == "cuda" and resolved.index is None and world_size > 1:
        count = torch.cuda.device_count()
        if count == 1:  # the launcher shows this process only its own GPU
            local_rank = 0
        elif local_rank >= count:
            raise ValueError(
                f"device {device}: LOCAL_RANK {local_rank} would use cuda:{local_rank} but only {count} CUDA "
                f"device(s) are visible (start at most {count} processes per machine)"
            )
        resolved = torch.device("cuda", local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(indexed_device(resolved))
    return indexed_device(resolved)


def dist_context() -> DistContext:
    """Rank, world size and local rank from ``torchrun``'s environment; with N > 1 processes joins (or creates) the
    default group and creates the gloo group the sweep's objects travel over.

    Returns:
        The context (rank 0 of 1 outside ``torchrun``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistContext()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        dist.init_process_group("gloo")
        owns = True
    group = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, owns, group)
