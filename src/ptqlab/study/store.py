"""The results store: SQLite, one transaction per finished run."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..metrics import Metric

__all__ = ["Metric", "RunRecord", "Store"]

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
    threads INTEGER
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
"""


# Columns added after the first stores were written: (column, SQL type), added when missing.
_ADDED_COLUMNS = (("threads", "INTEGER"),)


@dataclass
class RunRecord:
    """Everything stored about one run."""

    id: str
    qmodel_key: str
    model: str
    model_fingerprint: str
    architecture: str | None
    config: dict[str, Any]
    status: str
    created_at: str
    error: str | None = None
    seed: int | None = None
    code_version: str | None = None
    git_rev: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    device: str | None = None
    threads: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    metrics: list[Metric] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    windows: dict[str, dict[str, list[float] | None]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The run as a JSON-ready mapping (metrics as ``{name: {value, stderr}}``)."""
        return {
            "id": self.id,
            "status": self.status,
            "error": self.error,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "architecture": self.architecture,
            "qmodel_key": self.qmodel_key,
            "config": self.config,
            "metrics": {m.name: {"value": m.value, "stderr": m.stderr} for m in self.metrics},
            "timings": self.timings,
            "seed": self.seed,
            "code_version": self.code_version,
            "git_rev": self.git_rev,
            "versions": self.versions,
            "device": self.device,
            "threads": self.threads,
            "created_at": self.created_at,
            "layers": self.layers,
            "texts": self.texts,
            "sensitivity": self.sensitivity,
            "windows": self.windows,
        }


class Store:
    """A SQLite results store.

    Args:
        path: Database file (created with its parent folder when missing).

    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(SCHEMA)
            have = {row[1] for row in con.execute("PRAGMA table_info(runs)")}
            for column, sql_type in _ADDED_COLUMNS:
                if column not in have:
                    con.execute(f"ALTER TABLE runs ADD COLUMN {column} {sql_type}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=60)
        con.execute("PRAGMA foreign_keys = ON")
        try:
            with con:  # one transaction: commit on success, roll back on error
                yield con
        finally:
            con.close()

    def save(self, run: RunRecord) -> None:
        """Write a run with its metrics and layer records in one transaction (replacing a failed one)."""
        with self._connect() as con:
            con.execute("DELETE FROM runs WHERE id = ?", (run.id,))
            con.execute(
                "INSERT INTO runs (id, qmodel_key, model, model_fingerprint, architecture, config_json, status, "
                "error, seed, code_version, git_rev, versions_json, device, timings_json, created_at, threads) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    run.id, run.qmodel_key, run.model, run.model_fingerprint, run.architecture,
                    json.dumps(run.config, sort_keys=True), run.status, run.error, run.seed,
                    run.code_version, run.git_rev, json.dumps(run.versions, sort_keys=True), run.device,
                    json.dumps(run.timings, sort_keys=True), run.created_at, run.threads,
                ),
            )
            con.executemany(
                "INSERT INTO windows VALUES (?,?,?,?,?)",
                [(run.id, name, i, nll, None if w.get("fp_nll") is None else w["fp_nll"][i])  # type: ignore[index]
                 for name, w in run.windows.items() for i, nll in enumerate(w["nll"] or [])],
            )
            con.executemany(
                "INSERT INTO metrics VALUES (?,?,?,?)", [(run.id, m.name, m.value, m.stderr) for m in run.metrics]
            )
            con.executemany("INSERT INTO texts VALUES (?,?,?)", [(run.id, k, v) for k, v in run.texts.items()])
            con.executemany(
                "INSERT INTO sensitivity VALUES (?,?,?,?,?,?)",
                [(run.id, r["module"], r["layer"], r["kind"], r["rel_error"], _finite(r["sqnr_db"]))
                 for r in run.sensitivity],
            )
            con.executemany(
                "INSERT INTO layer_records VALUES (?,?,?,?,?,?)",
                [(run.id, r["layer"], r["module"], r["bits"], r["rel_error"], r["seconds"]) for r in run.layers],
            )

    def get(self, run_id: str) -> RunRecord | None:
        """Return the run whose id is ``run_id`` or starts with it (unique prefix), else None."""
        with self._connect() as con:
            con.row_factory = sqlite3.Row
            rows = con.execute("SELECT * FROM runs WHERE id LIKE ? ORDER BY id", (run_id + "%",)).fetchall()
            if len(rows) != 1:
                return None
            row = rows[0]
            metrics = [
                Metric(r["name"], r["value"], r["stderr"])
                for r in con.execute("SELECT * FROM metrics WHERE run_id = ? ORDER BY name", (row["id"],))
            ]
            layers = [
                dict(r) for r in con.execute(
                    "SELECT layer, module, bits, rel_error, seconds FROM layer_records WHERE run_id = ? "
                    "ORDER BY layer, rowid", (row["id"],)
                )
            ]
            texts = {r["name"]: r["text"] for r in con.execute("SELECT * FROM texts WHERE run_id = ?", (row["id"],))}
            query = "SELECT module, layer, kind, rel_error, sqnr_db FROM sensitivity WHERE run_id = ? ORDER BY "
            sens = [dict(r) for r in con.execute(query + "layer, rowid", (row["id"],))]
            windows: dict[str, dict[str, list[Any]]] = {}
            for r in con.execute("SELECT * FROM windows WHERE run_id = ? ORDER BY metric, idx", (row["id"],)):
                w = windows.setdefault(r["metric"], {"nll": [], "fp_nll": []})
                w["nll"].append(r["nll"])
                w["fp_nll"].append(r["fp_nll"])
        record = _record(row, metrics, layers)
        record.texts, record.sensitivity = texts, sens
        record.windows = {k: {"nll": w["nll"], "fp_nll": None if None in w["fp_nll"] else w["fp_nll"]}
                          for k, w in windows.items()}
        return record

    def list_runs(self) -> list[RunRecord]:
        """All runs, oldest first, with their metrics (layer records left out)."""
        with self._connect() as con:
            con.row_factory = sqlite3.Row
            rows = con.execute("SELECT * FROM runs ORDER BY created_at, id").fetchall()
            by_run: dict[str, list[Metric]] = {}
            for r in con.execute("SELECT * FROM metrics ORDER BY name"):
                by_run.setdefault(r["run_id"], []).append(Metric(r["name"], r["value"], r["stderr"]))
        return [_record(row, by_run.get(row["id"], []), []) for row in rows]

    def has_finished(self, run_id: str) -> bool:
        """Whether a run with this exact id finished successfully."""
        with self._connect() as con:
            row = con.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        return bool(row and row[0] == "done")


def _finite(x: float) -> float | None:
    """SQLite has no infinity in JSON exports: store an exact match (infinite SQNR) as NULL."""
    return None if x == float("inf") else x


def _record(row: sqlite3.Row, metrics: list[Metric], layers: list[dict[str, Any]]) -> RunRecord:
    return RunRecord(
        id=row["id"],
        qmodel_key=row["qmodel_key"],
        model=row["model"],
        model_fingerprint=row["model_fingerprint"],
        architecture=row["architecture"],
        config=json.loads(row["config_json"]),
        status=row["status"],
        error=row["error"],
        seed=row["seed"],
        code_version=row["code_version"],
        git_rev=row["git_rev"],
        versions=json.loads(row["versions_json"] or "{}"),
        device=row["device"],
        threads=row["threads"],
        timings=json.loads(row["timings_json"] or "{}"),
        created_at=row["created_at"],
        metrics=metrics,
        layers=layers,
    )
