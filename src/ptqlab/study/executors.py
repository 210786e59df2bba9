"""Executors run a sweep's tasks: in this process, in worker processes, or on a Ray cluster.

Each worker keeps a :class:`~ptqlab.study.worker.Worker` for its lifetime (the FP model loaded once per
worker, references and quantized models shared) and returns records; only the sweep's driver writes the
store. An executor has ``slots`` (runs in flight at once), ``submit(task)`` and ``next_result()``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import ConfigError
from ..store import RunRecord
from .config import parse_config
from .worker import Worker, failed_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """One run to compute: its configuration (plain data), id, model fingerprint, adaptive peers."""

    config: dict[str, Any]
    run_id: str
    fingerprint: str
    peers: tuple[tuple[float, float], ...] = ()


@dataclass
class TaskResult:
    """What a worker sends back: the record, and how much it shared (for the benchmarks)."""

    record: RunRecord
    worker: str
    stats: dict[str, int] = field(default_factory=dict)


def run_task(worker: Worker, task: Task) -> RunRecord:
    """Run one task on ``worker``; whatever goes wrong becomes a ``failed`` record (the sweep goes on)."""
    cfg = parse_config(task.config)
    try:
        record = worker.run(cfg, peers=task.peers)
    except Exception as exc:  # noqa: BLE001 - a run that raises is stored as failed with its error
        log.warning("run %s failed before it started: %s", task.run_id, exc)
        return failed_record(cfg, task.fingerprint, exc)
    if record.id != task.run_id:  # the model changed on disk since the sweep fingerprinted it
        record.status, record.error = "failed", f"model changed: run id {record.id}, expected {task.run_id}"
        record.id = task.run_id
    return record


def lost_task(task: Task, exc: BaseException) -> RunRecord:
    """The failed record of a task whose worker died or could not return it."""
    return failed_record(parse_config(task.config), task.fingerprint, f"worker lost: {type(exc).__name__}: {exc}")


class Executor(Protocol):
    """Runs tasks; ``slots`` of them at once."""

    slots: int

    def submit(self, task: Task) -> None:
        """Start a task."""
        ...

    def next_result(self) -> TaskResult:
        """Wait for a started task to finish and return its result."""
        ...

    def close(self) -> None:
        """Stop the workers."""
        ...


class LocalExecutor:
    """Runs tasks one at a time in this process (the default; progress bars of each run shown)."""

    slots = 1

    def __init__(self, progress: bool = True) -> None:
        self.worker = Worker(progress=progress)
        self._queue: deque[Task] = deque()

    def submit(self, task: Task) -> None:
        """Queue the task (it runs in :meth:`next_result`)."""
        self._queue.append(task)

    def next_result(self) -> TaskResult:
        """Run the next queued task."""
        record = run_task(self.worker, self._queue.popleft())
        return TaskResult(record, "local", vars(self.worker.stats).copy())

    def close(self) -> None:
        """Nothing to stop."""


# Each worker process keeps its own Worker for the process's lifetime (set by the pool's initializer).
_PROCESS_WORKER: list[Worker] = []


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this worker when the sweep's driver dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _init_process(threads: int) -> None:
    _die_with_parent()
    torch.set_num_threads(threads)
    _PROCESS_WORKER.append(Worker(progress=False))


def _process_task(task: Task) -> TaskResult:
    worker = _PROCESS_WORKER[0]
    record = run_task(worker, task)
    return TaskResult(record, f"pid{os.getpid()}", vars(worker.stats).copy())


class ProcessExecutor:
    """Runs tasks in ``workers`` processes of this machine (spawned; the CPU threads split between them).

    Args:
        workers: Number of processes.

    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        self.slots = workers
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")
        self._pool = cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_process,
                                            initargs=(threads,))
        self._futures: dict[cf.Future[TaskResult], Task] = {}

    def submit(self, task: Task) -> None:
        """Send the task to a free process."""
        self._futures[self._pool.submit(_process_task, task)] = task

    def next_result(self) -> TaskResult:
        """The first task to finish (a worker that died makes its task a failed record)."""
        done, _ = cf.wait(self._futures, return_when=cf.FIRST_COMPLETED)
        future = done.pop()
        task = self._futures.pop(future)
        try:
            return future.result()
        except Exception as exc:  # noqa: BLE001 - a dead worker process fails its run, not the sweep
            return TaskResult(lost_task(task, exc), "lost")

    def close(self) -> None:
        """Stop the processes."""
        self._pool.shutdown(wait=True, cancel_futures=True)
