"""`ptqlab sweep`, `status`, `ls` filters and `cache` through the command line; bad input stores nothing."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
import yaml

from ptqlab.cli import main
from ptqlab.store import SCHEMA_VERSION, Store

BASE = {
    "name": "cli",
    "model": "stories260k",
    "scheme": {"weight": {"bits": 4}},
    "evaluate": {"perplexity": ["wikitext2"], "seqlen": 64, "max_windows": 2, "sensitivity": None, "sample": None},
    "grid": {"scheme.weight.bits": [8, 4]},
}


def _file(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"grdi": {"x": [1]}}, "grdi: unknown key"),
        ({"grid": {"scheme.weight.bitz": [4]}}, "names no config field"),
        ({"grid": {}}, "grid: empty"),
        ({"grid": {"scheme.weight.bits": [4, 1]}}, "run 1"),
    ],
)
def test_bad_sweep_file_one_error_nothing_written(tmp_path, capsys, change, message) -> None:
    db = tmp_path / "s.db"
    assert main(["--store", str(db), "sweep", _file(tmp_path, {**BASE, **change})]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not db.exists()


def test_bad_stores_one_error_left_unchanged(tmp_path, capsys) -> None:
    junk = tmp_path / "junk.db"
    junk.write_text("not a database at all\n" * 50)
    assert main(["--store", str(junk), "sweep", _file(tmp_path, BASE)]) == 2
    assert "is not a ptqlab store" in capsys.readouterr().err
    assert junk.read_text() == "not a database at all\n" * 50
    newer = tmp_path / "newer.db"
    Store(newer)
    with sqlite3.connect(newer) as con:
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    before = newer.read_bytes()
    assert main(["--store", str(newer), "sweep", _file(tmp_path, BASE), "--dry-run"]) == 2
    assert "newer ptqlab" in capsys.readouterr().err
    assert newer.read_bytes() == before


def test_ray_address_that_does_not_answer(tmp_path, capsys) -> None:
    db = tmp_path / "s.db"
    t0 = time.perf_counter()
    code = main(["--store", str(db), "sweep", _file(tmp_path, BASE), "--executor", "ray", "--address", "127.0.0.1:9"])
    assert code == 2 and time.perf_counter() - t0 < 15
    assert "127.0.0.1:9" in capsys.readouterr().err
    assert not db.exists()


def test_dry_run_sweep_status_ls_and_cache(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    db, sweep = str(tmp_path / "s.db"), _file(tmp_path, BASE)
    assert main(["--store", db, "sweep", sweep, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "0 done, 0 failed, 0 running elsewhere, 2 missing" in out and "unknown" in out
    assert not Path(db).exists()  # a dry run writes nothing
    assert main(["--store", db, "sweep", sweep, "--quiet", "--set", "scheme.weight.bits=8"]) == 0
    assert "computed 1 runs" in capsys.readouterr().out
    assert main(["--store", db, "sweep", sweep, "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["counts"] == {"done": 1, "failed": 0, "running": 0, "missing": 1}
    assert plan["runs"][1]["estimate_s"] > 0 and plan["time_left_s"] > 0  # from the stored W8 run
    assert main(["--store", db, "sweep", sweep, "--quiet"]) == 0
    assert "computed 1 runs" in capsys.readouterr().out
    assert main(["--store", db, "status", "cli"]) == 0
    out = capsys.readouterr().out
    assert "2 runs: 2 done, 0 failed, 0 running, 0 missing" in out
    assert main(["--store", db, "ls", "--sweep", "cli", "--metric", "bits.weight"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("bits.weight=" in line for line in lines)
    assert main(["--store", db, "ls", "--status", "failed"]) == 0
    assert capsys.readouterr().out.strip() == "no run matches"
    assert main(["--store", db, "status", "nope"]) == 2
    assert "no sweep 'nope'" in capsys.readouterr().err
    assert main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert "qmodels" in out and "perplexity" in out
    assert main(["cache", "clear"]) == 0
    assert main(["cache", "ls"]) == 0
    assert "total             0 entries" in capsys.readouterr().out
