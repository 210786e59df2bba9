"""The driver of a sweep: which runs are missing, leases, dispatch to an executor, one commit per run.

The driver alone writes the store. It registers the sweep's runs, then for each run that is not stored
(or failed, with ``retry_failed``) takes a lease, hands the run to the executor and, when the record
comes back, writes it in one transaction (which also frees the lease). A heartbeat thread renews the
leases; a driver killed at any moment leaves only leases that die with it, so starting the sweep again
does exactly what is missing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..models.loading import model_fingerprint
from ..store import RunRecord, Store, SweepEntry, normalized, run_id
from .estimate import Estimator
from .executors import Executor, Task, TaskResult
from .sweep import Sweep

log = logging.getLogger(__name__)

LEASE_TTL_S = 120.0


@dataclass(frozen=True)
class PlannedRun:
    """A run of the sweep with its id and where it stands in the store."""

    position: int
    run_id: str
    fingerprint: str
    config: dict[str, Any]
    values: dict[str, Any]
    status: str  # done | failed | running | missing
    estimate_s: float | None = None


@dataclass
class SweepPlan:
    """The runs of a sweep against a store: counts by status and the time left, estimated."""

    sweep: Sweep
    runs: list[PlannedRun]

    def count(self, status: str) -> int:
        """How many runs have this status."""
        return sum(r.status == status for r in self.runs)

    def todo(self, retry_failed: bool = False) -> list[PlannedRun]:
        """The runs still to compute (missing; failed too with ``retry_failed``), grouped by model."""
        wanted = ("missing", "failed") if retry_failed else ("missing",)
        todo = [r for r in self.runs if r.status in wanted]
        order = {fp: k for k, fp in enumerate(dict.fromkeys(r.fingerprint for r in self.runs))}
        return sorted(todo, key=lambda r: (order[r.fingerprint], r.position))

    def time_left(self, retry_failed: bool = False) -> tuple[float, int]:
        """Estimated seconds of the runs to do, and how many of them have no estimate."""
        todo = self.todo(retry_failed)
        return sum(r.estimate_s or 0.0 for r in todo), sum(r.estimate_s is None for r in todo)


@dataclass
class SweepSummary:
    """What one call of :func:`run_sweep` did."""

    total: int
    computed: int = 0
    failed: int = 0
    already: int = 0
    elsewhere: int = 0
    seconds: float = 0.0
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    records: list[RunRecord] = field(default_factory=list)


def plan_sweep(sweep: Sweep, store: Store | None) -> SweepPlan:
    """Run ids of the sweep (model fingerprints read from the weight files), their status and estimates.

    Args:
        sweep: The expanded sweep.
        store: The store (None: nothing is stored yet).

    Raises:
        ModelLoadError: A model that cannot be found.

    """
    fingerprints: dict[str, str] = {}
    statuses = store.statuses() if store is not None else {}
    leased = store.leased() if store is not None else {}
    similar = Estimator(store.timings() if store is not None else [])
    runs = []
    for k, run in enumerate(sweep.runs):
        cfg = run.config
        if cfg.model not in fingerprints:
            fingerprints[cfg.model] = model_fingerprint(cfg.model)
        rid = run_id(cfg, fingerprints[cfg.model])
        status = statuses.get(rid) or ("running" if rid in leased else "missing")
        data = normalized(cfg)
        runs.append(PlannedRun(k, rid, fingerprints[cfg.model], data, run.values, status, similar.total(data)))
    return SweepPlan(sweep, runs)


def run_sweep(
    plan: SweepPlan,
    store: Store,
    executor: Executor,
    *,
    retry_failed: bool = False,
    progress: bool = True,
    on_record: Callable[[RunRecord], None] | None = None,
) -> SweepSummary:
    """Compute the runs of ``plan`` that are missing (and failed ones with ``retry_failed``).

    Args:
        plan: From :func:`plan_sweep`.
        store: Where records go (the only writer is this function).
        executor: Runs the tasks.
        retry_failed: Run the failed runs again.
        progress: Show the sweep's bar.
        on_record: Called with each record after it is stored.

    Returns:
        What was done.

    """
    name = plan.sweep.name
    store.register_sweep([SweepEntry(name, r.run_id, r.position, r.config["model"], r.values, r.config)
                          for r in plan.runs])
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    summary = SweepSummary(total=len(plan.runs), already=plan.count("done"))
    todo = plan.todo(retry_failed)
    bar = tqdm(total=len(plan.runs), initial=summary.already, desc=f"sweep {name}", unit="run",
               disable=not progress, position=0)
    t0 = time.perf_counter()
    heartbeat = _Heartbeat(store, owner)
    in_flight = 0
    try:
        while todo or in_flight:
            while todo and in_flight < executor.slots:
                run = todo.pop(0)
                if not store.acquire(run.run_id, owner, LEASE_TTL_S, retry_failed=retry_failed):
                    summary.elsewhere += int(not store.has_finished(run.run_id))
                    continue
                executor.submit(Task(run.config, run.run_id, run.fingerprint, _peers(store, name, run)))
                in_flight += 1
            if not in_flight:
                break
            result = executor.next_result()
            in_flight -= 1
            _store(store, result, summary)
            if on_record is not None:
                on_record(result.record)
            bar.update(1)
            bar.set_postfix(failed=summary.failed)
    finally:
        heartbeat.stop()
        store.release(owner)
        bar.close()
    summary.seconds = time.perf_counter() - t0
    if summary.elsewhere:
        log.info("%d runs are being run by another sweep on this store; run the sweep again after it ends",
                 summary.elsewhere)
    return summary


def _store(store: Store, result: TaskResult, summary: SweepSummary) -> None:
    record = result.record
    store.save(record)
    summary.computed += 1
    summary.failed += record.status != "done"
    summary.stats[result.worker] = result.stats
    summary.records.append(record)
    if record.status != "done":
        log.warning("run %s failed: %s", record.id, record.error)


def _peers(store: Store, sweep: str, run: PlannedRun) -> tuple[tuple[float, float], ...]:
    """The degradation intervals of the sweep's finished runs, for ``evaluate.adaptive.target: rank``."""
    adaptive = (run.config.get("evaluate") or {}).get("adaptive") or {}
    if adaptive.get("target") != "rank":
        return ()
    out = []
    for rec in store.list_runs(sweep=sweep, status="done"):
        if rec.adaptive and rec.id != run.run_id:
            out.append((float(rec.adaptive["lo"]), float(rec.adaptive["hi"])))
    return tuple(out)


class _Heartbeat:
    """Renews an owner's leases every third of their lifetime, in a daemon thread."""

    def __init__(self, store: Store, owner: str, ttl: float = LEASE_TTL_S) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(store, owner, ttl), daemon=True)
        self._thread.start()

    def _beat(self, store: Store, owner: str, ttl: float) -> None:
        while not self._stop.wait(ttl / 3):
            try:
                store.renew(owner, ttl)
            except Exception as exc:  # noqa: BLE001 - a busy store must not kill the sweep; next beat retries
                log.warning("lease renewal failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


