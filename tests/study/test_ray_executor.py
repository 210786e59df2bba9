"""The Ray executor on a real local Ray cluster: the same records as in-process runs; dead addresses fail fast."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ptqlab.errors import ConfigError
from ptqlab.models.loading import model_fingerprint
from ptqlab.store import run_id
from ptqlab.study.config import parse_config
from ptqlab.study.executors import LocalExecutor, Task, TaskResult
from ptqlab.study.ray_executor import RayExecutor, _host_port  # imports ray only when an executor is made

# Only the tests that start or join a cluster need ray; the address parsing and the error without ray do not.
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray (pip install 'ptqlab[ray]')")


def _config(bits: int) -> dict:
    return {
        "model": "stories260k",
        "scheme": {"weight": {"bits": bits, "granularity": "channel"}},
        "recipe": [{"gptq": {"damp": 0.01}}],
        "calibration": {"dataset": "c4local", "samples": 2, "seqlen": 64, "seed": 0},
        "evaluate": {"perplexity": ["wikitext2"], "seqlen": 64, "max_windows": 2, "sample": None,
                     "sensitivity": None},
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """PTQLAB_CACHE in a temporary directory (set before Ray starts, so its workers inherit it)."""
    path = tmp_path_factory.mktemp("ptqlab-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PTQLAB_CACHE", str(path))
        mp.delenv("RAY_ADDRESS", raising=False)
        yield path


@pytest.fixture(scope="module")
def executor(cache: Path) -> Iterator[RayExecutor]:
    """A local Ray cluster with two actors, started once for the module."""
    ex = RayExecutor(workers=2)
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def tasks(cache: Path) -> list[Task]:
    fingerprint = model_fingerprint("stories260k")
    configs = [_config(bits) for bits in (8, 4, 3)]
    return [Task(c, run_id(parse_config(c), fingerprint), fingerprint) for c in configs]


def _run_all(ex: RayExecutor | LocalExecutor, tasks: list[Task]) -> dict[str, TaskResult]:
    results: dict[str, TaskResult] = {}
    todo = list(tasks)
    in_flight = 0
    while todo or in_flight:
        while todo and in_flight < ex.slots:
            ex.submit(todo.pop(0))
            in_flight += 1
        result = ex.next_result()
        in_flight -= 1
        results[result.record.id] = result
    return results


@needs_ray
def test_ray_runs_match_local_runs(executor: RayExecutor, tasks: list[Task], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for task in tasks:  # the actors start (seconds of imports) and run while the same tasks run here
        executor.submit(task)
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path))  # computed again here, not read from the actors' cache
    local_ex = LocalExecutor(progress=False)
    local = _run_all(local_ex, tasks)
    local_ex.close()
    remote = {r.record.id: r for r in (executor.next_result() for _ in tasks)}
    assert local_ex.worker.stats.quantized == 3 and local_ex.worker.stats.qmodel_hits == 0

    assert sorted(remote) == sorted(t.run_id for t in tasks)
    for task in tasks:
        got, want = remote[task.run_id].record, local[task.run_id].record
        assert got.status == "done", got.error
        assert want.status == "done", want.error
        assert got.id == task.run_id
        assert got.to_json()["metrics"] == want.to_json()["metrics"]  # bit for bit
        assert got.windows == want.windows
        assert got.threads == 1  # num_cpus=1 per actor
    workers = {r.worker for r in remote.values()}
    assert len(workers) == 2 and all(w.startswith("ray:") for w in workers)
    assert all(r.stats["loads"] == 1 for r in remote.values())  # each actor loaded the model once
    assert all(r.stats["qmodel_hits"] == 0 for r in remote.values())  # and quantized each of its runs


@needs_ray
def test_more_tasks_than_slots_wait_for_an_actor(executor: RayExecutor, tasks: list[Task]) -> None:
    for task in tasks:  # three tasks on two actors: the third waits, then runs
        executor.submit(task)
    ids = sorted(executor.next_result().record.id for _ in tasks)
    assert ids == sorted(t.run_id for t in tasks)
    with pytest.raises(RuntimeError, match="no task submitted"):
        executor.next_result()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that never answers: its listener's accept queue is full, so new SYNs are dropped."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    held = []
    for _ in range(3):  # never accepted: they fill the queue
        client = socket.socket()
        client.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            client.connect(("127.0.0.1", port))
        held.append(client)
    try:
        yield port
    finally:
        for sock in [*held, server]:
            sock.close()


@needs_ray
@pytest.mark.parametrize(
    ("address", "timeout"),
    [("127.0.0.1:1", 5.0), ("ray://127.0.0.1:1", 5.0), ("127.0.0.1:{silent}", 0.5)],  # refused; refused; silent
)
def test_address_that_does_not_answer(address: str, timeout: float, monkeypatch: pytest.MonkeyPatch,
                                      silent_port: int) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = address.format(silent=silent_port)  # only loopback: this machine's own listener
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"Ray cluster at {address} does not answer"):
        RayExecutor(workers=1, address=address, connect_timeout=timeout)
    assert time.perf_counter() - t0 < 10


@needs_ray
def test_ray_address_environment_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="Ray cluster at 127.0.0.1:1 does not answer"):
        RayExecutor(workers=1)
    assert time.perf_counter() - t0 < 10


def test_address_parsing() -> None:
    assert _host_port("10.0.0.5:6380") == ("10.0.0.5", 6380)
    assert _host_port("head") == ("head", 6379)
    assert _host_port("ray://head") == ("head", 10001)
    assert _host_port("ray://[::1]:7000") == ("::1", 7000)
    with pytest.raises(ConfigError, match="not host:port"):
        _host_port("head:port")


def test_without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'ptqlab\[ray\]'"):
        RayExecutor(workers=1)
