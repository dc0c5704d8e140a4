"""The SQLite results store: schema, atomic unit commits, no duplicates, resume bookkeeping, versions, export."""

from __future__ import annotations

import csv
import json
import sqlite3

import numpy as np
import pytest

from vaefast import schema, store


def _unit(uid: str, n: int = 2) -> dict:
    return {**dict.fromkeys(store.UNIT_COLUMNS[:-1]), "unit_id": uid, "model": "m", "first_pos": 0,
            "n_points": n, "rank": 0, "world_size": 1, "seconds_total": 0.5}  # fmt: skip


def _rows(uid: str, positions, r: float = 1.0) -> list[dict]:
    return [
        {**dict.fromkeys(store.RESULT_COLUMNS), "item_id": f"m|r={r!r}|pos={p}", "unit_id": uid, "model": "m",
         "pos": p, "r": r, "p_hat": 0.5 + p / 100, "margin": 0.1 * p, "bound": 0.05 * p, "certified": 1,
         "bracketed": 1, "delta": store.to_blob(np.ones(3) * p)}
        for p in positions
    ]  # fmt: skip


def test_inserts_reject_unknown_and_missing_keys(tmp_path):
    """A misspelt column is an error, never a silent NULL; nothing of the unit is written."""
    conn = store.connect(tmp_path / "r.db")
    (row,) = _rows("u0", [0])
    misspelt = {**{k: v for k, v in row.items() if k != "margin"}, "margn": 0.3}
    with pytest.raises(KeyError, match=r"unknown keys \['margn'\], missing keys \['margin'\]"):
        store.commit_unit(conn, _unit("u0", 1), [misspelt])
    with pytest.raises(KeyError, match="missing keys"):
        store.commit_unit(conn, {k: v for k, v in _unit("u0", 1).items() if k != "rank"}, [row])
    assert store.completed_units(conn) == set() and conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0
    conn.close()


def test_schema_and_wal(tmp_path):
    conn = store.connect(tmp_path / "r.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "models", "points", "units", "results", "curves"} <= tables
    cols = [r[1] for r in conn.execute("PRAGMA table_info(results)")]
    assert tuple(cols) == store.RESULT_COLUMNS
    pk = [r[1] for r in conn.execute("PRAGMA table_info(results)") if r[5]]
    assert pk == ["item_id"]
    # the module docstring documents every column of every table
    for c in (*store.RESULT_COLUMNS, *store.CURVE_COLUMNS, *store.UNIT_COLUMNS):
        assert c in store.__doc__
    assert store.get_meta(conn)["schema_version"] == store.SCHEMA_VERSION
    conn.close()


def test_tables_are_derived_from_the_schema(tmp_path):
    """Every table the store creates has exactly the schema's columns, types and key; its constants are the
    schema's; reads drop exactly the schema's blob columns; the docstring documents every column of every table."""
    conn = store.connect(tmp_path / "r.db")
    assert set(store.TABLES) == set(schema.TABLES)
    for name, table in schema.TABLES.items():
        info = list(conn.execute(f"PRAGMA table_info({name})"))
        assert tuple(r[1] for r in info) == table.names, name
        assert [r[2] for r in info] == [c.type for c in table.columns], name
        assert tuple(r[1] for r in sorted((r for r in info if r[5]), key=lambda r: r[5])) == table.key, name
        for column in table.columns:
            assert f"``{column.name}``" in store.__doc__ or column.name in ("key", "value"), (name, column.name)
    assert (store.RESULT_COLUMNS, store.CURVE_COLUMNS) == (schema.RESULTS.names, schema.CURVES.names)
    assert (store.UNIT_COLUMNS, store.VERIFY_COLUMNS) == (schema.UNITS.names, schema.VERIFICATIONS.names)
    store.commit_unit(conn, _unit("u0"), _rows("u0", [0]))
    (row,) = store.read_table(conn, "results")
    assert set(row) == set(schema.RESULTS.names) - schema.RESULTS.blobs == set(schema.RESULTS.names) - {"delta"}
    assert not {"recon_clean", "recon_adv"} & set(schema.RESULTS.names)  # recomputed from the models, not stored
    assert set(store.read_table(conn, "results", blobs=True)[0]) == set(schema.RESULTS.names)
    conn.close()


def test_commit_unit_is_atomic_and_rejects_duplicates(tmp_path):
    conn = store.connect(tmp_path / "r.db")
    store.commit_unit(conn, _unit("u0"), _rows("u0", [0, 1]))
    assert store.completed_units(conn) == {"u0"}
    # a second unit that re-uses an item id fails as a whole: neither its rows nor its marker are written
    with pytest.raises(sqlite3.IntegrityError):
        store.commit_unit(conn, _unit("u1"), _rows("u1", [1, 2]))
    assert store.completed_units(conn) == {"u0"}
    assert [r[0] for r in conn.execute("SELECT pos FROM results ORDER BY pos")] == [0, 1]
    # the same unit twice is refused too
    with pytest.raises(sqlite3.IntegrityError):
        store.commit_unit(conn, _unit("u0"), [])
    conn.close()


def test_blob_round_trip():
    a = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    back = store.from_blob(store.to_blob(a), (3, 4))
    np.testing.assert_array_equal(back, a.astype(np.float32))
    assert store.from_blob(None) is None


def test_older_schema_is_refused_before_anything_is_written(tmp_path):
    """A database of an older schema (2 stored the reconstructions) is refused by every open, also the one that
    would create tables, and is left as it was."""
    path = tmp_path / "old.db"
    conn = store.connect(path)
    conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.execute("DROP TABLE verifications")
    conn.close()
    for create in (True, False):
        with pytest.raises(ValueError, match=f"results schema 2, this vaefast reads schema {store.SCHEMA_VERSION}"):
            store.connect(path, create=create)
    raw = sqlite3.connect(path)
    assert "verifications" not in {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    raw.close()


def test_connect_existing_only(tmp_path):
    with pytest.raises(FileNotFoundError):
        store.connect(tmp_path / "missing.db", create=False)
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (a)").connection.commit()
    with pytest.raises(ValueError, match="not a vaefast results database"):
        store.connect(tmp_path / "other.db", create=False)
    with pytest.raises(ValueError, match="table"):
        store.read_table(store.connect(tmp_path / "r.db"), "sqlite_master")


def test_export_csv_json(tmp_path):
    conn = store.connect(tmp_path / "r.db")
    store.commit_unit(conn, _unit("u0"), _rows("u0", [0, 1]))
    conn.close()
    n = store.export(tmp_path / "r.db", csv_path=tmp_path / "o.csv", json_path=tmp_path / "o.json")
    assert n == 2
    rows = list(csv.DictReader(open(tmp_path / "o.csv")))
    js = json.loads((tmp_path / "o.json").read_text())
    assert [r["item_id"] for r in rows] == [r["item_id"] for r in js] == ["m|r=1.0|pos=0", "m|r=1.0|pos=1"]
    assert "delta" not in js[0] and js[1]["p_hat"] == pytest.approx(0.51)
    assert js[0]["seconds_per_point"] == pytest.approx(0.25)
    assert float(rows[1]["margin"]) == pytest.approx(0.1)


def test_the_results_database_page_is_the_schema():
    """docs/results-database.md is generated from the one row schema: regenerate it when a column changes."""
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "results-database.md"
    assert page.read_text() == schema.markdown(), (
        "regenerate: python -c 'import vaefast.schema as s; print(s.markdown())'"
    )
