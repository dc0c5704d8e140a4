"""SQLite results store for sweeps: written as work completes, safe to kill at any moment, resumable.

One database file per sweep (``results.db``), written in WAL mode (readers go on while a sweep writes) and put back
in rollback-journal mode when its writer closes it, so that reading a finished database creates no side files.
Read-only commands open it read-only (``mode=ro``): they never create or change a file. A **work unit** (one model,
a block of consecutive points, every radius r) is committed in a single transaction together with its row in
``units``:
either every row of the unit is on disk or none is, so a sweep killed at any point (even ``kill -9``)
resumes by skipping the ids in ``units`` and recomputing only the unit that was in flight. Every table has
a primary key on the item identity and rows are written with plain ``INSERT``, so nothing can be stored
twice; an insert whose row has an unknown or a missing column is refused. In a distributed run only rank 0 opens
the database: the other ranks send their units to it (:mod:`vaefast.sweep.transport`). A database of another schema
version is refused with a message that says so (schema 3 dropped the stored reconstructions: the report recomputes
them from the models).

The tables (from :mod:`vaefast.schema`, the one definition of every column; blobs are little-endian
float32 arrays of shape ``models.input_shape``):

"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vaefast import schema
from vaefast.schema import DETERMINISTIC_TABLES, SCHEMA_VERSION

__doc__ = f"{__doc__}{schema.describe()}\n"

__all__ = [
    "CURVE_COLUMNS",
    "DETERMINISTIC_TABLES",
    "DatabaseBusyError",
    "DatabaseError",
    "WriterLock",
    "RESULT_COLUMNS",
    "SCHEMA_VERSION",
    "TABLES",
    "UNIT_COLUMNS",
    "VERIFY_COLUMNS",
    "SchemaVersionError",
    "SweepHeader",
    "check_database_target",
    "close_writer",
    "commit_unit",
    "completed_units",
    "connect",
    "has_table",
    "export",
    "from_blob",
    "get_meta",
    "model_info",
    "read_table",
    "remove_database",
    "set_meta",
    "table_rows",
    "to_blob",
    "transaction",
    "write_verifications",
]

RESULT_COLUMNS = schema.RESULTS.names
CURVE_COLUMNS = schema.CURVES.names
UNIT_COLUMNS = schema.UNITS.names
VERIFY_COLUMNS = schema.VERIFICATIONS.names
TABLES = tuple(schema.TABLES)
_REQUIRED = ("meta", "models", "points", "units", "results", "curves")  # verifications: created on first verify


class SchemaVersionError(ValueError):
    """A results database written with another schema version (e.g. by an older vaefast)."""


def to_blob(array: Any) -> bytes:
    """A tensor/array as little-endian float32 bytes (the storage format of every blob column).

    Args:
        array: a tensor or anything ``numpy.asarray`` takes.

    Returns:
        The bytes.
    """
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(array, dtype="<f4")).tobytes()


def from_blob(blob: bytes | None, shape: Sequence[int] | None = None) -> np.ndarray | None:
    """Inverse of :func:`to_blob`.

    Args:
        blob: the stored bytes, or ``None``.
        shape: the array's shape (default: flat).

    Returns:
        A float32 array (``None`` stays ``None``).
    """
    if blob is None:
        return None
    arr = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    return arr.reshape(tuple(shape)) if shape is not None else arr


class DatabaseError(OSError):
    """A results database that cannot be opened or written (a folder in its place, a read-only file or folder, a full
    disk, a lock held too long): the message names the file and the reason."""


class DatabaseBusyError(DatabaseError):
    """Another process is writing a sweep into the same database."""


_REASONS = {
    "database or disk is full": "the disk is full",
    "attempt to write a readonly database": "the file or its folder is read-only",
    "readonly database": "the file or its folder is read-only",
    "database is locked": "another process holds it locked",
    "unable to open database file": "cannot open the file (a folder, a missing or unwritable folder, or no permission)",
    "disk i/o error": "a disk I/O error (a full disk, a file size limit or failing storage)",
}


def _reason(exc: BaseException) -> str:
    """A plain-words reason for an SQLite error (its own text where none is known)."""
    text = str(exc)
    low = text.lower()
    for key, reason in _REASONS.items():
        if key in low:
            return reason
    return f"SQLite says: {text}"


def _db_path(conn: sqlite3.Connection) -> str:
    """The file of an open connection (for error messages)."""
    try:
        return str(conn.execute("PRAGMA database_list").fetchone()[2])
    except (sqlite3.Error, TypeError, IndexError):
        return "the results database"


@contextmanager
def _sqlite_errors(path: str | Path, action: str) -> Iterator[None]:
    """Turn an SQLite failure (other than a constraint) into a :class:`DatabaseError` naming ``path``; a file that is
    not a database into a ``ValueError`` that says so."""
    try:
        yield
    except sqlite3.IntegrityError:
        raise
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc).lower():
            raise ValueError(f"{str(path)!r} is not a vaefast results database (SQLite says: {exc})") from None
        raise DatabaseError(f"results database {str(path)!r}: cannot {action}: {_reason(exc)}") from exc


def _is_wal_file(path: Path) -> bool:
    """Whether the database file's header says WAL mode (its read and write versions are 2)."""
    try:
        with open(path, "rb") as fh:
            header = fh.read(20)
    except OSError:
        return False
    return len(header) == 20 and header[18] == 2


def _open(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """Open ``path``: read-only (``mode=ro``: nothing is created or changed; a WAL database without a ``-wal`` file,
    i.e. with no writer, is read ``immutable``, which creates no ``-wal``/``-shm`` files) or for writing, in WAL
    mode."""
    if readonly:
        query = "mode=ro"
        if _is_wal_file(path) and not Path(f"{path}-wal").exists():
            query = "immutable=1"
        target, uri = f"file:{urllib.parse.quote(str(path.absolute()))}?{query}", True
    else:
        target, uri = str(path), False
    with _sqlite_errors(path, "open it"):
        conn = sqlite3.connect(target, timeout=60.0, isolation_level=None, uri=uri)  # explicit BEGIN/COMMIT below
    try:
        with _sqlite_errors(path, "read it"):
            conn.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()  # "file is not a database" shows here
        if not readonly:
            with _sqlite_errors(path, "open it for writing"):
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def _check_existing(conn: sqlite3.Connection, path: Path, readonly: bool = False) -> None:
    """Refuse a database without the sweep tables or with another schema version; add ``verifications`` (unless
    read-only: readers treat a missing ``verifications`` table as empty)."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    missing = set(_REQUIRED) - tables
    if missing:
        raise ValueError(f"{str(path)!r} is not a vaefast results database (missing tables {sorted(missing)})")
    _check_version(conn, path)
    if not readonly:
        with _sqlite_errors(path, "write to it"):
            conn.execute(schema.VERIFICATIONS.create_sql())


def _check_version(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a database whose ``meta`` holds another schema version (a database without ``meta`` passes)."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone():
        return
    version = get_meta(conn).get("schema_version")
    if version != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{str(path)!r} has results schema {version}, this vaefast reads schema {SCHEMA_VERSION}: "
            "run the sweep again with this version (into a new file)"
        )


def check_database_target(path: object, name: str = "db") -> Path:
    """Where a sweep will write its database, checked before any work: a file (or nothing yet) whose folder exists
    or can be created, writable if it exists, in a folder that can be written (WAL mode keeps ``-wal`` and ``-shm``
    files beside it).

    Args:
        path: the database file.
        name: the argument's name in error messages (``"db"``, ``"--db"``).

    Returns:
        The path.

    Raises:
        TypeError / ValueError: naming ``name`` and the path.
    """
    from vaefast._checks import check_output_dir, check_output_file

    path = check_output_file(name, path)
    if path.exists():
        check_output_dir(f"{name} {path}: its folder", path.absolute().parent)
    return path


def connect(path: str | os.PathLike, *, create: bool = True, readonly: bool = False) -> sqlite3.Connection:
    """Open a results database.

    Args:
        path: the database file.
        create: create the file and every table if absent (its folder too); without it the file must exist and
            hold a results database of this schema version.
        readonly: open it read-only (implies ``create=False``): nothing is created or changed, not even an empty
            file (refused as not a results database); ``verifications`` may then be absent (:func:`has_table`).

    Returns:
        An open connection (autocommit; writes go through :class:`transaction`).

    Raises:
        FileNotFoundError: ``create`` is False and the file does not exist.
        TypeError / ValueError: not a path, a folder in its place, not a results database, another schema version.
        DatabaseError: the file cannot be opened or written (naming it and why).
    """
    from vaefast._checks import check_path

    path = check_path("db", path)
    create = create and not readonly
    if not create and not path.exists():
        raise FileNotFoundError(f"results database {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"results database {str(path)!r} is a folder, not a file")
    if create:
        check_database_target(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    conn = _open(path, readonly)
    try:
        if create:
            _check_version(conn, path)  # an older database is refused before anything is added to it
            with transaction(conn):
                for t in schema.TABLES.values():
                    conn.execute(t.create_sql())
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        else:
            _check_existing(conn, path, readonly)
    except BaseException:
        conn.close()
        raise
    return conn


def has_table(conn: sqlite3.Connection, name: str) -> bool:
    """Whether the database holds table ``name`` (a database never verified, opened read-only, has no
    ``verifications``).

    Args:
        conn: an open results database.
        name: the table.

    Returns:
        True when it exists.
    """
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


def close_writer(conn: sqlite3.Connection) -> None:
    """Close a writer's connection, putting the database back in rollback-journal mode where no other connection
    uses it (readers of a finished database then create no ``-wal``/``-shm`` files; busy: it stays in WAL mode).

    Args:
        conn: an open results database.
    """
    try:
        conn.execute("PRAGMA busy_timeout = 0")
        conn.execute("PRAGMA journal_mode=DELETE")
    except sqlite3.Error:
        pass  # another connection still uses it: WAL mode stays, harmlessly
    finally:
        conn.close()


def remove_database(path: str | os.PathLike) -> None:
    """Delete a database file and its ``-wal``, ``-shm`` and ``-journal`` files (those that exist).

    Args:
        path: the database file.
    """
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{os.fspath(path)}{suffix}").unlink(missing_ok=True)


class WriterLock:
    """An exclusive advisory lock (``flock``) on a database file: the mark of the one process writing a sweep into it,
    released by the operating system when that process ends, even by ``kill -9``.

    ``flock`` locks and SQLite's ``fcntl`` locks are independent on Linux, but closing any descriptor of a file drops
    every ``fcntl`` lock the process holds on it: :meth:`release` comes after the process's connections to the
    database are closed. Where ``flock`` is unavailable (Windows, some network filesystems) nothing is locked, and
    SQLite's own locks still keep every commit whole.

    Args:
        path: an existing database file.

    Raises:
        DatabaseBusyError: another process holds the lock.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.fd: int | None = None
        try:
            import fcntl
        except ImportError:  # pragma: no cover  (not POSIX)
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatabaseBusyError(
                f"results database {str(self.path)!r} is being written by another sweep process: wait until it has "
                "finished (every unit it commits is kept), then run this sweep again with --resume (resume=True)"
            ) from None
        except OSError:
            os.close(fd)
            return
        self.fd = fd

    def release(self) -> None:
        """Release the lock (after every connection of this process to the database is closed)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class transaction:  # noqa: N801  (used like a function: ``with transaction(conn):``)
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): one atomic write. An SQLite failure other than a
    constraint (a full disk, a read-only file, a lock held too long) becomes a :class:`DatabaseError` naming the
    file; a constraint violation (``sqlite3.IntegrityError``) passes through as it is.

    Args:
        conn: an open results database.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        with _sqlite_errors(_db_path(self.conn), "start a write"):
            self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                with _sqlite_errors(_db_path(self.conn), "commit"):
                    self.conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            return
        self._rollback()
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.IntegrityError):
            with _sqlite_errors(_db_path(self.conn), "write"):
                raise exc

    def _rollback(self) -> None:
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # no transaction left (SQLite rolls back by itself after some errors)


def get_meta(conn: sqlite3.Connection) -> dict[str, str]:
    """The ``meta`` table as a dict.

    Args:
        conn: an open results database.

    Returns:
        ``{key: value}``.
    """
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def set_meta(conn: sqlite3.Connection, values: Mapping[str, str]) -> None:
    """Write (or replace) ``meta`` keys in one transaction.

    Args:
        conn: an open results database.
        values: ``{key: value}``.
    """
    with transaction(conn):
        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(values.items()))


def _insert(conn: sqlite3.Connection, table: str, rows: Iterable[Mapping[str, Any]], *, verb: str = "INSERT") -> int:
    """Insert ``rows`` (dicts with exactly the table's columns as keys: an unknown or missing key is a ``KeyError``)."""
    t = schema.table(table)
    data = [t.values(row) for row in rows]
    conn.executemany(t.insert_sql(verb), data)
    return len(data)


@dataclass
class SweepHeader:
    """What a sweep records once: its ``meta`` keys (fingerprint, spec, points, versions) and its ``models`` and
    ``points`` rows. They are written in the transaction of the sweep's first committed unit, so a database holds a
    sweep's identity only together with a result of it: a start that fails before its first unit leaves no sweep
    behind that would refuse the corrected command as "a different sweep".

    Attributes:
        meta: the ``meta`` keys and values.
        models: the ``models`` rows.
        points: the ``points`` rows.
        written: set once a commit has written them.
    """

    meta: dict[str, str]
    models: list[dict[str, Any]]
    points: list[dict[str, Any]]
    written: bool = False


def commit_unit(
    conn: sqlite3.Connection,
    unit: Mapping[str, Any],
    results: Sequence[Mapping],
    curves: Sequence[Mapping] = (),
    header: SweepHeader | None = None,
) -> None:
    """Write one completed work unit (its result rows, curve rows and the ``units`` marker) atomically, with the
    sweep's header while it is not yet written.

    Args:
        conn: an open results database.
        unit: the ``units`` row (``finished_at`` is filled in when absent).
        results: its ``results`` rows.
        curves: its ``curves`` rows.
        header: the sweep's :class:`SweepHeader`, written (idempotently) in the same transaction unless
            ``header.written``.

    Raises:
        sqlite3.IntegrityError: one of the ids is already stored (nothing is written).
        KeyError: a row with an unknown or a missing column (nothing is written).
        DatabaseError: the database cannot be written (a full disk, a read-only file...; nothing is written).
    """
    row = dict(unit)
    row.setdefault("finished_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    with transaction(conn):
        if header is not None and not header.written:
            conn.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", list(header.meta.items()))
            _insert(conn, "models", header.models, verb="INSERT OR IGNORE")
            _insert(conn, "points", header.points, verb="INSERT OR IGNORE")
        _insert(conn, "results", results)
        _insert(conn, "curves", curves)
        _insert(conn, "units", [row])
    if header is not None:
        header.written = True


def write_verifications(conn: sqlite3.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Store replayed claims in one transaction, replacing earlier checks of the same claim.

    Args:
        conn: an open results database.
        rows: ``verifications`` rows.
    """
    with transaction(conn):
        _insert(conn, "verifications", rows, verb="INSERT OR REPLACE")


def completed_units(conn: sqlite3.Connection) -> set[str]:
    """Ids of the work units already committed.

    Args:
        conn: an open results database.

    Returns:
        The ``unit_id`` values of ``units``.
    """
    return {r[0] for r in conn.execute("SELECT unit_id FROM units")}


def table_rows(conn: sqlite3.Connection, table: str) -> list[tuple]:
    """All rows of ``table`` ordered by its primary key (the canonical content used to compare databases).

    Args:
        conn: an open results database.
        table: a table name of the schema.

    Returns:
        The rows as tuples in column order.
    """
    t = schema.table(table)
    return conn.execute(f"SELECT {', '.join(t.names)} FROM {t.name} ORDER BY {', '.join(t.key)}").fetchall()


def read_table(conn: sqlite3.Connection, table: str, *, blobs: bool = False) -> list[dict[str, Any]]:
    """Rows of ``table`` as dicts, ordered by its primary key.

    Args:
        conn: an open results database.
        table: a table name of the schema.
        blobs: keep the blob columns (dropped by default).

    Returns:
        One dict per row, keyed by column name.
    """
    t = schema.table(table)
    if table == "verifications" and not has_table(conn, table):
        return []  # a database never verified, opened read-only
    names = [c for c in t.names if blobs or c not in t.blobs]
    cur = conn.execute(f"SELECT {', '.join(names)} FROM {t.name} ORDER BY {', '.join(t.key)}")
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def model_info(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """The ``models`` rows keyed by name.

    Args:
        conn: an open results database.

    Returns:
        ``{name: row}`` with ``config`` parsed from JSON and ``input_shape`` as a tuple.
    """
    out = {}
    for row in read_table(conn, "models"):
        row["config"] = json.loads(row["config"] or "{}")
        row["input_shape"] = tuple(json.loads(row["input_shape"] or "[]"))
        out[row["name"]] = row
    return out


def _write_rows(rows: list[dict[str, Any]], csv_path: str | Path | None, json_path: str | Path | None) -> None:
    if csv_path is not None:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            writer.writerows(rows)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rows, indent=1))


def export(
    db: str | Path, *, csv_path: str | Path | None = None, json_path: str | Path | None = None, table: str = "results"
) -> int:
    """Write ``table`` of ``db`` (rows ordered by key, blob columns dropped) to CSV and/or JSON.

    The results table is exported with its unit's per-point time (``seconds_per_point``).

    Args:
        db: the results database.
        csv_path: CSV file to write (optional).
        json_path: JSON file to write, a list of row objects (optional).
        table: a table name of the schema.

    Returns:
        The number of rows exported.
    """
    from vaefast._checks import check_output_file

    schema.table(table)
    if csv_path is None and json_path is None:
        raise ValueError("give csv_path and/or json_path")
    for name, path in (("csv_path", csv_path), ("json_path", json_path)):
        if path is not None:
            check_output_file(name, path)
    conn = connect(db, readonly=True)
    try:
        rows = read_table(conn, table)
        if table == "results":
            per_point = {u["unit_id"]: (u["seconds_total"] or 0.0) / u["n_points"] for u in read_table(conn, "units")}
            for row in rows:
                row["seconds_per_point"] = per_point.get(row["unit_id"])
    finally:
        conn.close()
    _write_rows(rows, csv_path, json_path)
    return len(rows)
