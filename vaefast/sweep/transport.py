"""Completed units travel to rank 0, which alone writes the database: no shared filesystem is needed.

A rank other than 0 sends each unit it computes as one message over the sweep's gloo group
(:attr:`vaefast.sweep.distributed.DistContext.group`): a header ``[kind, nbytes]`` (tag :data:`TAG_HEADER`), then
the pickled ``(units row, results rows, curves rows)`` as bytes (tag :data:`TAG_PAYLOAD`). When its share is done
it sends a ``DONE`` header and waits for rank 0's release (tag :data:`TAG_RELEASE`), so every rank returns once the
whole sweep is committed.

On rank 0 a :class:`Collector` runs one thread per other rank; each thread receives that rank's units in order and
commits each one in its own transaction as it arrives, while rank 0's main thread computes and commits its own
share. A rank that dies closes its connections: its thread sees it at once (gloo: "Connection closed by peer") and
rank 0 stops with :class:`RankFailedError`; every unit committed until then stays, and a resumed sweep (any number
of processes) computes exactly the units that are not in the database.
"""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Callable
from typing import Any

import torch

from vaefast import store
from vaefast.sweep.distributed import DistContext

TAG_HEADER, TAG_PAYLOAD, TAG_RELEASE = 7301, 7302, 7303
UNIT, DONE = 1, 0

UnitRows = tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]


class RankFailedError(RuntimeError):
    """Another process of the sweep stopped (killed, crashed, or lost its connection) before its share was done."""


def _resume_hint(who: str, exc: BaseException) -> str:
    """One line: who stopped, the first line of why, and how to continue."""
    why = (str(exc).splitlines() or [""])[0]
    return (
        f"{who} stopped before the sweep was done ({type(exc).__name__}: {why}); every unit committed so far is kept: "
        "run the sweep again with resume=True (--resume), with any number of processes"
    )


def send_unit(ctx: DistContext, rows: UnitRows) -> None:
    """Send one computed unit to rank 0 (returns once rank 0 has received it).

    Args:
        ctx: this process (rank > 0).
        rows: the unit's ``(units row, results rows, curves rows)``.

    Raises:
        RankFailedError: rank 0 is gone.
    """
    data = pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)
    _send(ctx, UNIT, torch.frombuffer(bytearray(data), dtype=torch.uint8))


def send_done(ctx: DistContext) -> None:
    """Tell rank 0 that this rank's share is computed and sent.

    Args:
        ctx: this process (rank > 0).
    """
    _send(ctx, DONE, None)


def _send(ctx: DistContext, kind: int, payload: torch.Tensor | None) -> None:
    import torch.distributed as dist

    size = 0 if payload is None else payload.numel()
    try:
        dist.send(torch.tensor([kind, size], dtype=torch.int64), 0, group=ctx.group, tag=TAG_HEADER)
        if payload is not None:
            dist.send(payload, 0, group=ctx.group, tag=TAG_PAYLOAD)
    except RuntimeError as exc:
        raise RankFailedError(_resume_hint("rank 0", exc)) from exc


def receive(ctx: DistContext, src: int) -> UnitRows | None:
    """The next message of rank ``src``.

    Args:
        ctx: rank 0.
        src: the sending rank.

    Returns:
        Its next unit, or ``None`` when it has sent its whole share.
    """
    import torch.distributed as dist

    header = torch.zeros(2, dtype=torch.int64)
    dist.recv(header, src, group=ctx.group, tag=TAG_HEADER)
    kind, size = (int(v) for v in header)
    if kind == DONE:
        return None
    payload = torch.empty(size, dtype=torch.uint8)
    dist.recv(payload, src, group=ctx.group, tag=TAG_PAYLOAD)
    return pickle.loads(payload.numpy().tobytes())


def release(ctx: DistContext) -> None:
    """Rank 0: tell every other rank that the sweep is committed.

    Args:
        ctx: rank 0.
    """
    import torch.distributed as dist

    for dst in range(1, ctx.world_size):
        dist.send(torch.ones(1, dtype=torch.int64), dst, group=ctx.group, tag=TAG_RELEASE)


def wait_release(ctx: DistContext) -> None:
    """Rank > 0: wait until rank 0 has committed the whole sweep.

    Args:
        ctx: this process.

    Raises:
        RankFailedError: rank 0 stopped first.
    """
    import torch.distributed as dist

    try:
        dist.recv(torch.zeros(1, dtype=torch.int64), 0, group=ctx.group, tag=TAG_RELEASE)
    except RuntimeError as exc:
        raise RankFailedError(_resume_hint("rank 0", exc)) from exc


class Collector:
    """Rank 0's receivers: one thread per other rank, committing each unit it receives in one transaction.

    Args:
        ctx: rank 0 of a run with several processes.
        db: the results database (prepared).
        on_commit: called with each committed units row (e.g. to advance a progress bar); may run on any thread.
        header: the sweep's header while it is not yet written (:func:`vaefast.store.commit_unit`).
    """

    def __init__(
        self,
        ctx: DistContext,
        db: str | os.PathLike,
        on_commit: Callable[[dict], None] | None = None,
        header: store.SweepHeader | None = None,
    ):
        self.ctx, self.db, self.on_commit, self.header = ctx, db, on_commit, header
        self.received = 0
        self.errors: dict[int, BaseException] = {}
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._serve, args=(src,), name=f"vaefast-collect-{src}", daemon=True)
            for src in range(1, ctx.world_size)
        ]

    def start(self) -> None:
        """Start the receiver threads."""
        for t in self._threads:
            t.start()

    @property
    def alive(self) -> bool:
        """Whether a receiver is still waiting for units."""
        return any(t.is_alive() for t in self._threads)

    def _serve(self, src: int) -> None:
        """Receive and commit rank ``src``'s units until it is done (or fails: kept in :attr:`errors`)."""
        try:
            conn = store.connect(self.db, create=False)
        except BaseException as exc:
            self.errors[src] = exc
            return
        try:
            while (rows := receive(self.ctx, src)) is not None:
                store.commit_unit(conn, *rows, header=self.header)
                with self._lock:
                    self.received += 1
                if self.on_commit is not None:
                    self.on_commit(rows[0])
        except BaseException as exc:
            self.errors[src] = exc
        finally:
            conn.close()

    def check(self) -> None:
        """Raise if a receiver failed.

        Raises:
            RankFailedError: naming the first rank that stopped and how.
        """
        if self.errors:
            src = min(self.errors)
            raise RankFailedError(_resume_hint(f"rank {src}", self.errors[src])) from self.errors[src]

    def wait(self) -> None:
        """Wait until every other rank has sent its whole share and it is committed.

        Raises:
            RankFailedError: a rank stopped first.
        """
        for t in self._threads:
            while t.is_alive():
                t.join(0.2)
                self.check()
        self.check()
