"""Sweeps on the real tiny stories260K: resume after SIGKILL, 100 runs, shared work, reruns to the bit."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ptqlab.cli import main
from ptqlab.study.config import parse_config
from ptqlab.study.executors import LocalExecutor
from ptqlab.study.store import Store
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


def _contents(db: Path) -> dict[str, object]:
    """Everything that must be equal between two stores of the same sweep (not timings or dates)."""
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        runs = con.execute("SELECT id, status, error, config_json, qmodel_key FROM runs ORDER BY id").fetchall()
        metrics = con.execute("SELECT run_id, name, value, stderr FROM metrics ORDER BY run_id, name").fetchall()
        windows = con.execute("SELECT run_id, metric, idx, nll, fp_nll FROM windows ORDER BY 1, 2, 3").fetchall()
        layers = con.execute("SELECT run_id, module, bits, rel_error FROM layer_records ORDER BY 1, 2").fetchall()
        sweep = con.execute("SELECT sweep, run_id, position FROM sweep_runs ORDER BY 1, 3").fetchall()
    return {"runs": runs, "metrics": metrics, "windows": windows, "layers": layers, "sweep": sweep}


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


def test_sweep_killed_at_random_moments_resumes_to_the_same_store(tmp_path: Path, monkeypatch) -> None:
    grid = {"recipe": [[{"rtn": {}}], [{"gptq": {}}]], "scheme.weight.bits": [8, 4, 3, 2]}
    sweep = _sweep_file(tmp_path / "s.yaml", name="killed", grid=grid)
    reference = tmp_path / "reference.db"
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache-ref"))
    assert main(["--store", str(reference), "sweep", str(sweep), "--quiet"]) == 0

    db = tmp_path / "killed.db"
    env = {**os.environ, "PTQLAB_CACHE": str(tmp_path / "cache-killed")}
    command = [sys.executable, "-m", "ptqlab.cli", "--store", str(db), "sweep", str(sweep), "--quiet"]
    rng = random.Random(0)
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 14.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if db.exists():
            _consistent(db)
    assert kills >= 2, "the sweep finished before it could be killed: make the runs longer"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _contents(db) == _contents(reference)
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
    fresh = Worker(progress=False, share=False).run(second)  # quantized again from scratch, alone
    assert [(m.name, m.value) for m in fresh.metrics] == [(m.name, m.value) for m in b.metrics]
    # W4A8 with the same weights: the weights are reused, its own sizes measured
    w4a8 = parse_config({**cfg, "scheme": {**BASE["scheme"], "activation": {"bits": 8}}})
    c = worker.run(w4a8)
    assert c.timings["qmodel_reused"] == 1.0 and worker.stats.quantized == 1
    alone = Worker(progress=False, share=False).run(w4a8)
    assert [(m.name, m.value) for m in c.metrics] == [(m.name, m.value) for m in alone.metrics]
    assert "bits.activation" in {m.name for m in c.metrics}


@pytest.mark.parametrize("recipe", [[{"rtn": {}}], [{"gptq": {}}]])
def test_a_sweep_run_equals_a_single_run_to_the_bit(tmp_path: Path, monkeypatch, recipe) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    cfg = {**BASE, "recipe": recipe, "scheme": {**BASE["scheme"], "activation": {"bits": 8}}}
    shared = Worker(progress=False)
    shared.run(parse_config({**cfg, "scheme": {"weight": {"bits": 3}}}))  # something else first
    in_sweep = shared.run(parse_config(cfg))
    alone = Worker(progress=False, share=False).run(parse_config(cfg))
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
