"""Running a sweep: plan it, prepare the database, compute the missing units, merge the shards.

Every unit is committed in one transaction with its ``units`` marker, so a sweep killed at any moment (even
``kill -9``) resumes by recomputing only the unit in flight. Under ``torchrun`` with N processes, rank k computes
the units with index ``i ≡ k (mod N)`` into its own shard database and rank 0 merges the shards into the main
one. Units give the same numbers in any process and order (their random numbers are keyed by identity), so
sharded, resumed and uninterrupted runs produce identical tables, timings excepted. Bit-for-bit equality also needs
the same number of intra-op threads (``OMP_NUM_THREADS``): CPU reductions may split by thread.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaefast import __version__, store
from vaefast.sweep.distributed import DistContext, dist_context, merge_shards, shard_dir, shard_path
from vaefast.sweep.inputs import (
    ModelsArg,
    PointSet,
    as_point_set,
    check_point_shape,
    load_models,
    model_row,
    on_model,
    resolve_radii,
)
from vaefast.sweep.rows import compute_unit
from vaefast.sweep.spec import SweepSpec, WorkUnit, enumerate_units, fingerprint, shard


class SweepMismatchError(ValueError):
    """The database holds a different sweep (other models, points or specification) than the one asked for."""


@dataclass
class SweepResult:
    """What a sweep did.

    Attributes:
        db: the results database.
        units_total: units of the whole sweep.
        units_computed: units computed by this process in this call.
        units_skipped: units of this process already in the database.
        seconds: wall-clock time of the call.
        rank: this process.
        world_size: the number of processes.
    """

    db: Path
    units_total: int
    units_computed: int
    units_skipped: int
    seconds: float
    rank: int = 0
    world_size: int = 1


@dataclass
class SweepPlan:
    """Everything fixed before the first unit runs.

    Attributes:
        db: the results database.
        spec: the specification (radii resolved).
        models: ``{name: model}`` in sweep order.
        points: the points.
        model_rows: the ``models`` table rows.
        fingerprint: the sweep's identity (:func:`vaefast.sweep.spec.fingerprint`).
        units: every unit in canonical order.
    """

    db: Path
    spec: SweepSpec
    models: dict[str, nn.Module]
    points: PointSet
    model_rows: list[dict[str, Any]]
    fingerprint: str
    units: list[WorkUnit]


def plan_sweep(
    models: ModelsArg,
    points: PointSet | torch.Tensor,
    radii: Sequence[float] | float | str,
    db: str | os.PathLike,
    **spec_fields: Any,
) -> SweepPlan:
    """Load the models, check the points, resolve the radii and build the specification and the units.

    Args:
        models: ``{name: nn.Module or run folder}`` (or run folders).
        points: a :class:`PointSet` or a tensor ``[P, *input_shape]``.
        radii: the radii, or ``"auto"`` (:func:`vaefast.sweep.inputs.auto_radii` with the spec's
            ``num_samples`` and ``seed``).
        db: the results database.
        **spec_fields: the other fields of :class:`SweepSpec`.

    Returns:
        The plan.
    """
    points = as_point_set(points)
    loaded, sources = load_models(models)
    check_point_shape(loaded, points.x)
    num_samples = spec_fields.get("num_samples", SweepSpec.num_samples)
    seed = spec_fields.get("seed", SweepSpec.seed)
    resolved = resolve_radii(radii, loaded, points.x, num_samples=num_samples, seed=seed)
    spec = SweepSpec(radii=resolved, **spec_fields)
    rows = [model_row(n, m, sources[n]) for n, m in loaded.items()]
    digest = fingerprint(spec, points.describe(), [(r["name"], r["weights_sha256"]) for r in rows])
    units = enumerate_units(list(loaded), points.x.shape[0], spec.radii, spec.batch_size)
    return SweepPlan(Path(db), spec, loaded, points, rows, digest, units)


def _prepare_db(plan: SweepPlan, resume: bool) -> None:
    """Refuse another sweep's database (or a non-empty one without ``resume``); write meta, models and points."""
    db = plan.db
    conn = store.connect(db)
    try:
        meta = store.get_meta(conn)
        has_rows = bool(conn.execute("SELECT 1 FROM units LIMIT 1").fetchone()) or shard_dir(db).is_dir()
        if "fingerprint" in meta and meta["fingerprint"] != plan.fingerprint:
            raise SweepMismatchError(
                f"db {str(db)!r} holds a different sweep (other models/points/spec); use another file"
            )
        if has_rows and not resume:
            raise ValueError(f"db {str(db)!r} already holds results: pass resume=True (--resume) or remove it")
        if "fingerprint" not in meta:
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            described = json.dumps(plan.points.describe())
            store.set_meta(
                conn,
                {"fingerprint": plan.fingerprint, "spec": plan.spec.to_json(), "points": described,
                 "vaefast_version": __version__, "created": created},
            )  # fmt: skip
        store.write_models_and_points(conn, plan.model_rows, plan.points.rows())
    finally:
        conn.close()


def _prepare(plan: SweepPlan, resume: bool, dist: DistContext) -> None:
    """Rank 0 prepares the database and merges leftover shards of a killed run; every rank sees its error."""
    error = None
    if dist.rank == 0:
        try:
            _prepare_db(plan, resume)
            merge_shards(plan.db)
        except ValueError as exc:
            error = (type(exc).__name__, str(exc))
    error = dist.broadcast(error)
    if error is not None:
        kind, message = error
        raise (SweepMismatchError if kind == SweepMismatchError.__name__ else ValueError)(message)


def _open_output(plan: SweepPlan, dist: DistContext) -> tuple[sqlite3.Connection, set[str]]:
    """The database this process writes (the main one, or its shard) and the units already done."""
    main = store.connect(plan.db, create=False)
    if store.get_meta(main).get("fingerprint") != plan.fingerprint:
        main.close()
        raise SweepMismatchError(f"db {str(plan.db)!r} holds a different sweep")
    done = store.completed_units(main)
    if dist.world_size == 1:
        return main, done
    main.close()
    return store.connect(shard_path(plan.db, dist.rank)), done


def _compute(plan: SweepPlan, todo: Sequence[WorkUnit], out: sqlite3.Connection, dist: DistContext, bar) -> None:
    """Compute and commit ``todo`` one unit at a time."""
    for unit in todo:
        model = plan.models[unit.model]
        x = on_model(model, plan.points.x[unit.first_pos : unit.first_pos + unit.n_points])
        unit_row, results, curves = compute_unit(model, x, unit, plan.spec)
        unit_row.update(rank=dist.rank, world_size=dist.world_size)
        store.commit_unit(out, unit_row, results, curves)
        if bar is not None:
            bar.set_postfix_str(f"{unit.model} r={unit.r:.3g}", refresh=False)
            bar.update(1)


def _run_shard(plan: SweepPlan, dist: DistContext, progress: bool) -> tuple[int, int]:
    """Compute this process's missing units; returns ``(computed, skipped)``."""
    out, done = _open_output(plan, dist)
    mine = shard(plan.units, dist.rank, dist.world_size)
    todo = [u for u in mine if u.unit_id not in done]
    bar = None
    if progress and dist.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"sweep {plan.db.name}", unit="unit", dynamic_ncols=True)
    try:
        _compute(plan, todo, out, dist, bar)
    finally:
        if bar is not None:
            bar.close()
        out.close()
    return len(todo), len(mine) - len(todo)


def execute(plan: SweepPlan, *, resume: bool = False, progress: bool = True) -> SweepResult:
    """Run (or resume) a planned sweep in this process; under ``torchrun`` every process calls it.

    Args:
        plan: the plan (:func:`plan_sweep`).
        resume: skip the units already in the database (without it a non-empty database is an error).
        progress: show a progress bar on rank 0.

    Returns:
        What this process did.
    """
    t_start = time.perf_counter()
    dist = dist_context()
    try:
        _prepare(plan, resume, dist)
        computed, skipped = _run_shard(plan, dist, progress)
        dist.barrier()
        if dist.rank == 0 and dist.world_size > 1:
            merge_shards(plan.db)
        dist.barrier()
    finally:
        dist.close()
    seconds = time.perf_counter() - t_start
    return SweepResult(plan.db, len(plan.units), computed, skipped, seconds, dist.rank, dist.world_size)


def run_sweep(
    models: Mapping[str, nn.Module | str | os.PathLike] | Sequence[str | os.PathLike],
    points: PointSet | torch.Tensor,
    radii: Sequence[float] | float | str,
    db: str | os.PathLike,
    *,
    attack_eps: Sequence[float] = (),
    curve_radii: Sequence[float] | None = None,
    num_samples: int = 500,
    confidence: float = 0.95,
    seed: int = 0,
    batch_size: int = 16,
    margin_tol: float = 0.01,
    margin_max_radius: float | None = None,
    margin_kwargs: Mapping[str, Any] | None = None,
    attack_kwargs: Mapping[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> SweepResult:
    """Run (or resume) a sweep of ``models`` × ``points`` × ``radii`` into the SQLite database ``db``.

    Under ``torchrun`` every process calls this with the same arguments; units are sharded by index and merged
    into ``db`` by rank 0.

    Args:
        models: ``{name: nn.Module or run folder}`` (or a list of run folders).
        points: a :class:`PointSet` or a tensor ``[P, *input_shape]``.
        radii: the reconstruction radii r, or ``"auto"``: quantiles of the points' smallest robust radii r*
            (:func:`vaefast.sweep.inputs.auto_radii`, from a pilot estimate with ``num_samples`` samples).
        db: the SQLite results database.
        attack_eps: budgets of the p̂-vs-attack-norm curves (empty: no curves).
        curve_radii: radii of the curves (default: every radius).
        num_samples: Monte-Carlo samples per estimate.
        confidence: Clopper–Pearson confidence.
        seed: base seed.
        batch_size: points per work unit.
        margin_tol: tolerance of the margin bisection.
        margin_max_radius: bracket limit of the margin search.
        margin_kwargs: further keyword arguments of ``numerical_margin``.
        attack_kwargs: keyword arguments of the curves' ``MaxDamageAttack``.
        resume: skip the units already in ``db`` (without it an existing non-empty ``db`` is an error).
        progress: show a progress bar.

    Returns:
        A :class:`SweepResult`.
    """
    spec_fields = {
        "attack_eps": list(attack_eps), "curve_radii": None if curve_radii is None else list(curve_radii),
        "num_samples": num_samples, "confidence": confidence, "seed": seed, "batch_size": batch_size,
        "margin_tol": margin_tol, "margin_max_radius": margin_max_radius, "margin_kwargs": dict(margin_kwargs or {}),
        "attack_kwargs": dict(attack_kwargs or {}),
    }  # fmt: skip
    t_start = time.perf_counter()
    result = execute(plan_sweep(models, points, radii, db, **spec_fields), resume=resume, progress=progress)
    result.seconds = time.perf_counter() - t_start  # loading the models and choosing the radii included
    return result
