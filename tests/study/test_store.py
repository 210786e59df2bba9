"""The SQLite store round-trips runs and writes each in one transaction."""

from __future__ import annotations

import sqlite3

import pytest

from ptqlab.store import Metric, RunRecord, Store


def _run(rid="abc123", status="done"):
    return RunRecord(
        id=rid, qmodel_key="q1", model="m", model_fingerprint="1-ff", architecture="LlamaForCausalLM",
        config={"model": "m"}, status=status, created_at="2026-01-01T00:00:00+00:00",
        metrics=[Metric("ppl.wikitext2.s2048.w40", 20.5)] if status == "done" else [],
        layers=[{"layer": 0, "module": "model.layers.0.q", "bits": 4, "rel_error": 0.1, "seconds": 0.5}],
        versions={"torch": "2.13.0"}, timings={"total_s": 1.0},
    )


def test_roundtrip_and_prefix(tmp_path):
    store = Store(tmp_path / "s.db")
    store.save(_run())
    got = store.get("abc")
    assert got is not None and got.metrics[0].value == 20.5 and got.layers[0]["rel_error"] == 0.1
    assert got.versions == {"torch": "2.13.0"}
    assert store.has_finished("abc123") and not store.has_finished("abc")
    assert [r.id for r in store.list_runs()] == ["abc123"]
    assert store.get("zzz") is None


def test_failed_save_leaves_nothing(tmp_path):
    store = Store(tmp_path / "s.db")
    bad = _run()
    bad.layers.append(dict(bad.layers[0]))  # duplicate primary key -> the whole transaction rolls back
    with pytest.raises(sqlite3.IntegrityError):
        store.save(bad)
    assert store.list_runs() == []


def test_rerun_replaces_failed(tmp_path):
    store = Store(tmp_path / "s.db")
    store.save(_run(status="failed"))
    store.save(_run())
    runs = store.list_runs()
    assert len(runs) == 1 and runs[0].status == "done"


def test_window_nlls_and_thread_count_round_trip(tmp_path):
    store = Store(tmp_path / "s.db")
    run = _run()
    run.threads = 2
    run.windows = {"ppl.wikitext2.s2048.w40": {"nll": [3.0, 2.5, float("inf")], "fp_nll": [2.9, 2.4, 3.1]},
                   "ppl.ptb_new.s2048.w40": {"nll": [4.0], "fp_nll": None}}
    store.save(run)
    got = store.get(run.id)
    assert got is not None and got.threads == 2 and got.windows == run.windows
    assert got.to_json()["windows"] == run.windows


@pytest.mark.parametrize(("column", "field", "empty", "value"), [
    ("threads", "threads", None, 4),
    ("machine_json", "machine", {}, {"cpu": "Example CPU", "cores": 2, "isa": ["avx2"]}),
])
def test_a_store_written_before_a_column_was_added_opens_and_gains_it(tmp_path, column, field, empty, value):
    path = tmp_path / "old.db"
    Store(path).save(_run())
    con = sqlite3.connect(path)
    con.execute(f"ALTER TABLE runs DROP COLUMN {column}")
    con.commit()
    con.close()
    store = Store(path)
    got = store.get("abc123")
    assert got is not None and getattr(got, field) == empty
    again = _run("def456")
    setattr(again, field, value)
    store.save(again)
    assert getattr(store.get("def456"), field) == value
    assert store.get("def456").to_json()[field] == value
