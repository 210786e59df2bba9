"""The results store: SQLite in WAL mode, one transaction per finished run, leases for running ones.

The file carries a schema version (``PRAGMA user_version``): an older store is migrated when opened, a
newer one or a file that is not a ptqlab store is refused with one error before anything is written.
A sweep claims a run with a lease (owner, host, pid, expiry) so that two sweeps on one store never run the
same configuration; a lease whose owner died (its pid is gone on this host, or it was not renewed in
time) is free again.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..metrics import Metric
from .schema import SCHEMA_VERSION, check_store, migrate

__all__ = ["SCHEMA_VERSION", "Metric", "RunRecord", "Store", "SweepEntry", "check_store"]

KILL_AT_ENV = "PTQLAB_TEST_KILL_AT"  # test-only: see _test_kill
_SAVES = itertools.count(1)  # the runs this process has saved (numbers the saves for _test_kill)


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
    machine: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    metrics: list[Metric] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    windows: dict[str, dict[str, Any]] = field(default_factory=dict)
    adaptive: dict[str, Any] | None = None

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
            "machine": self.machine,
            "created_at": self.created_at,
            "layers": self.layers,
            "texts": self.texts,
            "sensitivity": self.sensitivity,
            "windows": self.windows,
            "adaptive": self.adaptive,
        }


@dataclass(frozen=True)
class SweepEntry:
    """A run a sweep asked for: its position, model, the values the sweep gave it, and its config."""

    sweep: str
    run_id: str
    position: int
    model: str
    values: dict[str, Any]
    config: dict[str, Any]


class Store:
    """A SQLite results store.

    Args:
        path: Database file (created with its parent folder when missing).

    Raises:
        StoreError: The file is not a ptqlab store, or a newer ptqlab wrote it.

    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        check_store(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode = WAL")
        with self._connect() as con:
            migrate(con)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=60)
        con.execute("PRAGMA foreign_keys = ON")
        con.execute("PRAGMA synchronous = FULL")
        try:
            with con:  # one transaction: commit on success, roll back on error
                yield con
        finally:
            con.close()

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock at its start (read-check-write without races)."""
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        con.execute("PRAGMA foreign_keys = ON")
        con.execute("PRAGMA synchronous = FULL")
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    def save(self, run: RunRecord) -> None:
        """Write a run with everything measured in one transaction (replacing a failed one); free its lease."""
        n = next(_SAVES)
        with self._connect() as con:
            con.execute("DELETE FROM runs WHERE id = ?", (run.id,))
            con.execute(
                "INSERT INTO runs (id, qmodel_key, model, model_fingerprint, architecture, config_json, status, "
                "error, seed, code_version, git_rev, versions_json, device, timings_json, created_at, threads, "
                "machine_json) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    run.id, run.qmodel_key, run.model, run.model_fingerprint, run.architecture,
                    json.dumps(run.config, sort_keys=True), run.status, run.error, run.seed,
                    run.code_version, run.git_rev, json.dumps(run.versions, sort_keys=True), run.device,
                    json.dumps(run.timings, sort_keys=True), run.created_at, run.threads,
                    json.dumps(run.machine, sort_keys=True),
                ),
            )
            con.executemany(
                "INSERT INTO windows VALUES (?,?,?,?,?)",
                [(run.id, name, i, nll, None if w.get("fp_nll") is None else w["fp_nll"][i])
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
            if run.adaptive is not None:
                con.execute("INSERT INTO adaptive VALUES (?,?)", (run.id, json.dumps(run.adaptive, sort_keys=True)))
            con.execute("DELETE FROM leases WHERE run_id = ?", (run.id,))
            _test_kill("inside", n)
        _test_kill("after", n)

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
            adaptive = con.execute("SELECT info_json FROM adaptive WHERE run_id = ?", (row["id"],)).fetchone()
        record = _record(row, metrics, layers)
        record.texts, record.sensitivity = texts, sens
        record.windows = self.windows([record.id]).get(record.id, {})
        record.adaptive = None if adaptive is None else json.loads(adaptive[0])
        return record

    def list_runs(
        self, *, sweep: str | None = None, status: str | None = None, model: str | None = None
    ) -> list[RunRecord]:
        """Runs, oldest first, with their metrics and adaptive summary (layer records left out).

        Args:
            sweep: Only the runs of this sweep.
            status: Only ``done`` or ``failed`` runs.
            model: Only runs of this model (as the config names it).

        """
        where, params = [], []
        if sweep is not None:
            where.append("id IN (SELECT run_id FROM sweep_runs WHERE sweep = ?)")
            params.append(sweep)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if model is not None:
            where.append("model = ?")
            params.append(model)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        with self._connect() as con:
            con.row_factory = sqlite3.Row
            rows = con.execute(f"SELECT * FROM runs{clause} ORDER BY created_at, id", params).fetchall()
            by_run: dict[str, list[Metric]] = {}
            for r in con.execute("SELECT * FROM metrics ORDER BY name"):
                by_run.setdefault(r["run_id"], []).append(Metric(r["name"], r["value"], r["stderr"]))
            adaptive = {r[0]: json.loads(r[1]) for r in con.execute("SELECT run_id, info_json FROM adaptive")}
        out = [_record(row, by_run.get(row["id"], []), []) for row in rows]
        for rec in out:
            rec.adaptive = adaptive.get(rec.id)
        return out

    def has_finished(self, run_id: str) -> bool:
        """Whether a run with this exact id finished successfully."""
        return self.statuses([run_id]).get(run_id) == "done"

    def statuses(self, run_ids: list[str] | None = None) -> dict[str, str]:
        """``{run id: done | failed}`` of the stored runs among ``run_ids`` (all runs when None)."""
        with self._connect() as con:
            if run_ids is None:
                rows = con.execute("SELECT id, status FROM runs").fetchall()
            else:
                rows = _select_in(con, "SELECT id, status FROM runs WHERE id IN ({})", run_ids)
        return dict(rows)

    def windows(self, run_ids: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
        """``{run id: {metric: {"nll": [...], "fp_nll": [...] or None}}}``: the stored window NLLs of runs."""
        with self._connect() as con:
            rows = _select_in(con, "SELECT run_id, metric, nll, fp_nll FROM windows WHERE run_id IN ({}) "
                                   "ORDER BY run_id, metric, idx", run_ids)
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for run_id, metric, nll, fp_nll in rows:
            w = out.setdefault(run_id, {}).setdefault(metric, {"nll": [], "fp_nll": []})
            w["nll"].append(nll)
            w["fp_nll"].append(fp_nll)
        for per_run in out.values():
            for w in per_run.values():
                if None in w["fp_nll"]:
                    w["fp_nll"] = None
        return out

    def memberships(self) -> dict[str, list[str]]:
        """``{run id: [sweep names]}``: the sweeps that asked for each run."""
        with self._connect() as con:
            rows = con.execute("SELECT run_id, sweep FROM sweep_runs ORDER BY sweep").fetchall()
        out: dict[str, list[str]] = {}
        for run_id, sweep in rows:
            out.setdefault(run_id, []).append(sweep)
        return out

    def timings(self) -> list[tuple[dict[str, Any], dict[str, float]]]:
        """``(config, timings)`` of every finished run (what the time estimates are made from)."""
        with self._connect() as con:
            rows = con.execute("SELECT config_json, timings_json FROM runs WHERE status = 'done'").fetchall()
        return [(json.loads(c), json.loads(t or "{}")) for c, t in rows]

    # --- sweeps -----------------------------------------------------------------------------------------

    def register_sweep(self, entries: list[SweepEntry]) -> None:
        """Record which runs a sweep asks for (idempotent: a resumed sweep registers the same rows)."""
        with self._connect() as con:
            con.executemany(
                "INSERT OR REPLACE INTO sweep_runs VALUES (?,?,?,?,?,?)",
                [(e.sweep, e.run_id, e.position, e.model, json.dumps(e.values, sort_keys=True),
                  json.dumps(e.config, sort_keys=True)) for e in entries],
            )

    def sweep_entries(self, sweep: str) -> list[SweepEntry]:
        """The runs a sweep asked for, in its order."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT sweep, run_id, position, model, values_json, config_json FROM sweep_runs WHERE sweep = ? "
                "ORDER BY position", (sweep,)
            ).fetchall()
        return [SweepEntry(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5])) for r in rows]

    def sweeps(self) -> list[str]:
        """The names of the sweeps in the store."""
        with self._connect() as con:
            return [r[0] for r in con.execute("SELECT DISTINCT sweep FROM sweep_runs ORDER BY sweep")]

    # --- leases -----------------------------------------------------------------------------------------

    def acquire(self, run_id: str, owner: str, ttl: float, *, retry_failed: bool = False) -> bool:
        """Claim a run for ``owner`` unless it is stored (done; or failed, unless ``retry_failed``) or leased.

        A lease held by another owner counts only while it is unexpired and, on this host, its process lives.
        """
        now = time.time()
        with self._immediate() as con:
            row = con.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is not None and (row[0] == "done" or not retry_failed):
                return False
            lease = con.execute("SELECT owner, host, pid, expires FROM leases WHERE run_id = ?", (run_id,)).fetchone()
            if lease is not None and lease[0] != owner and _alive(lease[1], lease[2], lease[3], now):
                return False
            con.execute("INSERT OR REPLACE INTO leases VALUES (?,?,?,?,?)",
                        (run_id, owner, socket.gethostname(), os.getpid(), now + ttl))
        return True

    def renew(self, owner: str, ttl: float) -> None:
        """Push back the expiry of every lease ``owner`` holds."""
        with self._connect() as con:
            con.execute("UPDATE leases SET expires = ? WHERE owner = ?", (time.time() + ttl, owner))

    def release(self, owner: str, run_id: str | None = None) -> None:
        """Give up one lease of ``owner`` (or all of them)."""
        with self._connect() as con:
            if run_id is None:
                con.execute("DELETE FROM leases WHERE owner = ?", (owner,))
            else:
                con.execute("DELETE FROM leases WHERE owner = ? AND run_id = ?", (owner, run_id))

    def add_export(self, run_id: str, fmt: str, directory: str | Path) -> None:
        """Record that run ``run_id`` was exported as ``fmt`` to ``directory`` (replacing an earlier record)."""
        with self._connect() as con:
            con.execute("INSERT OR REPLACE INTO exports (run_id, format, directory, created_at) VALUES (?, ?, ?, ?)",
                        (run_id, fmt, str(Path(directory).resolve()),
                         dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")))

    def exports(self, run_id: str) -> list[dict[str, str]]:
        """The exports recorded for ``run_id``, oldest first: ``{"format", "directory", "created_at"}``."""
        with self._connect() as con:
            rows = con.execute("SELECT format, directory, created_at FROM exports WHERE run_id = ? "
                               "ORDER BY created_at", (run_id,)).fetchall()
        return [{"format": r[0], "directory": r[1], "created_at": r[2]} for r in rows]

    def leased(self) -> dict[str, str]:
        """``{run id: owner}`` of the live leases."""
        now = time.time()
        with self._connect() as con:
            rows = con.execute("SELECT run_id, owner, host, pid, expires FROM leases").fetchall()
        return {r[0]: r[1] for r in rows if _alive(r[2], r[3], r[4], now)}


def _alive(host: str, pid: int, expires: float, now: float) -> bool:
    """Whether a lease's owner may still be working: unexpired, and on this host its process exists."""
    if expires <= now:
        return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _test_kill(stage: str, n: int) -> None:
    """Test-only: SIGKILL this process at the point ``$PTQLAB_TEST_KILL_AT`` names; nothing when it is unset.

    The resume tests kill a sweep at deterministic points rather than after a sleep. ``after:K`` kills the
    process right after the K-th run it saved is committed; ``inside:K`` kills it inside that run's write
    transaction, before the commit (K counts the saves of this process, from 1).

    Args:
        stage: ``"inside"`` (called before the commit) or ``"after"`` (after it).
        n: Which save of this process this is.

    Raises:
        ValueError: The variable is set to something other than ``after:K`` or ``inside:K``.

    """
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    where, _, k = spec.partition(":")
    if where not in ("after", "inside") or not k.isdecimal():
        raise ValueError(f"{KILL_AT_ENV} must be after:K or inside:K, got {spec!r}")
    if where == stage and int(k) == n:
        os.kill(os.getpid(), signal.SIGKILL)


def _select_in(con: sqlite3.Connection, query: str, ids: list[str]) -> list[Any]:
    """``query`` (with one ``IN ({})``) over ``ids`` in chunks under SQLite's limit on bound parameters."""
    rows: list[Any] = []
    for start in range(0, len(ids), 500):
        part = ids[start:start + 500]
        rows += con.execute(query.format(",".join("?" * len(part))), part).fetchall()
    return rows


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
        machine=json.loads(row["machine_json"] or "{}"),
        timings=json.loads(row["timings_json"] or "{}"),
        created_at=row["created_at"],
        metrics=metrics,
        layers=layers,
    )
