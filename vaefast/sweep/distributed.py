"""Sweeps under ``torchrun``: the process's rank, barriers, and the per-rank shard databases merged by rank 0."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaefast import store


@dataclass
class DistContext:
    """This process's place in a (possibly single-process) run.

    Attributes:
        rank: this process.
        world_size: the number of processes.
        owns_group: whether this context created the process group (and so destroys it in :meth:`close`).
    """

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    def barrier(self) -> None:
        """Wait for every process (nothing to do alone)."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank.

        Args:
            obj: a picklable object (only rank 0's matters).

        Returns:
            Rank 0's object.
        """
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def dist_context() -> DistContext:
    """Rank and world size from ``torchrun``'s environment; joins a gloo group (for barriers) when N > 1.

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
    return DistContext(dist.get_rank(), dist.get_world_size(), owns)


def shard_dir(db: str | os.PathLike) -> Path:
    """The folder of the per-rank shard databases of ``db`` (``<db>.shards``).

    Args:
        db: the main database.

    Returns:
        The folder's path.
    """
    db = Path(db)
    return db.parent / (db.name + ".shards")


def shard_path(db: str | os.PathLike, rank: int) -> Path:
    """The shard database rank ``rank`` writes.

    Args:
        db: the main database.
        rank: the process.

    Returns:
        ``<db>.shards/rank<rank>.db``.
    """
    return shard_dir(db) / f"rank{rank}.db"


def merge_shards(db: str | os.PathLike) -> int:
    """Merge every shard database of ``db`` into it, then delete the shards.

    Args:
        db: the main database (created if absent).

    Returns:
        The number of units added.
    """
    sdir = shard_dir(db)
    if not sdir.is_dir():
        return 0
    added = 0
    conn = store.connect(db)
    try:
        for path in sorted(sdir.glob("rank*.db")):
            added += store.merge_into(conn, path)
    finally:
        conn.close()
    for path in sorted(sdir.iterdir()):
        path.unlink()
    sdir.rmdir()
    return added
