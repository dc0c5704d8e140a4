"""SQLite results store for sweeps: written as work completes, safe to kill at any moment, resumable.

One database file per sweep (``results.db``), opened in WAL mode. A **work unit** (one model, one radius r,
one block of consecutive points) is committed in a single transaction together with its row in ``units``:
either every row of the unit is on disk or none is, so a sweep killed at any point (even ``kill -9``)
resumes by skipping the ids in ``units`` and recomputing only the unit that was in flight. Every table has
a primary key on the item identity and rows are written with plain ``INSERT``, so nothing can be stored
twice. Distributed runs write one shard database per rank (same schema) and rank 0 merges them.

Schema (all blobs are little-endian float32 arrays; their shape is ``models.input_shape``):

``meta(key TEXT PRIMARY KEY, value TEXT)``
    ``spec`` (the sweep specification as JSON), ``fingerprint`` (sha256 of spec + model weights + points:
    resuming with a different sweep is refused), ``schema_version``, ``vaefast_version``, ``created``.
``models(name TEXT PRIMARY KEY, source TEXT, config TEXT, beta REAL, objective TEXT, latent_dim INTEGER,
input_shape TEXT, likelihood TEXT, weights_sha256 TEXT)``
    one row per model; ``config`` is the model's config JSON (or ``{}``), ``source`` the run folder or
    ``<memory>``.
``points(pos INTEGER PRIMARY KEY, dataset TEXT, split TEXT, idx INTEGER, label INTEGER, x BLOB)``
    the swept data points; ``pos`` is the point's position in the sweep (the global point index that keys
    the random numbers), ``idx`` its index in the dataset split.
``units(unit_id TEXT PRIMARY KEY, model TEXT, r REAL, first_pos INTEGER, n_points INTEGER, rank INTEGER,
world_size INTEGER, seconds_estimate REAL, seconds_bound REAL, seconds_margin REAL, seconds_evidence REAL,
seconds_curve REAL, seconds_total REAL, finished_at TEXT)``
    one row per completed work unit: the commit marker used by resume, plus wall-clock timings (the only
    non-deterministic columns of the database; per-item time = ``seconds_total / n_points``).
``results(item_id TEXT PRIMARY KEY, unit_id TEXT, model TEXT, pos INTEGER, r REAL, seed INTEGER, p_hat REAL,
ci_low REAL, ci_high REAL, hits INTEGER, num_samples INTEGER, robust INTEGER, r_star REAL, bound REAL,
certified_bound REAL, spectral_bound REAL, whitened_bound REAL, latent_margin REAL, sigma_min REAL,
jac_frobenius REAL, jac_spectral REAL, certified INTEGER, max_radius REAL, margin REAL, margin_lower REAL,
bracketed INTEGER, margin_evals INTEGER, adv_norm REAL, p_hat_adv REAL, ci_low_adv REAL, ci_high_adv REAL,
hits_adv INTEGER, num_samples_adv INTEGER, ll_clean REAL, ll_adv REAL, ll_drop REAL, rel_ll_degradation REAL,
delta BLOB, recon_clean BLOB, recon_adv BLOB)``
    one row per (model, point, r). The clean point: p̂_r(x) = hits / num_samples with its Clopper–Pearson
    interval, r*, every bound variant and its components, ``certified`` (p̂ > 1/2: the one clean-point decision
    that both the bound and the margin search use). ``max_radius``: the largest ‖δ‖₂ the data box allows at the
    point (the search limit; NULL without a box). The numerical margin: ``margin`` (upper end of the bisection
    bracket, where the attack broke r-robustness), ``margin_lower`` (largest radius where it did not),
    ``bracketed``, ``margin_evals``. Its **evidence**: ``delta`` (the perturbation that broke r-robustness at
    ``margin``, ‖δ‖₂ = ``adv_norm`` = ``margin``, x + δ inside the box), the p̂ the search saw there
    (``p_hat_adv`` = ``hits_adv / num_samples_adv`` ≤ 1/2, with its interval ``ci_low_adv``/``ci_high_adv``,
    drawn with ``seed`` and the point's ``pos``), the log-likelihood of the clean x under z = μ(x) and
    z* = μ(x+δ) (``ll_clean``, ``ll_adv``), the drop ``ll_drop`` = ll_clean − ll_adv in nats and
    ``rel_ll_degradation`` = |ll_adv − ll_clean| / |ll_clean| (≥ 0), and the reconstructions g(μ(x))
    (``recon_clean``, always) and g(μ(x+δ)) (``recon_adv``). Evidence columns are NULL where the margin is 0
    (the clean point is not r-robust: δ = 0 is its own evidence) or the search did not bracket.
``curves(item_id TEXT PRIMARY KEY, unit_id TEXT, model TEXT, pos INTEGER, r REAL, eps REAL, p_hat REAL,
ci_low REAL, ci_high REAL, adv_norm REAL, ll_drop REAL, rel_ll_degradation REAL)``
    one row per (model, point, r, attack budget eps): p̂_r under the max-damage attack with ‖δ‖ ≤ eps (the
    p̂-vs-attack-norm curves) and the likelihood degradation at that fixed budget.
``verifications(item_id TEXT, kind TEXT, p_hat REAL, ci_low REAL, ci_high REAL, hits INTEGER, num_samples INTEGER,
seed INTEGER, confidence REAL, confirmed INTEGER, reason TEXT, checked_at TEXT, PRIMARY KEY (item_id, kind))``
    written by ``vaefast verify`` (:mod:`vaefast.verify`): one row per replayed claim of a results row, ``kind``
    ``"delta"`` (x + δ is not r-robust) or ``"clean"`` (the certified point is r-robust at δ = 0), with the fresh
    estimate from an independent random stream, its interval at ``confidence``, and whether it confirmed the claim.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = "2"

RESULT_COLUMNS: tuple[str, ...] = (
    "item_id",
    "unit_id",
    "model",
    "pos",
    "r",
    "seed",
    "p_hat",
    "ci_low",
    "ci_high",
    "hits",
    "num_samples",
    "robust",
    "r_star",
    "bound",
    "certified_bound",
    "spectral_bound",
    "whitened_bound",
    "latent_margin",
    "sigma_min",
    "jac_frobenius",
    "jac_spectral",
    "certified",
    "max_radius",
    "margin",
    "margin_lower",
    "bracketed",
    "margin_evals",
    "adv_norm",
    "p_hat_adv",
    "ci_low_adv",
    "ci_high_adv",
    "hits_adv",
    "num_samples_adv",
    "ll_clean",
    "ll_adv",
    "ll_drop",
    "rel_ll_degradation",
    "delta",
    "recon_clean",
    "recon_adv",
)
CURVE_COLUMNS: tuple[str, ...] = (
    "item_id",
    "unit_id",
    "model",
    "pos",
    "r",
    "eps",
    "p_hat",
    "ci_low",
    "ci_high",
    "adv_norm",
    "ll_drop",
    "rel_ll_degradation",
)
UNIT_COLUMNS: tuple[str, ...] = (
    "unit_id",
    "model",
    "r",
    "first_pos",
    "n_points",
    "rank",
    "world_size",
    "seconds_estimate",
    "seconds_bound",
    "seconds_margin",
    "seconds_evidence",
    "seconds_curve",
    "seconds_total",
    "finished_at",
)
BLOB_COLUMNS = frozenset({"delta", "recon_clean", "recon_adv", "x"})

VERIFY_COLUMNS: tuple[str, ...] = (
    "item_id",
    "kind",
    "p_hat",
    "ci_low",
    "ci_high",
    "hits",
    "num_samples",
    "seed",
    "confidence",
    "confirmed",
    "reason",
    "checked_at",
)
_INT_COLUMNS = frozenset(
    {"pos", "seed", "hits", "num_samples", "robust", "certified", "bracketed", "margin_evals", "hits_adv"}
    | {"num_samples_adv", "confirmed"}
)
_TEXT_COLUMNS = frozenset({"item_id", "unit_id", "model", "kind", "reason", "checked_at"})


def _column_type(name: str) -> str:
    if name in BLOB_COLUMNS:
        return "BLOB"
    if name in _TEXT_COLUMNS:
        return "TEXT"
    if name in _INT_COLUMNS:
        return "INTEGER"
    return "REAL"


def _create_table(name: str, columns: Sequence[str], types: Mapping[str, str] | None = None) -> str:
    types = dict(types or {})
    cols = [f"{c} {types.get(c, _column_type(c))}" + (" PRIMARY KEY" if i == 0 else "") for i, c in enumerate(columns)]
    return f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(cols)})"


SCHEMA: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
    "CREATE TABLE IF NOT EXISTS models (name TEXT PRIMARY KEY, source TEXT, config TEXT, beta REAL, objective TEXT, "
    "latent_dim INTEGER, input_shape TEXT, likelihood TEXT, weights_sha256 TEXT)",
    "CREATE TABLE IF NOT EXISTS points (pos INTEGER PRIMARY KEY, dataset TEXT, split TEXT, idx INTEGER, "
    "label INTEGER, x BLOB)",
    _create_table(
        "units",
        UNIT_COLUMNS,
        {
            "first_pos": "INTEGER",
            "n_points": "INTEGER",
            "rank": "INTEGER",
            "world_size": "INTEGER",
            "finished_at": "TEXT",
        },
    ),
    _create_table("results", RESULT_COLUMNS),
    _create_table("curves", CURVE_COLUMNS),
    "CREATE TABLE IF NOT EXISTS verifications ("
    + ", ".join(f"{c} {_column_type(c)}" for c in VERIFY_COLUMNS)
    + ", PRIMARY KEY (item_id, kind))",
)
TABLES = ("meta", "models", "points", "units", "results", "curves", "verifications")

DETERMINISTIC_TABLES = ("models", "points", "results", "curves")


def to_blob(array: Any) -> bytes:
    """A tensor/array as little-endian float32 bytes (the storage format of every blob column)."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(array, dtype="<f4")).tobytes()


def from_blob(blob: bytes | None, shape: Sequence[int] | None = None) -> np.ndarray | None:
    """Inverse of :func:`to_blob` (``None`` stays ``None``)."""
    if blob is None:
        return None
    arr = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    return arr.reshape(tuple(shape)) if shape is not None else arr


def connect(path: str | Path, *, create: bool = True) -> sqlite3.Connection:
    """Open (and with ``create`` initialise) a results database in WAL mode with the schema above."""
    path = Path(path)
    if not create and not path.exists():
        raise FileNotFoundError(f"results database {str(path)!r} does not exist")
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=60.0, isolation_level=None)  # explicit BEGIN/COMMIT below
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.DatabaseError as exc:  # e.g. a CSV file: "file is not a database"
        conn.close()
        raise ValueError(f"{str(path)!r} is not a vaefast results database (SQLite says: {exc})") from None
    conn.execute("PRAGMA synchronous=NORMAL")
    if create:
        with transaction(conn):
            for stmt in SCHEMA:
                conn.execute(stmt)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
    else:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = {"meta", "models", "points", "units", "results", "curves"} - tables
        if missing:
            conn.close()
            raise ValueError(f"{str(path)!r} is not a vaefast results database (missing tables {sorted(missing)})")
        version = get_meta(conn).get("schema_version")
        if version != SCHEMA_VERSION:
            conn.close()
            raise ValueError(
                f"{str(path)!r} has results schema {version}, this vaefast reads schema {SCHEMA_VERSION}: "
                "run the sweep again with this version"
            )
        conn.execute(SCHEMA[-1])  # the verifications table (created on first verify)
    return conn


class transaction:  # noqa: N801  (used like a function: ``with transaction(conn):``)
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): one atomic write."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def get_meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def set_meta(conn: sqlite3.Connection, values: Mapping[str, str]) -> None:
    with transaction(conn):
        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(values.items()))


def _insert(
    conn: sqlite3.Connection,
    table: str,
    columns: Sequence[str],
    rows: Iterable[Mapping[str, Any]],
    *,
    verb: str = "INSERT",
) -> int:
    """Insert ``rows`` (dicts with exactly the keys ``columns``: an unknown or missing key is a ``KeyError``)."""
    sql = f"{verb} INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    wanted = set(columns)
    data = []
    for row in rows:
        if row.keys() != wanted:
            unknown, missing = sorted(row.keys() - wanted), sorted(wanted - row.keys())
            raise KeyError(f"{table} row: unknown keys {unknown}, missing keys {missing}")
        data.append(tuple(row[c] for c in columns))
    conn.executemany(sql, data)
    return len(data)


def write_models_and_points(conn: sqlite3.Connection, models: Sequence[Mapping], points: Sequence[Mapping]) -> None:
    """Insert the sweep's model and point descriptions (idempotent: rows already present are kept)."""
    with transaction(conn):
        for table, rows in (("models", models), ("points", points)):
            for row in rows:
                cols = list(row)
                conn.execute(
                    f"INSERT OR IGNORE INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    tuple(row[c] for c in cols),
                )


def commit_unit(
    conn: sqlite3.Connection, unit: Mapping[str, Any], results: Sequence[Mapping], curves: Sequence[Mapping] = ()
) -> None:
    """Write one completed work unit (its result rows, curve rows and the ``units`` marker) atomically.

    Raises ``sqlite3.IntegrityError`` (and writes nothing) if any of the ids is already stored.
    """
    row = dict(unit)
    row.setdefault("finished_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    with transaction(conn):
        _insert(conn, "results", RESULT_COLUMNS, results)
        _insert(conn, "curves", CURVE_COLUMNS, curves)
        _insert(conn, "units", UNIT_COLUMNS, [row])


def write_verifications(conn: sqlite3.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Store replayed claims (``verifications`` rows) in one transaction, replacing earlier checks of the same claim."""
    with transaction(conn):
        _insert(conn, "verifications", VERIFY_COLUMNS, rows, verb="INSERT OR REPLACE")


def completed_units(conn: sqlite3.Connection) -> set[str]:
    """Ids of the work units already committed."""
    return {r[0] for r in conn.execute("SELECT unit_id FROM units")}


def merge_into(conn: sqlite3.Connection, shard_path: str | Path) -> int:
    """Copy every row of a shard database into ``conn`` in one transaction; returns the number of units added.

    Units already present in ``conn`` are skipped whole (their rows too), so merging twice is harmless.
    """
    shard_path = Path(shard_path)
    conn.execute("ATTACH DATABASE ? AS shard", (str(shard_path),))
    try:
        with transaction(conn):
            new_units = [
                r[0]
                for r in conn.execute(
                    "SELECT unit_id FROM shard.units WHERE unit_id NOT IN (SELECT unit_id FROM main.units)"
                )
            ]
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS _new_units (unit_id TEXT PRIMARY KEY)")
            conn.execute("DELETE FROM _new_units")
            conn.executemany("INSERT INTO _new_units VALUES (?)", [(u,) for u in new_units])
            for table, columns in (("results", RESULT_COLUMNS), ("curves", CURVE_COLUMNS), ("units", UNIT_COLUMNS)):
                cols = ", ".join(columns)
                conn.execute(
                    f"INSERT INTO main.{table} ({cols}) SELECT {cols} FROM shard.{table} "
                    "WHERE unit_id IN (SELECT unit_id FROM _new_units)"
                )
            for table in ("models", "points"):
                conn.execute(f"INSERT OR IGNORE INTO main.{table} SELECT * FROM shard.{table}")
    finally:
        conn.execute("DETACH DATABASE shard")
    return len(new_units)


def table_rows(conn: sqlite3.Connection, table: str) -> list[tuple]:
    """All rows of ``table`` ordered by its primary key (the canonical content used to compare databases)."""
    if table not in TABLES:
        raise ValueError(f"table must be one of {list(TABLES)}, got {table!r}")
    key = {"meta": "key", "models": "name", "points": "pos", "units": "unit_id", "verifications": "item_id, kind"}
    key = key.get(table, "item_id")
    return conn.execute(f"SELECT * FROM {table} ORDER BY {key}").fetchall()


def read_table(conn: sqlite3.Connection, table: str, *, blobs: bool = False) -> list[dict[str, Any]]:
    """Rows of ``table`` as dicts (blob columns dropped unless ``blobs``)."""
    if table not in TABLES:
        raise ValueError(f"table must be one of {list(TABLES)}, got {table!r}")
    cur = conn.execute(f"SELECT * FROM {table}")
    names = [d[0] for d in cur.description]
    out = []
    for row in cur.fetchall():
        d = dict(zip(names, row, strict=True))
        if not blobs:
            for c in BLOB_COLUMNS & d.keys():
                d.pop(c)
        out.append(d)
    return out


def model_info(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """``models`` rows keyed by name, with ``config`` parsed and ``input_shape`` as a tuple."""
    out = {}
    for row in read_table(conn, "models"):
        row["config"] = json.loads(row["config"] or "{}")
        row["input_shape"] = tuple(json.loads(row["input_shape"] or "[]"))
        out[row["name"]] = row
    return out


def export(
    db: str | Path, *, csv_path: str | Path | None = None, json_path: str | Path | None = None, table: str = "results"
) -> int:
    """Write ``table`` of ``db`` (rows ordered by key, blob columns dropped) to CSV and/or JSON; returns the row count.

    The results table is exported joined with its unit's per-point time (``seconds_per_point``).
    """
    import csv

    conn = connect(db, create=False)
    try:
        rows = sorted(read_table(conn, table), key=lambda r: next(iter(r.values())))
        if table == "results":
            per_point = {u["unit_id"]: (u["seconds_total"] or 0.0) / u["n_points"] for u in read_table(conn, "units")}
            for row in rows:
                row["seconds_per_point"] = per_point.get(row["unit_id"])
    finally:
        conn.close()
    if csv_path is not None:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as fh:
            cols = list(rows[0]) if rows else []
            writer = csv.DictWriter(fh, fieldnames=cols)
            writer.writeheader()
            writer.writerows(rows)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rows, indent=1))
    return len(rows)
