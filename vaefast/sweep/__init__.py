"""Sweeps over models × data points × radii r (× attack budgets), written to an SQLite store as they run.

One job per module:

- :mod:`~vaefast.sweep.spec`: the specification (:class:`SweepSpec`), work units, sharding, row ids, the
  fingerprint;
- :mod:`~vaefast.sweep.inputs`: the points (:class:`PointSet`), the models and their rows, radii from r*;
- :mod:`~vaefast.sweep.stages`: estimate → bound → margin → evidence → curves of one unit, each returning the
  library's result types;
- :mod:`~vaefast.sweep.rows`: the database rows of one unit (:func:`compute_unit`);
- :mod:`~vaefast.schema`: the one definition of every table and column of a results database;
- :mod:`~vaefast.sweep.timing`: per-stage wall-clock time;
- :mod:`~vaefast.sweep.distributed`: ``torchrun`` ranks, each rank's device, the gloo group of the sweep's objects;
- :mod:`~vaefast.sweep.transport`: completed units sent to rank 0, which alone writes the database (no shared
  filesystem needed);
- :mod:`~vaefast.sweep.runner`: :func:`run_sweep` (plan, prepare the database, compute and commit).

The public names below are loaded on first access (``import vaefast.sweep`` stays cheap).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "run_sweep": "vaefast.sweep.runner",
    "SweepResult": "vaefast.sweep.runner",
    "SweepMismatchError": "vaefast.sweep.runner",
    "RankFailedError": "vaefast.sweep.transport",
    "SweepSpec": "vaefast.sweep.spec",
    "WorkUnit": "vaefast.sweep.spec",
    "enumerate_units": "vaefast.sweep.spec",
    "shard": "vaefast.sweep.spec",
    "item_id": "vaefast.sweep.spec",
    "curve_item_id": "vaefast.sweep.spec",
    "PointSet": "vaefast.sweep.inputs",
    "auto_radii": "vaefast.sweep.inputs",
    "load_models": "vaefast.sweep.inputs",
    "AUTO_R_QUANTILES": "vaefast.sweep.inputs",
    "AUTO_R_ABOVE": "vaefast.sweep.inputs",
    "compute_unit": "vaefast.sweep.rows",
    "derive_seed": "vaefast.rng",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access.

    Args:
        name: a name of ``__all__``.

    Returns:
        The object (cached in the package namespace).
    """
    if name not in _LAZY:
        raise AttributeError(f"module 'vaefast.sweep' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names and whatever is already loaded.

    Returns:
        Them, sorted.
    """
    return sorted({*__all__, *globals()})
