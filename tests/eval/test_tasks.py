"""lm-eval tasks on the in-memory model: vendored tasks, user task YAMLs, paired measures, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from task_items import ITEMS, run_tasks

from ptqlab.errors import ConfigError
from ptqlab.eval import tasks as T
from ptqlab.models.loading import load_model


@pytest.fixture(scope="module")
def stories():
    return load_model("stories260k")


def _task_dir(tmp: Path, name: str = "mytask", data: str = "items.jsonl") -> Path:
    (tmp / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tmp / data)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return tmp


def test_vendored_tasks_are_known_offline() -> None:
    T.check_tasks(list(T.LOCAL_TASKS))
    for task in T.LOCAL_TASKS:
        assert Path(T.local_task_yaml(task)["dataset_kwargs"]["data_files"]["test"]).is_file()


def test_user_task_matches_lm_eval_run_directly(stories, tmp_path: Path) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_dir = _task_dir(tmp_path)
    ours = run_tasks(stories.model, stories.tokenizer, ["mytask"], tasks_dir=task_dir)
    direct = simple_evaluate(model=HFLM(pretrained=stories.model, tokenizer=stories.tokenizer), tasks=["mytask"],
                             task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                             bootstrap_iters=1000)
    assert ours.metrics["mytask"]["acc"][0] == pytest.approx(direct["results"]["mytask"]["acc,none"])
    assert len(ours.correct["mytask"]) == len(ITEMS) and all(c in (0, 1) for c in ours.choice["mytask"])
    same = T.paired(ours, ours, "mytask")
    assert same == {"agree_fp": 1.0, "lost": 0.0, "gained": 0.0}


def test_broken_yaml_unknown_task_and_missing_data_fail_clearly(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.yaml").write_text("task: bad\ndoc_to_text: [unclosed\n")
    with pytest.raises(ConfigError, match="does not parse"):
        T.check_tasks(["bad"], broken)
    missing = tmp_path / "missing"
    missing.mkdir()
    _task_dir(missing, "gone", data="nope.jsonl")
    with pytest.raises(ConfigError, match="data file not found"):
        T.check_tasks(["gone"], missing)
    with pytest.raises(ConfigError, match=r"unknown lm-eval task 'piqaa'; close: .*piqa"):
        T.check_tasks(["piqaa"])


def test_fp_task_results_are_cached(stories, tmp_path: Path) -> None:
    cache = T.FPTaskCache(tmp_path / "cache")
    task_dir = _task_dir(tmp_path)
    a = cache.get(stories.model, stories.tokenizer, "fp", "float32", ["mytask"], tasks_dir=task_dir)
    b = cache.get(stories.model, stories.tokenizer, "fp", "float32", ["mytask"], tasks_dir=task_dir)
    assert cache.computed == 1 and a.correct == b.correct and a.choice == b.choice
