"""Wall-clock time per stage of a work unit (the ``seconds_*`` columns of ``units``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class StageTimer:
    """Accumulates wall-clock seconds per stage.

    ``with timer("margin"): ...`` adds the block's duration to ``timer.seconds["seconds_margin"]``.

    Attributes:
        seconds: ``{"seconds_<stage>": seconds}`` for every stage timed so far.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        """Time one block of stage ``stage`` (added to earlier blocks of the same stage).

        Args:
            stage: the stage's name.

        Returns:
            A context manager.
        """
        t0 = time.perf_counter()
        try:
            yield
        finally:
            key = f"seconds_{stage}"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
