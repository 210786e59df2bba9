"""The store's SQL schema, its version, migrations, and the check that a file is a store this version reads."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..errors import StoreError

SCHEMA_VERSION = 3  # 1: runs, metrics, sensitivity, texts, windows, layer_records; 2: + sweeps, leases, adaptive;
# 3: + exports

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    qmodel_key TEXT NOT NULL,
    model TEXT NOT NULL,
    model_fingerprint TEXT NOT NULL,
    architecture TEXT,
    config_json TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    error TEXT,
    seed INTEGER,
    code_version TEXT,
    git_rev TEXT,
    versions_json TEXT,
    device TEXT,
    timings_json TEXT,
    created_at TEXT NOT NULL,
    threads INTEGER,
    machine_json TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value REAL,
    stderr REAL,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS sensitivity (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    module TEXT NOT NULL,
    layer INTEGER NOT NULL,
    kind TEXT NOT NULL,
    rel_error REAL,
    sqnr_db REAL,
    PRIMARY KEY (run_id, module)
);
CREATE TABLE IF NOT EXISTS texts (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS windows (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    metric TEXT NOT NULL,
    idx INTEGER NOT NULL,
    nll REAL,
    fp_nll REAL,
    PRIMARY KEY (run_id, metric, idx)
);
CREATE TABLE IF NOT EXISTS layer_records (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    layer INTEGER NOT NULL,
    module TEXT NOT NULL,
    bits INTEGER,
    rel_error REAL,
    seconds REAL,
    PRIMARY KEY (run_id, module)
);
CREATE TABLE IF NOT EXISTS adaptive (
    run_id TEXT PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
    info_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sweep_runs (
    sweep TEXT NOT NULL,
    run_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    model TEXT NOT NULL,
    values_json TEXT NOT NULL,
    config_json TEXT NOT NULL,
    PRIMARY KEY (sweep, run_id)
);
CREATE TABLE IF NOT EXISTS exports (
    run_id TEXT NOT NULL,
    format TEXT NOT NULL,
    directory TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (run_id, directory)
);
CREATE TABLE IF NOT EXISTS leases (
    run_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    expires REAL NOT NULL
);
"""


# Columns added after the first stores were written: (column, SQL type), added when missing.
ADDED_COLUMNS = (("threads", "INTEGER"), ("machine_json", "TEXT"))


def migrate(con: sqlite3.Connection) -> None:
    """Bring a store (new, or of an older schema version) to :data:`SCHEMA_VERSION`."""
    version = con.execute("PRAGMA user_version").fetchone()[0]
    con.executescript(SCHEMA)
    have = {row[1] for row in con.execute("PRAGMA table_info(runs)")}
    for column, sql_type in ADDED_COLUMNS:
        if column not in have:
            con.execute(f"ALTER TABLE runs ADD COLUMN {column} {sql_type}")
    if version < SCHEMA_VERSION:
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")



def check_store(path: str | Path) -> None:
    """Raise StoreError when ``path`` exists and is not a ptqlab store this version reads (writes nothing)."""
    p = Path(path)
    if p.is_dir():
        raise StoreError(f"store {p} is a folder, not a ptqlab store file")
    if p.is_file() and p.stat().st_size > 0:
        _check_existing(p)


def _check_existing(path: Path) -> None:
    """Refuse, before writing anything, a file that is not a ptqlab store or is from a newer version."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = con.execute("PRAGMA user_version").fetchone()[0]
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path} is not a ptqlab store (not an SQLite database: {exc})") from None
    if "runs" not in tables or "metrics" not in tables:
        raise StoreError(f"{path} is not a ptqlab store (an SQLite database without ptqlab's runs table)")
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} was written by a newer ptqlab (store schema {version}; this ptqlab "
                         f"reads up to {SCHEMA_VERSION}): upgrade ptqlab")
