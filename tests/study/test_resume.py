"""Sweeps on the real tiny stories260K: resume after SIGKILL, 100 runs, shared work, reruns to the bit."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ptqlab.cli import main
from ptqlab.store import KILL_AT_ENV, Store
from ptqlab.study.config import parse_config
from ptqlab.study.executors import LocalExecutor
from ptqlab.study.sweep import load_sweep
from ptqlab.study.sweeper import plan_sweep, run_sweep
from ptqlab.study.worker import Worker

EVAL = {"perplexity": ["wikitext2"], "seqlen": 64, "max_windows": 2, "sensitivity": None, "sample": None}
BASE = {
    "model": "stories260k",
    "scheme": {"weight": {"bits": 4},
               "overrides": [{"match": ".*down_proj", "weight": {"granularity": "channel", "group_size": None}}]},
    "evaluate": EVAL,
    "calibration": {"samples": 4, "seqlen": 64, "batch_size": 4},
}


def _sweep_file(path: Path, **extra: object) -> Path:
    path.write_text(yaml.safe_dump({**BASE, **extra}))
    return path


def _consistent(db: Path) -> None:
    """No row of a run that is not stored; every stored run is done or failed, with metrics iff done."""
    with sqlite3.connect(db) as con:
        ids = {r[0]: r[1] for r in con.execute("SELECT id, status FROM runs")}
        for table in ("metrics", "windows", "layer_records"):
            orphans = {r[0] for r in con.execute(f"SELECT DISTINCT run_id FROM {table}")} - set(ids)
            assert not orphans, f"{table} rows of runs that are not stored: {orphans}"
        with_metrics = {r[0] for r in con.execute("SELECT DISTINCT run_id FROM metrics")}
    assert all(s in ("done", "failed") for s in ids.values())
    assert with_metrics == {i for i, s in ids.items() if s == "done"}


# Columns that legitimately differ between two stores of the same sweep: when and how fast (timings_json also
# says whether a quantized model was reused from the cache), on how many threads (fitted to the free cores:
# the numbers do not depend on it), and the leases (owner, host, pid, expiry).
_VOLATILE = {"runs": {"created_at", "timings_json", "threads"}, "layer_records": {"seconds"},
             "exports": {"created_at"}}


def _differences(db: Path, reference: Path) -> list[str]:
    """Every cell of ``reference`` that ``db`` lacks or holds otherwise, named ``table[primary key].column``."""
    out = []
    with sqlite3.connect(db) as con, sqlite3.connect(reference) as ref:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = [r[0] for r in ref.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        for table in tables:
            if table == "leases":
                continue
            info = ref.execute(f"PRAGMA table_info({table})").fetchall()  # (cid, name, type, notnull, default, pk)
            key = [c[1] for c in sorted((c for c in info if c[5]), key=lambda c: c[5])]
            columns = [c[1] for c in info if c[5] == 0 and c[1] not in _VOLATILE.get(table, set())]
            query = f"SELECT {', '.join(key + columns)} FROM {table}"
            mine = {row[:len(key)]: row[len(key):] for row in con.execute(query)}
            theirs = {row[:len(key)]: row[len(key):] for row in ref.execute(query)}
            for k in sorted(theirs.keys() - mine.keys()):
                out.append(f"{table}{list(k)}: missing from the resumed store")
            for k in sorted(mine.keys() - theirs.keys()):
                out.append(f"{table}{list(k)}: in the resumed store only")
            for k in sorted(mine.keys() & theirs.keys()):
                for column, a, b in zip(columns, mine[k], theirs[k], strict=True):
                    if a != b and not (a != a and b != b):  # NaN equals NaN here
                        out.append(f"{table}{list(k)}.{column}: {a!r} resumed, {b!r} in the reference")
    return out


def _runs_and_leases(db: Path) -> tuple[dict[str, str], list[tuple[str, int, float]]]:
    """``{run id: status}`` and the leases ``(run id, pid, expires)`` of a store."""
    with sqlite3.connect(db) as con:
        statuses = dict(con.execute("SELECT id, status FROM runs").fetchall())
        leases = con.execute("SELECT run_id, pid, expires FROM leases").fetchall()
    return statuses, leases


# Where each killed attempt kills itself (PTQLAB_TEST_KILL_AT: after the K-th run it commits, or inside the
# K-th run's write transaction, before the commit), and how many runs are stored after it. An ``inside``
# kill leaves the lease of its run, held by a dead process, for the next attempt to take over.
KILLS = [("after:1", 1), ("inside:2", 2), ("after:2", 4), ("inside:1", 4)]


def test_sweep_killed_at_random_moments_resumes_to_the_same_store(tmp_path: Path, monkeypatch) -> None:
    grid = {"recipe": [[{"rtn": {}}], [{"gptq": {}}]], "scheme.weight.bits": [8, 4, 3, 2]}
    total = 8
    sweep = _sweep_file(tmp_path / "s.yaml", name="killed", grid=grid)
    reference = tmp_path / "reference.db"
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache-ref"))
    monkeypatch.delenv(KILL_AT_ENV, raising=False)
    assert main(["--store", str(reference), "sweep", str(sweep), "--quiet"]) == 0
    assert len(Store(reference).statuses()) == total

    db = tmp_path / "killed.db"
    command = [sys.executable, "-m", "ptqlab.cli", "--store", str(db), "sweep", str(sweep), "--quiet"]
    stored = 0
    for attempt, (at, expected) in enumerate(KILLS):
        env = {**os.environ, "PTQLAB_CACHE": str(tmp_path / f"cache-{attempt}"), KILL_AT_ENV: at}  # cold: it computes
        out, err = tmp_path / f"attempt-{attempt}.out", tmp_path / f"attempt-{attempt}.err"
        with out.open("w") as stdout, err.open("w") as stderr:
            proc = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr)
            try:
                proc.wait(timeout=600)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        name = f"attempt {attempt} ({KILL_AT_ENV}={at})"
        log = err.read_text()
        assert proc.returncode == -signal.SIGKILL, f"{name} was not killed (exit {proc.returncode}):\n{log[-3000:]}"
        # it saw what the attempts before it stored, and no lease of theirs as a live one
        before = f"{stored} done, 0 failed, 0 running elsewhere, {total - stored} missing"
        assert before in log, f"{name}: expected '{before}' in its stderr:\n{log[-3000:]}"
        assert "being run by another sweep" not in log, f"{name} skipped runs leased by a dead process"
        _consistent(db)
        statuses, leases = _runs_and_leases(db)
        assert len(statuses) == expected, f"{name}: {len(statuses)} runs stored, expected {expected}"
        assert "failed" not in statuses.values(), f"{name} stored failed runs: {statuses}\n{log[-3000:]}"
        if at.startswith("inside"):  # its last run was rolled back; the lease it held is left, unexpired
            assert [(pid, e > time.time()) for _, pid, e in leases] == [(proc.pid, True)], (name, leases)
            assert leases[0][0] not in statuses
        else:
            assert leases == [], f"{name} left leases: {leases}"
        stored = expected
    assert 0 < stored < total

    env = {**os.environ, "PTQLAB_CACHE": str(tmp_path / f"cache-{len(KILLS) - 1}")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    before = f"{stored} done, 0 failed, 0 running elsewhere, {total - stored} missing"
    assert before in done.stderr, done.stderr[-3000:]
    assert f"computed {total - stored} runs" in done.stdout and "elsewhere" not in done.stdout, done.stdout
    _consistent(db)
    differences = _differences(db, reference)
    assert not differences, f"{len(differences)} differences from the reference:\n" + "\n".join(differences[:30])
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert "computed 0 runs" in again.stdout


def test_a_sweep_of_100_runs_shares_the_model_and_the_reference(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    path = _sweep_file(
        tmp_path / "big.yaml", name="stories-100",
        grid={"recipe": [[{"rtn": {}}], [{"gptq": {}}]], "scheme.weight.bits": [8, 6, 4, 3, 2]},
        zip=[{"scheme.weight.granularity": ["channel", "group"], "scheme.weight.group_size": [None, 32]},
             {"scheme.activation.bits": [16, 8, 4, 16, 16], "scheme.kv_cache.bits": [16, 16, 16, 8, 4]}],
    )
    sweep = load_sweep(path)
    assert len(sweep.runs) == 100
    store = Store(tmp_path / "s.db")
    summary = run_sweep(plan_sweep(sweep, store), store, LocalExecutor(progress=False), progress=False)
    assert (summary.computed, summary.failed) == (100, 0)
    stats = summary.stats["local"]
    # one load, one FP reference; 20 distinct weight quantizations (recipe x bits x granularity), the 80
    # runs that differ from one of them only in activation or KV bits restore its weights
    assert (stats["loads"], stats["references"], stats["quantized"], stats["qmodel_hits"]) == (1, 1, 20, 80)
    runs = store.list_runs(sweep="stories-100")
    assert len(runs) == 100 and all(r.status == "done" for r in runs)
    ppl = {(next(iter(r.config["recipe"][0])), r.config["scheme"]["weight"]["bits"],
            r.config["scheme"]["weight"]["granularity"], (r.config["scheme"].get("activation") or {}).get("bits"),
            (r.config["scheme"].get("kv_cache") or {}).get("bits")): r.metrics for r in runs}
    value = {k: next(m.value for m in v if m.name.startswith("ppl.")) for k, v in ppl.items()}
    assert value[("rtn", 2, "channel", 16, 16)] > value[("rtn", 8, "channel", 16, 16)]
    assert value[("rtn", 8, "channel", 4, 16)] > value[("rtn", 8, "channel", 8, 16)]
    again = run_sweep(plan_sweep(sweep, store), store, LocalExecutor(progress=False), progress=False)
    assert (again.computed, again.already) == (0, 100)


def test_a_new_evaluation_reuses_the_quantized_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    cfg = {**BASE, "recipe": [{"gptq": {}}]}
    first = parse_config(cfg)
    second = parse_config({**cfg, "evaluate": {**EVAL, "perplexity": ["wikitext2", "ptb_new"]}})
    worker = Worker(progress=False)
    a = worker.run(first)
    b = worker.run(second)
    assert a.status == b.status == "done"
    assert a.qmodel_key == b.qmodel_key and a.id != b.id
    assert "qmodel_reused" not in a.timings and b.timings["qmodel_reused"] == 1.0
    assert (worker.stats.quantized, worker.stats.qmodel_hits, worker.stats.loads) == (1, 1, 1)
    name = "ppl.wikitext2.s64.w2"
    assert {m.name: m.value for m in a.metrics}[name] == {m.name: m.value for m in b.metrics}[name]
    assert [r["rel_error"] for r in a.layers] == [r["rel_error"] for r in b.layers]
    fresh = Worker(progress=False, share=False, reuse=False).run(second)  # quantized again from scratch, alone
    assert [(m.name, m.value) for m in fresh.metrics] == [(m.name, m.value) for m in b.metrics]
    # W4A8 with the same weights: the weights are reused, its own sizes measured
    w4a8 = parse_config({**cfg, "scheme": {**BASE["scheme"], "activation": {"bits": 8}}})
    c = worker.run(w4a8)
    assert c.timings["qmodel_reused"] == 1.0 and worker.stats.quantized == 1
    alone = Worker(progress=False, share=False, reuse=False).run(w4a8)
    assert [(m.name, m.value) for m in c.metrics] == [(m.name, m.value) for m in alone.metrics]
    assert "bits.activation" in {m.name for m in c.metrics}


@pytest.mark.parametrize("recipe", [[{"rtn": {}}], [{"gptq": {}}]])
def test_a_sweep_run_equals_a_single_run_to_the_bit(tmp_path: Path, monkeypatch, recipe) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    cfg = {**BASE, "recipe": recipe, "scheme": {**BASE["scheme"], "activation": {"bits": 8}}}
    shared = Worker(progress=False)
    shared.run(parse_config({**cfg, "scheme": {"weight": {"bits": 3}}}))  # something else first
    in_sweep = shared.run(parse_config(cfg))
    alone = Worker(progress=False, share=False, reuse=False).run(parse_config(cfg))
    assert in_sweep.id == alone.id
    assert [(m.name, m.value) for m in in_sweep.metrics] == [(m.name, m.value) for m in alone.metrics]
    assert in_sweep.windows == alone.windows


def test_worker_processes_and_retry_failed(tmp_path: Path, monkeypatch) -> None:
    import ptqlab

    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    # group 32 does not divide down_proj's 172 without the override: those runs fail, the sweep goes on
    path = _sweep_file(tmp_path / "s.yaml", name="procs", scheme={"weight": {"bits": 4}}, recipe=[{"gptq": {}}],
                       grid={"scheme.weight.bits": [4, 3]},
                       zip={"scheme.weight.granularity": ["channel", "group"], "scheme.weight.group_size": [None, 32]})
    sweep = load_sweep(path)
    assert len(sweep.runs) == 4
    local_db, procs_db = tmp_path / "local.db", tmp_path / "procs.db"
    local = ptqlab.sweep(str(path), store=str(local_db), progress=False)
    procs = ptqlab.sweep(str(path), store=str(procs_db), workers=2, progress=False)
    assert local.computed == procs.computed == 4 and local.failed == procs.failed
    assert len(procs.stats) == 2  # both processes ran runs
    a, b = Store(local_db), Store(procs_db)
    for run in a.list_runs():
        other = b.get(run.id)
        assert other is not None and other.status == run.status
        assert [(m.name, m.value) for m in other.metrics] == [(m.name, m.value) for m in run.metrics]
    again = ptqlab.sweep(str(path), store=str(local_db), progress=False)
    assert again.computed == 0
    retried = ptqlab.sweep(str(path), store=str(local_db), retry_failed=True, progress=False)
    assert retried.computed == local.failed == 2
