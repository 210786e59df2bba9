"""Run a sweep's tasks on Ray actors: a local Ray cluster of this machine, or a running one.

Each actor holds one :class:`~ptqlab.study.worker.Worker` for its lifetime, so the FP model is loaded once
per actor. The actors import ptqlab from the Python of the nodes they run on: a local cluster shares this
environment; on a running cluster every node needs the same ptqlab installed (the repository is not
shipped). ``ray`` is imported only when a :class:`RayExecutor` is made, so ptqlab imports without it.

Ray 2.60 turns token authentication on for the local clusters it starts (a token is made and kept in
``~/.ray/auth_token``); joining a cluster by address does not turn it on: for a cluster that requires a
token, set ``RAY_AUTH_MODE=token`` (and ``RAY_AUTH_TOKEN`` or the token file) as Ray documents.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import torch

from ..errors import ConfigError
from .executors import Task, TaskResult, lost_task, run_task
from .worker import Worker

log = logging.getLogger(__name__)

_RAY_PORT = 6379  # the GCS port of `ray start --head`
_CLIENT_PORT = 10001  # the port of the Ray client server (ray://)


class _RayWorker:
    """The actor: one worker kept for its lifetime (made a Ray actor class by :class:`RayExecutor`)."""

    def __init__(self, threads: int) -> None:
        torch.set_num_threads(threads)
        self.worker = Worker(progress=False)
        self.name = f"ray:{socket.gethostname()}:{os.getpid()}"

    def run(self, task: Task) -> TaskResult:
        """Run one task (a run's failure is its failed record)."""
        record = run_task(self.worker, task)
        return TaskResult(record, self.name, vars(self.worker.stats).copy())


def _host_port(address: str) -> tuple[str, int]:
    """The host and port of a Ray address: ``host:port``, ``host`` or ``ray://host[:port]``.

    Raises:
        ConfigError: The address cannot be parsed.

    """
    client = address.startswith("ray://")
    rest = address.removeprefix("ray://")
    try:
        parts = urlsplit(f"//{rest}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"Ray cluster address {address!r} is not host:port ({exc})") from exc
    if not host:
        raise ConfigError(f"Ray cluster address {address!r} is not host:port")
    return host, port if port is not None else (_CLIENT_PORT if client else _RAY_PORT)


def check_answers(address: str, timeout: float) -> None:
    """Check that something listens at a Ray address (a TCP connection within ``timeout`` seconds).

    Args:
        address: ``host:port`` (a GCS address) or ``ray://host[:port]`` (a Ray client server).
        timeout: Seconds to wait for the connection.

    Raises:
        ConfigError: Nothing answers there, naming the address.

    """
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
        raise ConfigError(
            f"Ray cluster at {address} does not answer: no connection to {host}:{port} within "
            f"{timeout:g} s ({reason})"
        ) from exc


class RayExecutor:
    """Runs tasks on ``workers`` Ray actors, each keeping its worker (and loaded model) for the sweep.

    Args:
        workers: Number of actors (runs in flight at once).
        address: The Ray cluster to join (``host:port`` or ``ray://host:port``). None: the one in the
            ``RAY_ADDRESS`` environment variable if set, else a local cluster of this machine is started
            (and shut down by :meth:`close`). Ray already initialized in this process is used as it is.
        num_cpus: CPUs per actor (default 1); also its torch threads (at least 1).
        num_gpus: GPUs per actor (default none).
        connect_timeout: Seconds to wait for a given address to answer before failing.

    Raises:
        ConfigError: ray is not installed, a count is invalid, or the cluster does not answer or cannot
            be joined (the message names the address).

    """

    def __init__(
        self,
        workers: int = 2,
        address: str | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        cpus = 1.0 if num_cpus is None else float(num_cpus)
        if cpus <= 0 or (num_gpus is not None and num_gpus < 0):
            raise ConfigError(f"Ray resources per run must be positive: num_cpus={num_cpus}, num_gpus={num_gpus}")
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("the Ray executor needs ray: pip install 'ptqlab[ray]'") from exc
        self.slots = workers
        self._ray: Any = ray
        self._started = self._connect(address, math.ceil(workers * cpus), connect_timeout)
        self._threads = max(1, int(cpus))
        options: dict[str, Any] = {"num_cpus": cpus}
        if num_gpus:
            options["num_gpus"] = num_gpus
        self._actor_class: Any = ray.remote(**options)(_RayWorker)
        self._idle: deque[Any] = deque()
        self._pending: deque[Task] = deque()
        self._in_flight: dict[Any, tuple[Task, Any]] = {}
        try:
            self._check_resources(workers, cpus, num_gpus or 0.0)
            self._idle.extend(self._new_actor() for _ in range(workers))
        except BaseException:
            self.close()
            raise
        log.info("Ray executor: %d actors of %g CPU%s", workers, cpus, f", {num_gpus:g} GPU" if num_gpus else "")

    def _connect(self, address: str | None, cpus: int, timeout: float) -> bool:
        """Join or start the cluster; True when this executor started Ray (and so shuts it down)."""
        ray = self._ray
        if address is None:
            address = os.environ.get("RAY_ADDRESS") or None
        if address == "local":
            address = None
        if address is not None and address != "auto":
            check_answers(address, timeout)
        if ray.is_initialized():
            log.info("Ray is already initialized in this process: using it")
            return False
        if address is None:
            try:
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus), include_dashboard=False)
            except Exception as exc:  # noqa: BLE001 - any failure to start is reported as one error
                if ray.is_initialized():
                    ray.shutdown()
                raise ConfigError(f"could not start a local Ray cluster: {type(exc).__name__}: {exc}") from exc
            log.info("started a local Ray cluster")
            return True
        try:
            ray.init(address=address)
        except Exception as exc:  # noqa: BLE001 - any failure to join is reported as one error naming it
            if ray.is_initialized():
                ray.shutdown()
            raise ConfigError(f"Ray cluster at {address} could not be joined: {type(exc).__name__}: {exc}") from exc
        log.info("joined the Ray cluster at %s", address)
        return True

    def _check_resources(self, workers: int, cpus: float, gpus: float) -> None:
        """Warn when the cluster has fewer CPUs or GPUs than one actor asks for (it would never start)."""
        total = self._ray.cluster_resources()
        for name, need in (("CPU", cpus), ("GPU", gpus)):
            if need > total.get(name, 0.0):
                log.warning("each Ray actor asks for %g %s but the cluster has %g: the runs wait for the "
                            "cluster to grow", need, name, total.get(name, 0.0))
            elif need * workers > total.get(name, 0.0):
                log.warning("%d Ray actors of %g %s do not all fit the cluster's %g: some wait", workers,
                            need, name, total.get(name, 0.0))

    def _new_actor(self) -> Any:
        return self._actor_class.remote(self._threads)

    def _dispatch(self) -> None:
        """Send pending tasks to idle actors (round robin: the actor idle longest first)."""
        while self._pending and self._idle:
            actor = self._idle.popleft()
            task = self._pending.popleft()
            self._in_flight[actor.run.remote(task)] = (task, actor)

    def submit(self, task: Task) -> None:
        """Send the task to an idle actor (it waits for one when all are busy)."""
        self._pending.append(task)
        self._dispatch()

    def next_result(self) -> TaskResult:
        """The first task to finish; a task whose actor died is a failed record and the actor replaced.

        Raises:
            RuntimeError: No task was submitted.

        """
        ray = self._ray
        if not self._in_flight:
            raise RuntimeError("next_result() with no task submitted")
        ready, _ = ray.wait(list(self._in_flight), num_returns=1)
        ref = ready[0]
        task, actor = self._in_flight.pop(ref)
        try:
            result: TaskResult = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # raised in the actor, which lives on
            log.warning("run %s raised in its Ray actor: %s", task.run_id, exc)
            result = TaskResult(lost_task(task, exc), "lost")
        except Exception as exc:  # noqa: BLE001 - a dead actor (or node) fails its run, not the sweep
            log.warning("run %s lost its Ray actor (%s): starting another", task.run_id, type(exc).__name__)
            result = TaskResult(lost_task(task, exc), "lost")
            self._kill(actor)
            actor = self._new_actor()
        self._idle.append(actor)
        self._dispatch()
        return result

    def _kill(self, actor: Any) -> None:
        try:
            self._ray.kill(actor, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - already dead, or the cluster is gone
            log.debug("could not kill a Ray actor: %s", exc)

    def close(self) -> None:
        """Kill the actors; shut Ray down if this executor started it (idempotent)."""
        actors = list(self._idle) + [actor for _, actor in self._in_flight.values()]
        self._idle.clear()
        self._in_flight.clear()
        self._pending.clear()
        for actor in actors:
            self._kill(actor)
        if self._started:
            self._started = False
            self._ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
