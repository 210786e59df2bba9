"""An ``evaluate`` section runs what it names (the defaults only when it names none); ``ptqlab run --dry-run``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ptqlab.cli import main
from ptqlab.errors import ConfigError
from ptqlab.eval import access, reference
from ptqlab.schema import DEFAULT_EVALUATIONS, parse_config
from ptqlab.store import Store

QUESTIONS = [
    {"text": "The cat sat on the", "options": ["mat", "seven"], "answer": 0},
    {"text": "Tom ate an", "options": ["ran", "apple"], "answer": 1},
    {"text": "The sun is", "options": ["bright", "under"], "answer": 0},
]


def _tasks_dir(tmp: Path) -> Path:
    data = tmp / "qa.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    spec = {"task": "qa3", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{text}}",
            "doc_to_choice": "{{options}}", "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    (tmp / "qa3.yaml").write_text(yaml.safe_dump(spec))
    return tmp


def _config(tmp: Path, evaluate: dict | None, name: str = "c.yaml") -> str:
    data = {"model": "stories260k", "scheme": {"weight": {"bits": 8}}}
    if evaluate is not None:
        data["evaluate"] = evaluate
    path = tmp / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """Counts the perplexity passes, the run's and the FP reference's."""
    calls: list[int] = []

    def wrap(fn):
        def inner(*args, **kwargs):
            calls.append(1)
            return fn(*args, **kwargs)
        return inner

    monkeypatch.setattr(access, "perplexity", wrap(access.perplexity))
    monkeypatch.setattr(reference, "perplexity", wrap(reference.perplexity))
    return calls


def test_a_section_runs_what_it_names() -> None:
    assert parse_config({"model": "m"}).evaluate.names() == ["perplexity", "sample", "sensitivity"]
    settings_only = parse_config({"model": "m", "evaluate": {"max_windows": 8}}).evaluate
    assert settings_only.names() == list(DEFAULT_EVALUATIONS) and settings_only.max_windows == 8
    tasks_only = parse_config({"model": "m", "evaluate": {"tasks": ["piqa"], "limit": 50}}).evaluate
    assert tasks_only.names() == ["tasks"] and tasks_only.perplexity == [] and tasks_only.sample is None
    assert parse_config({"model": "m", "evaluate": {"perplexity": ["ptb_new"]}}).evaluate.names() == ["perplexity"]
    with pytest.raises(ConfigError, match="adaptive sets how perplexity is measured"):
        parse_config({"model": "m", "evaluate": {"tasks": ["piqa"], "adaptive": {}}})


def test_tasks_only_section_runs_no_perplexity(tmp_path, monkeypatch, counted) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    cfg = _config(tmp_path, {"tasks": ["qa3"], "tasks_dir": str(_tasks_dir(tmp_path))})
    db = str(tmp_path / "s.db")
    assert main(["--store", db, "run", cfg, "--quiet"]) == 0
    (listed,) = Store(db).list_runs()
    run = Store(db).get(listed.id)
    assert run is not None
    names = [m.name for m in run.metrics]
    assert counted == [] and not any(n.startswith("ppl.") for n in names)
    assert "lm_eval.qa3.acc" in names and "sample" not in run.texts and run.sensitivity == []


def test_settings_only_section_runs_the_defaults(tmp_path, monkeypatch, counted) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    cfg = _config(tmp_path, {"seqlen": 64, "max_windows": 2})
    db = str(tmp_path / "s.db")
    assert main(["--store", db, "run", cfg, "--quiet"]) == 0
    (listed,) = Store(db).list_runs()
    run = Store(db).get(listed.id)
    assert run is not None and len(counted) == 2  # the FP reference's pass and the run's
    assert "ppl.wikitext2.s64.w2" in [m.name for m in run.metrics]
    assert run.texts.get("sample") and run.sensitivity


def test_dry_run_lists_what_runs_prices_it_and_stores_nothing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    db = tmp_path / "s.db"
    tasks_dir = str(_tasks_dir(tmp_path))
    both = _config(tmp_path, {"perplexity": ["wikitext2"], "seqlen": 64, "max_windows": 2, "tasks": ["qa3"],
                              "tasks_dir": tasks_dir, "sample": {"max_new_tokens": 4}})
    assert main(["--store", str(db), "run", both, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "not in the store" in out and "wikitext2: 2 windows x 64 tokens" in out and "qa3: 3 items" in out
    assert "FP window NLLs: computed first" in out and "4 greedy tokens" in out and "sensitivity" not in out
    assert "estimated time: no estimate" in out and "nothing computed or stored" in out
    assert not db.exists()
    ppl_only = _config(tmp_path, {"perplexity": ["wikitext2"], "seqlen": 64, "max_windows": 2}, "p.yaml")
    assert main(["--store", str(db), "run", ppl_only, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["--store", str(db), "run", ppl_only, "--dry-run"]) == 0
    assert "done: in the store" in capsys.readouterr().out
    assert main(["--store", str(db), "run", both, "--dry-run", "--json"]) == 0
    preview = json.loads(capsys.readouterr().out)
    assert preview["status"] == "missing" and preview["priced_s"] > 0  # priced from the stored run
    assert preview["total_s"] is None  # its tasks are not priced: no total
    assert {"load", "quantize", "perplexity"} <= set(preview["estimate_s"]) and "reference" not in preview["estimate_s"]
    assert preview["unpriced"] == ["tasks"]  # no stored run has timed a task item
    assert len(Store(db).list_runs()) == 1
