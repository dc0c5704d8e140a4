"""Running a sweep: plan it, prepare the database, compute the missing units (on one device per process).

Every unit is committed in one transaction with its ``units`` marker, so a sweep killed at any moment (even
``kill -9``) resumes by recomputing only the units not committed. Under ``torchrun`` with N processes (one or many
machines, no shared filesystem): every rank plans the same sweep (checked by fingerprint), rank 0 alone opens the
database, and the units not yet in it are split over the ranks (unit ``i`` of that list to rank ``i mod N``); each
rank computes its share on its own device (``cuda:LOCAL_RANK`` for ``device="cuda"``) and sends each completed unit
to rank 0 (:mod:`vaefast.sweep.transport`), which commits it as it arrives while computing its own share. Units give
the same numbers in any process and order (their random numbers are keyed by identity), so distributed, resumed
and uninterrupted runs produce identical tables, timings excepted. Bit-for-bit equality also needs the same device
type and number of intra-op threads (``OMP_NUM_THREADS``): reductions may split by thread; on a GPU the Monte-Carlo
draws are the same bits and the other floats agree to rounding.
"""

from __future__ import annotations

import dataclasses
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
from vaefast._checks import check_model_outputs, check_path
from vaefast.sweep.distributed import DistContext, dist_context, rank_device
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
from vaefast.sweep.transport import Collector, UnitRows, release, send_done, send_unit, wait_release


class SweepMismatchError(ValueError):
    """The database holds a different sweep (other models, points or specification) than the one asked for."""


@dataclass
class SweepResult:
    """What a sweep did.

    Attributes:
        db: the results database.
        units_total: units of the whole sweep.
        units_computed: units computed by this process in this call.
        units_skipped: units already in the database when the call started (no process computed them again).
        seconds: wall-clock time of the call.
        rank: this process.
        world_size: the number of processes.
        units_received: on rank 0, the units other processes computed and rank 0 committed in this call.
    """

    db: Path
    units_total: int
    units_computed: int
    units_skipped: int
    seconds: float
    rank: int = 0
    world_size: int = 1
    units_received: int = 0


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
    *,
    spec: SweepSpec | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    dist: DistContext | None = None,
    **spec_fields: Any,
) -> SweepPlan:
    """Check everything a sweep needs before any work or write, then load the models onto the device, resolve the
    radii and build the specification and units.

    Checked in this order, nothing written: the database's location (a file, writable, in a folder that can be
    written); the points; every setting; each model, once loaded: finite weights, and one probe on the first point
    (``encode`` returns ``(mu, logvar)`` of shape ``[1, latent_dim]``, ``decode`` the input's shape, all finite);
    last, once the radii are resolved, an existing database read-only: a results database of this schema and of
    this sweep, which the call may add to (``resume``).

    Args:
        models: ``{name: nn.Module or run folder}`` (or run folders).
        points: a :class:`PointSet` or a tensor ``[P, *input_shape]`` in the unit box (kept on the CPU: each unit's
            points are moved to the device once, when it runs); its ``box`` becomes the spec's.
        radii: the radii, or ``"auto"`` (:func:`vaefast.sweep.inputs.auto_radii` with the spec's ``num_samples`` and
            ``seed``; under ``torchrun`` rank 0 chooses them for every rank).
        db: the results database (only read here, if it exists).
        spec: a :class:`SweepSpec` whose radii and box are replaced by these (None: the defaults).
        resume: whether the call may add to a database that already holds results.
        device: where the models run.
        dist: this process's place in the run (default: alone).
        **spec_fields: fields of :class:`SweepSpec` overriding ``spec``'s.

    Returns:
        The plan.
    """
    dist = dist or DistContext()
    db = check_path("db", db)
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be a bool, got {type(resume).__name__}")
    dist.on_rank0(lambda: store.check_database_target(db, "db"))  # only rank 0 writes it: other machines need no folder
    points = as_point_set(points)
    if spec is not None and not isinstance(spec, SweepSpec):
        raise TypeError(f"spec must be a SweepSpec or None, got {type(spec).__name__}")
    base = dataclasses.asdict(spec) if spec is not None else {}
    unknown = sorted(set(spec_fields) - {f.name for f in dataclasses.fields(SweepSpec)} - {"radii", "box"})
    if unknown:
        raise TypeError(f"unknown sweep setting(s) {unknown}; known: {[f.name for f in dataclasses.fields(SweepSpec)]}")
    fields = {**base, **spec_fields, "box": points.box}
    fields.pop("radii", None)
    probe = fields.get("curve_radii") or (1.0,)
    if isinstance(radii, str) and radii != "auto":
        raise ValueError(f"radii must be numbers or 'auto', got {radii!r}")
    SweepSpec(radii=probe if isinstance(radii, str) else radii, **fields)  # every setting checked before any load
    loaded, sources = load_models(models, device)
    check_point_shape(loaded, points.x)
    for name, model in loaded.items():
        check_model_outputs(model, on_model(model, points.x[:1]), f"models[{name!r}]")
    num_samples = fields.get("num_samples", SweepSpec(radii=(1.0,)).num_samples)
    seed = fields.get("seed", 0)
    resolved = dist.on_rank0(lambda: resolve_radii(radii, loaded, points.x, num_samples=num_samples, seed=seed))
    spec = SweepSpec(radii=tuple(resolved), **fields)
    rows = [model_row(n, m, sources[n]) for n, m in loaded.items()]
    digest = fingerprint(spec, points.describe(), [(r["name"], r["weights_sha256"]) for r in rows])
    units = enumerate_units(list(loaded), points.x.shape[0], spec.batch_size)
    dist.on_rank0(lambda: _check_existing_db(db, resume, digest))
    return SweepPlan(Path(db), spec, loaded, points, rows, digest, units)


def _check_resume(db: Path, done: set[str], resume: bool) -> None:
    """Refuse to add to a database that holds results unless resuming."""
    if done and not resume:
        raise ValueError(f"db {str(db)!r} already holds results: pass resume=True (--resume) or remove it")


def _check_existing_db(db: Path, resume: bool, digest: str) -> None:
    """An existing, non-empty ``db`` holds a results database of this schema and of this sweep (or none that has a
    unit), which this call may add to; read only, so that a refusal changes nothing (:func:`_open_db` checks it
    again as the writer)."""
    if not db.exists() or db.stat().st_size == 0:
        return
    try:
        conn = store.connect(db, readonly=True)
    except store.SchemaVersionError as exc:  # an older vaefast's sweep: another sweep as far as resuming goes
        raise SweepMismatchError(str(exc)) from None
    try:
        done = store.completed_units(conn)
        recorded = store.get_meta(conn).get("fingerprint")
    finally:
        conn.close()
    _check_fingerprint(db, recorded, digest, done)
    _check_resume(db, done, resume)


def _check_fingerprint(db: Path, recorded: str | None, digest: str, done: set[str]) -> None:
    """Refuse a database that holds units of another sweep."""
    if done and recorded is not None and recorded != digest:
        raise SweepMismatchError(f"db {str(db)!r} holds a different sweep (other models/points/spec); use another file")


@dataclass
class _Database:
    """Rank 0's hold on the results database during one call: its connection, the writer lock, the sweep's header
    (written with the first unit committed, None when the database already holds it), whether this call created the
    file (``"new"``) or filled an empty one (``"empty"``; None: it held a database), and the units committed before the
    call."""

    path: Path
    conn: Any
    lock: store.WriterLock
    header: store.SweepHeader | None
    created: str | None
    done: set[str]

    def commit(self, unit_row: dict[str, Any], results: list[dict], curves: list[dict]) -> None:
        """Commit one unit (with the header while it is not written).

        Raises:
            DatabaseBusyError: the unit is already stored: another process wrote into this database meanwhile.
        """
        try:
            store.commit_unit(self.conn, unit_row, results, curves, self.header)
        except sqlite3.IntegrityError as exc:
            raise store.DatabaseBusyError(
                f"results database {str(self.path)!r}: unit {unit_row['unit_id']} was committed by another process "
                "meanwhile (two sweeps write into this file): let one finish, then resume"
            ) from exc

    def close(self, failed: bool) -> None:
        """Close the connection, then release the lock; a file this call created and never committed to is removed
        when the call failed (a failed start leaves nothing behind)."""
        store.close_writer(self.conn)
        try:
            if failed and self.created is not None and self.header is not None and not self.header.written:
                _undo(self.path, self.created)
        finally:
            self.lock.release()


def _open_db(plan: SweepPlan, resume: bool) -> _Database:
    """Open (or create) the database as its one writer; refuse another sweep's database (or a non-empty one without
    ``resume``). A database that records a sweep but holds no unit of it is reset (the trace of a failed start)."""
    db = plan.db
    created = "new" if not db.exists() else "empty" if db.stat().st_size == 0 else None
    try:
        conn = store.connect(db)
    except store.SchemaVersionError as exc:  # an older vaefast's sweep: another sweep as far as resuming goes
        raise SweepMismatchError(str(exc)) from None
    try:
        lock = store.WriterLock(db)
    except BaseException:
        conn.close()
        raise
    try:
        header = _header(plan, conn, resume)
    except BaseException:
        store.close_writer(conn)
        if created is not None:
            _undo(db, created)
        lock.release()
        raise
    return _Database(db, conn, lock, header, created, store.completed_units(conn))


def _undo(db: Path, created: str) -> None:
    """Leave ``db`` as this call found it: absent (``"new"``) or an empty file (``"empty"``)."""
    store.remove_database(db)
    if created == "empty":
        db.touch()


def _header(plan: SweepPlan, conn: Any, resume: bool) -> store.SweepHeader | None:
    """The header still to write (None when the database holds this sweep), after refusing another sweep."""
    meta = store.get_meta(conn)
    done = store.completed_units(conn)
    _check_fingerprint(plan.db, meta.get("fingerprint"), plan.fingerprint, done)
    if "fingerprint" in meta and meta["fingerprint"] != plan.fingerprint:
        with store.transaction(conn):  # a sweep recorded without any unit: nothing to keep
            for table in ("results", "curves", "models", "points"):
                conn.execute(f"DELETE FROM {table}")
            conn.execute("DELETE FROM meta WHERE key != 'schema_version'")
        meta = {}
    _check_resume(plan.db, done, resume)
    if "fingerprint" in meta:
        return None
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    described = json.dumps(plan.points.describe())
    values = {"fingerprint": plan.fingerprint, "spec": plan.spec.to_json(), "points": described,
              "vaefast_version": __version__, "created": created}  # fmt: skip
    return store.SweepHeader(values, plan.model_rows, plan.points.rows())


def _prepare(plan: SweepPlan, resume: bool, dist: DistContext) -> tuple[set[str], _Database | None]:
    """Check that every rank plans the same sweep; rank 0 opens the database and tells every rank what is done.

    Returns:
        The ids of the units already committed, and (on rank 0) the open database.
    """
    for rank, digest in enumerate(dist.all_gather(plan.fingerprint)):
        if digest != plan.fingerprint:
            raise SweepMismatchError(
                f"rank {rank} plans a different sweep than this rank (other models, weights, points or spec): every "
                "process must be given the same sweep"
            )
    held: list[_Database] = []

    def open_db() -> list[str]:
        held.append(_open_db(plan, resume))
        return sorted(held[0].done)

    return set(dist.on_rank0(open_db)), (held[0] if held else None)


def _compute(plan: SweepPlan, unit: WorkUnit, dist: DistContext) -> UnitRows:
    """One unit's rows: its points moved to the model's device once, its results back on the CPU in the rows."""
    model = plan.models[unit.model]
    x = on_model(model, plan.points.x[unit.first_pos : unit.first_pos + unit.n_points])
    unit_row, results, curves = compute_unit(model, x, unit, plan.spec)
    unit_row.update(rank=dist.rank, world_size=dist.world_size)
    return unit_row, results, curves


def _progress_bar(plan: SweepPlan, total: int, progress: bool):
    """Progress over the units still to compute (``None`` without progress)."""
    if not progress:
        return None
    from vaefast._progress import progress_bar

    return progress_bar(total=total, desc=f"sweep {plan.db.name}", unit="unit")


def _run_rank0(
    plan: SweepPlan, dist: DistContext, todo: Sequence[WorkUnit], progress: bool, database: _Database
) -> tuple[int, int]:
    """Rank 0: compute and commit its share while the other ranks' units are received and committed as they arrive.

    Returns:
        ``(units computed here, units received from other ranks)``.
    """
    mine = shard(todo, 0, dist.world_size)
    bar = _progress_bar(plan, len(todo), progress)
    on_commit = None if bar is None else lambda _row: bar.update(1)
    collector = Collector(dist, plan.db, on_commit, header=database.header)
    try:
        collector.start()
        for unit in mine:
            database.commit(*_compute(plan, unit, dist))
            if bar is not None:
                bar.set_postfix_str(f"{unit.model} pos={unit.first_pos}", refresh=False)
                bar.update(1)
            collector.check()
        collector.wait()
        release(dist)
    except BaseException:
        dist.leave_open = collector.alive  # receivers still wait on the group: leave it to the process's end
        raise
    finally:
        if bar is not None:
            bar.close()
    return len(mine), collector.received


def _run_peer(plan: SweepPlan, dist: DistContext, todo: Sequence[WorkUnit]) -> int:
    """A rank other than 0: compute its share, send each unit to rank 0, wait until the sweep is committed.

    Returns:
        The number of units computed here.
    """
    mine = shard(todo, dist.rank, dist.world_size)
    for unit in mine:
        send_unit(dist, _compute(plan, unit, dist))
    send_done(dist)
    wait_release(dist)
    return len(mine)


def execute(
    plan: SweepPlan, dist: DistContext | None = None, *, resume: bool = False, progress: bool = False
) -> SweepResult:
    """Run (or resume) a planned sweep in this process; under ``torchrun`` every process calls it.

    The units not yet in the database are split over the ranks (unit ``i`` of that list goes to rank
    ``i mod world_size``); rank 0 alone opens the database.

    Args:
        plan: the plan (:func:`plan_sweep`).
        dist: this process's place in the run (default: alone).
        resume: skip the units already in the database (without it a non-empty database is an error).
        progress: show a progress bar on rank 0.

    Returns:
        What this process did.
    """
    dist = dist or DistContext()
    t_start = time.perf_counter()
    done, database = _prepare(plan, resume, dist)
    todo = [u for u in plan.units if u.unit_id not in done]
    received = 0
    if dist.rank == 0:
        assert database is not None
        ok = False
        try:
            computed, received = _run_rank0(plan, dist, todo, progress, database)
            ok = True
        finally:
            database.close(failed=not ok)
    else:
        computed = _run_peer(plan, dist, todo)
    seconds = time.perf_counter() - t_start
    return SweepResult(plan.db, len(plan.units), computed, len(done), seconds, dist.rank, dist.world_size, received)


def run_sweep(
    models: Mapping[str, nn.Module | str | os.PathLike] | Sequence[str | os.PathLike],
    points: PointSet | torch.Tensor,
    radii: Sequence[float] | float | str,
    db: str | os.PathLike,
    *,
    spec: SweepSpec | None = None,
    resume: bool = False,
    progress: bool = False,
    device: str | torch.device = "cpu",
    **spec_fields: Any,
) -> SweepResult:
    """Run (or resume) a sweep of ``models`` × ``points`` × ``radii`` into the SQLite database ``db``.

    Under ``torchrun`` every process calls this with the same arguments (on every machine: the models, or their run
    folders, and the points must be there); only rank 0 opens ``db`` (a path on rank 0's machine), the others send
    their units to it over a gloo group. A killed run (any rank, even ``kill -9``) keeps every committed unit: run
    it again with ``resume=True`` and any number of processes.

    Args:
        models: ``{name: nn.Module or run folder}`` (or a list of run folders).
        points: a :class:`PointSet` (with its data ``box``) or a tensor ``[P, *input_shape]`` in the unit box.
        radii: the reconstruction radii r, or ``"auto"``: quantiles of the points' smallest robust radii r*
            (:func:`vaefast.sweep.inputs.auto_radii`, from a pilot estimate with ``num_samples`` samples).
        db: the SQLite results database.
        spec: the settings (:class:`SweepSpec`: samples, confidence, seed, batch size, curve budgets, the margin
            search's :class:`~vaefast.core.options.MarginOptions`); None: the defaults.
        resume: skip the units already in ``db`` (without it an existing non-empty ``db`` is an error).
        progress: show progress on rank 0 (a bar on a terminal, one line in a log).
        device: where the models run: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a ``torch.device``
            (a CUDA request without a visible GPU is an error). Under ``torchrun`` a plain ``"cuda"`` is each rank's
            ``cuda:LOCAL_RANK``. Models are moved there once (an in-memory module elsewhere is copied, the caller's
            stays where it is); each unit's points once per unit; results come back to the CPU as rows. The device
            is not part of the sweep's identity: a sweep may be resumed on another one.
        **spec_fields: fields of :class:`SweepSpec` overriding ``spec``'s (e.g. ``num_samples=500``,
            ``attack_eps=[0.5, 1.0]``, ``margin=MarginOptions(tol=0.02)``).

    Returns:
        A :class:`SweepResult`.
    """
    t_start = time.perf_counter()
    dist = dist_context()
    try:
        device = rank_device(device, dist.local_rank, dist.world_size)
        plan = plan_sweep(models, points, radii, db, spec=spec, resume=resume, device=device, dist=dist, **spec_fields)
        result = execute(plan, dist, resume=resume, progress=progress)
    finally:
        dist.close()
    result.seconds = time.perf_counter() - t_start  # loading the models and choosing the radii included
    return result
