"""SQLite results store for sweeps: written as work completes, safe to kill at any moment, resumable.

One database file per sweep (``results.db``), opened in WAL mode. A **work unit** (one model, one radius r,
one block of consecutive points) is committed in a single transaction together with its row in ``units``:
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
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vaefast import schema
from vaefast.schema import DETERMINISTIC_TABLES, SCHEMA_VERSION

__doc__ = f"{__doc__}{schema.describe()}\n"

__all__ = [
    "CURVE_COLUMNS",
    "DETERMINISTIC_TABLES",
    "RESULT_COLUMNS",
    "SCHEMA_VERSION",
    "TABLES",
    "UNIT_COLUMNS",
    "VERIFY_COLUMNS",
    "SchemaVersionError",
    "commit_unit",
    "completed_units",
    "connect",
    "export",
    "from_blob",
    "get_meta",
    "model_info",
    "read_table",
    "set_meta",
    "table_rows",
    "to_blob",
    "transaction",
    "write_models_and_points",
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


def _open(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=60.0, isolation_level=None)  # explicit BEGIN/COMMIT below
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.DatabaseError as exc:  # e.g. a CSV file: "file is not a database"
        conn.close()
        raise ValueError(f"{str(path)!r} is not a vaefast results database (SQLite says: {exc})") from None
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _check_existing(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a database without the sweep tables or with another schema version; add ``verifications``."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    missing = set(_REQUIRED) - tables
    if missing:
        raise ValueError(f"{str(path)!r} is not a vaefast results database (missing tables {sorted(missing)})")
    _check_version(conn, path)
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


def connect(path: str | Path, *, create: bool = True) -> sqlite3.Connection:
    """Open a results database in WAL mode.

    Args:
        path: the database file.
        create: create the file and every table if absent; without it the file must exist and hold a results
            database of this schema version.

    Returns:
        An open connection (autocommit; writes go through :class:`transaction`).
    """
    path = Path(path)
    if not create and not path.exists():
        raise FileNotFoundError(f"results database {str(path)!r} does not exist")
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = _open(path)
    try:
        if create:
            _check_version(conn, path)  # an older database is refused before anything is added to it
            with transaction(conn):
                for t in schema.TABLES.values():
                    conn.execute(t.create_sql())
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        else:
            _check_existing(conn, path)
    except Exception:
        conn.close()
        raise
    return conn


class transaction:  # noqa: N801  (used like a function: ``with transaction(conn):``)
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): one atomic write.

    Args:
        conn: an open results database.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


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


def write_models_and_points(conn: sqlite3.Connection, models: Sequence[Mapping], points: Sequence[Mapping]) -> None:
    """Insert the sweep's model and point descriptions (idempotent: rows already present are kept).

    Args:
        conn: an open results database.
        models: ``models`` rows.
        points: ``points`` rows.
    """
    with transaction(conn):
        _insert(conn, "models", models, verb="INSERT OR IGNORE")
        _insert(conn, "points", points, verb="INSERT OR IGNORE")


def commit_unit(
    conn: sqlite3.Connection, unit: Mapping[str, Any], results: Sequence[Mapping], curves: Sequence[Mapping] = ()
) -> None:
    """Write one completed work unit (its result rows, curve rows and the ``units`` marker) atomically.

    Args:
        conn: an open results database.
        unit: the ``units`` row (``finished_at`` is filled in when absent).
        results: its ``results`` rows.
        curves: its ``curves`` rows.

    Raises:
        sqlite3.IntegrityError: one of the ids is already stored (nothing is written).
        KeyError: a row with an unknown or a missing column (nothing is written).
    """
    row = dict(unit)
    row.setdefault("finished_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    with transaction(conn):
        _insert(conn, "results", results)
        _insert(conn, "curves", curves)
        _insert(conn, "units", [row])


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
    schema.table(table)
    conn = connect(db, create=False)
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
