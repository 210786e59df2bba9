"""The store refuses files it cannot read, migrates old ones, runs in WAL mode and leases runs."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from ptqlab.errors import StoreError
from ptqlab.store import SCHEMA_VERSION, Metric, RunRecord, Store


def _run(rid: str = "r1") -> RunRecord:
    return RunRecord(id=rid, qmodel_key="q", model="m", model_fingerprint="1-ff", architecture="A",
                     config={"model": "m"}, status="done", created_at="2026-01-01T00:00:00+00:00",
                     metrics=[Metric("ppl.x", 1.5)], adaptive={"lo": 0.1, "hi": 0.2, "windows_used": {"w": 8}})


def test_wal_mode_version_and_adaptive_roundtrip(tmp_path):
    store = Store(tmp_path / "s.db")
    store.save(_run())
    with sqlite3.connect(tmp_path / "s.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    got = store.get("r1")
    assert got is not None and got.adaptive == {"lo": 0.1, "hi": 0.2, "windows_used": {"w": 8}}


def test_not_a_store_is_refused_and_left_alone(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="is not a ptqlab store"):
        Store(junk)
    assert junk.read_bytes() == b"this is not sqlite" * 100
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE people (name TEXT)")
    with pytest.raises(StoreError, match="without ptqlab's runs table"):
        Store(other)
    with pytest.raises(StoreError, match="is a folder"):
        Store(tmp_path)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "s.db"
    Store(path).save(_run())
    with sqlite3.connect(path) as con:
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=f"newer ptqlab \\(store schema {SCHEMA_VERSION + 1}"):
        Store(path)


def test_version_1_store_is_migrated(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as con:  # the first schema: no threads column, no sweeps/leases/adaptive
        con.executescript(
            "CREATE TABLE runs (id TEXT PRIMARY KEY, qmodel_key TEXT NOT NULL, model TEXT NOT NULL, "
            "model_fingerprint TEXT NOT NULL, architecture TEXT, config_json TEXT NOT NULL, status TEXT NOT NULL, "
            "error TEXT, seed INTEGER, code_version TEXT, git_rev TEXT, versions_json TEXT, device TEXT, "
            "timings_json TEXT, created_at TEXT NOT NULL);"
            "CREATE TABLE metrics (run_id TEXT NOT NULL, name TEXT NOT NULL, value REAL, stderr REAL, "
            "PRIMARY KEY (run_id, name));"
            "INSERT INTO runs VALUES ('old1','q','m','1-ff','A','{}','done',NULL,0,NULL,NULL,'{}',NULL,'{}','2026');"
            "INSERT INTO metrics VALUES ('old1','ppl.x',3.0,NULL);"
        )
    store = Store(path)
    assert [r.id for r in store.list_runs()] == ["old1"] and store.get("old1").metrics[0].value == 3.0
    store.save(_run())
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_lease_keeps_others_out_until_its_owner_dies(tmp_path):
    store = Store(tmp_path / "s.db")
    assert store.acquire("r1", "a", ttl=60)
    assert not store.acquire("r1", "b", ttl=60)
    assert store.acquire("r1", "a", ttl=60)  # the owner may take it again
    store.release("a", "r1")
    assert store.acquire("r1", "b", ttl=60)
    # an expired lease is free
    assert store.acquire("r2", "a", ttl=-1) and store.acquire("r2", "b", ttl=60)
    # a lease whose process died (on this host) is free at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with sqlite3.connect(tmp_path / "s.db") as con:
        con.execute("INSERT INTO leases VALUES ('r3', 'ghost', ?, ?, 1e12)",
                    (os.uname().nodename, int(dead.stdout)))
    assert "r3" not in store.leased()
    assert store.acquire("r3", "b", ttl=60)
    # a stored run is not leased again; a failed one only with retry_failed
    store.save(_run("r4"))
    assert not store.acquire("r4", "a", ttl=60)
    failed = _run("r5")
    failed.status, failed.metrics = "failed", []
    store.save(failed)
    assert not store.acquire("r5", "a", ttl=60) and store.acquire("r5", "a", ttl=60, retry_failed=True)
