"""In-context learning: ``evaluate.num_fewshot`` as a list, one metric per count, pools checked up front."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from task_items import ITEMS

import ptqlab
from ptqlab.errors import ConfigError
from ptqlab.eval import tasks as T
from ptqlab.eval.fewshot import shot_measure
from ptqlab.eval.plan import check_evaluate
from ptqlab.models.loading import load_model
from ptqlab.schema import Evaluate, coerce

SHOTS = [{"q": "The dog said", "choices": ["woof", "blue"], "label": 0},
         {"q": "Snow is", "choices": ["green", "cold"], "label": 1},
         {"q": "The sun is", "choices": ["bright", "under"], "label": 0}]


@pytest.fixture(scope="module")
def stories():
    return load_model("stories260k")


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _task_dir(tmp: Path, *, train: bool = True, **extra: Any) -> Path:
    """A multiple-choice task ``mytask``: six test items and, with ``train``, a few-shot split of three."""
    tmp.mkdir(parents=True, exist_ok=True)
    files = {"test": str(_write(tmp / "test.jsonl", ITEMS))}
    if train:
        files["train"] = str(_write(tmp / "train.jsonl", SHOTS))
    spec = {"task": "mytask", "dataset_path": "json", "dataset_kwargs": {"data_files": files}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc", "aggregation": "mean",
                                                           "higher_is_better": True}],
            **({"fewshot_split": "train"} if train else {}), **extra}
    (tmp / "mytask.yaml").write_text(yaml.safe_dump(spec))
    return tmp


def _ev(task_dir: Path, **keys: Any) -> dict[str, Any]:
    return {"tasks": ["mytask"], "tasks_dir": str(task_dir), "limit": 4, **keys}


def test_num_fewshot_is_a_count_or_a_list_of_counts() -> None:
    curve = coerce(Evaluate, {"tasks": ["piqa"], "num_fewshot": [5, 0, 1]}, "evaluate")
    assert curve.num_fewshot == [0, 1, 5] and curve.shot_counts() == [0, 1, 5] and curve.fewshot_curve
    one = coerce(Evaluate, {"tasks": ["piqa"], "num_fewshot": 5}, "evaluate")
    assert one.shot_counts() == [5] and not one.fewshot_curve
    assert coerce(Evaluate, {"tasks": ["piqa"]}).shot_counts() == [None]
    for bad, why in (([], "non-empty"), ([1, 1], "without repeats"), ([0, -1], "at least 0"), (-2, "at least 0")):
        with pytest.raises(ConfigError, match=f"evaluate.num_fewshot: .*{why}"):
            coerce(Evaluate, {"tasks": ["piqa"], "num_fewshot": bad}, "evaluate")
    assert shot_measure("acc", 5) == "acc.fewshot5" and shot_measure("acc", None) == "acc"


def test_a_count_past_the_pool_is_one_error_before_any_model_work(tmp_path: Path) -> None:
    split = _task_dir(tmp_path / "split", train=True)  # a few-shot split of 3
    check_evaluate(coerce(Evaluate, _ev(split, num_fewshot=[0, 3])))
    with pytest.raises(ConfigError, match=r"num_fewshot: 4 examples per item for task 'mytask', but its pool of "
                                          r"few-shot examples holds 3"):
        check_evaluate(coerce(Evaluate, _ev(split, num_fewshot=[0, 1, 4])))
    test_only = _task_dir(tmp_path / "test_only", train=False)  # lm-eval draws from the 6 test items
    check_evaluate(coerce(Evaluate, _ev(test_only, num_fewshot=6)))
    with pytest.raises(ConfigError, match="7 examples per item for task 'mytask'.* holds 6"):
        check_evaluate(coerce(Evaluate, _ev(test_only, num_fewshot=7)))
    same = _task_dir(tmp_path / "same", train=False, fewshot_split="test")  # the item itself is left out
    with pytest.raises(ConfigError, match="6 examples per item .* holds 5"):
        check_evaluate(coerce(Evaluate, _ev(same, num_fewshot=6)))
    own = _task_dir(tmp_path / "own", train=True, num_fewshot=5)  # the task's own count, left to it
    with pytest.raises(ConfigError, match="5 examples per item .* holds 3"):
        check_evaluate(coerce(Evaluate, _ev(own)))
    check_evaluate(coerce(Evaluate, _ev(own, num_fewshot=[0, 2])))


def _by_name(metrics: list[Any]) -> dict[str, float]:
    return {m.name: m.value for m in metrics}


def test_fewshot_curve_end_to_end_matches_lm_eval(stories, tmp_path: Path, monkeypatch) -> None:
    """Each count is its own metric, equal to lm-eval's own run at that count (same few-shot draw)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    task_dir = _task_dir(tmp_path)
    ev = ptqlab.evaluate(stories.model, stories.tokenizer, _ev(task_dir, num_fewshot=[0, 1, 3]), progress=False)
    got = _by_name(ev.metrics)
    for k in (0, 1, 3):
        for measure in ("acc", "agree_fp", "lost", "gained", "ece"):
            assert f"lm_eval.mytask.{measure}.fewshot{k}" in got, (measure, k)
        assert got[f"lm_eval.mytask.agree_fp.fewshot{k}"] == 1.0  # the FP model is its own reference
    assert "lm_eval.mytask.acc" not in got and "lm_eval.mytask.ece" not in got
    hf = HFLM(pretrained=stories.model, tokenizer=stories.tokenizer)
    for k in (1, 3):
        direct = simple_evaluate(model=hf, tasks=["mytask"], limit=4, num_fewshot=k, bootstrap_iters=0,
                                 task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                 random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        assert got[f"lm_eval.mytask.acc.fewshot{k}"] == pytest.approx(direct["results"]["mytask"]["acc,none"])
    for k in (0, 1, 3):  # the reliability curve is stored with the run, and the ECE follows from it
        rel = json.loads(ev.texts[f"lm_eval.mytask.reliability.fewshot{k}"])
        assert rel["n"] == 4 and sum(b["count"] for b in rel["bins"]) == 4 and len(rel["bins"]) == 10
        ece = sum(b["count"] / 4 * abs(b["accuracy"] - b["confidence"]) for b in rel["bins"] if b["count"])
        assert got[f"lm_eval.mytask.ece.fewshot{k}"] == pytest.approx(ece) == pytest.approx(rel["ece"])


def test_one_count_keeps_lm_eval_names(stories, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    task_dir = _task_dir(tmp_path)
    one = _by_name(ptqlab.evaluate(stories.model, stories.tokenizer, _ev(task_dir, num_fewshot=1),
                                   progress=False).metrics)
    curve = _by_name(ptqlab.evaluate(stories.model, stories.tokenizer, _ev(task_dir, num_fewshot=[1, 2]),
                                     progress=False).metrics)
    assert {"lm_eval.mytask.acc", "lm_eval.mytask.ece", "lm_eval.mytask.agree_fp"} <= set(one)
    assert not any("fewshot" in n for n in one)
    assert one["lm_eval.mytask.acc"] == curve["lm_eval.mytask.acc.fewshot1"]
    assert one["lm_eval.mytask.ece"] == curve["lm_eval.mytask.ece.fewshot1"]


def test_fp_answers_are_cached_per_count(stories, tmp_path: Path) -> None:
    cache = T.FPTaskCache(tmp_path / "cache")
    task_dir = _task_dir(tmp_path)
    settings = {"limit": 3, "tasks_dir": task_dir}
    first = cache.get_shots(stories.model, stories.tokenizer, "fp", "float32", ["mytask"], [0, 1], **settings)
    assert cache.computed == 2
    again = cache.get_shots(stories.model, stories.tokenizer, "fp", "float32", ["mytask"], [1, 2], **settings)
    assert cache.computed == 3 and again[1] == first[1] and set(again) == {1, 2}
    assert len(again[2].loglik["mytask"]) == 3 and all(len(x) == 2 for x in again[2].loglik["mytask"])
    single = cache.get(stories.model, stories.tokenizer, "fp", "float32", ["mytask"], num_fewshot=2, **settings)
    assert cache.computed == 3 and single == again[2]


def test_quantized_run_stores_the_curve_and_reliability(tmp_path: Path, monkeypatch, capsys) -> None:
    """``ptqlab run`` with a list of counts: per-count metrics against the FP answers, reliability stored."""
    from ptqlab.cli import main
    from ptqlab.store import Store

    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))
    cfg = {"model": "stories260k", "scheme": {"weight": {"bits": 3, "granularity": "channel"}},
           "evaluate": _ev(_task_dir(tmp_path), num_fewshot=[0, 4])}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--store", str(tmp_path / "s.db"), "run", str(tmp_path / "bad.yaml"), "--quiet"]) != 0
    assert "holds 3" in capsys.readouterr().err
    store = Store(tmp_path / "s.db")
    assert store.list_runs() == []  # a config error stores nothing
    cfg["evaluate"]["num_fewshot"] = [0, 2]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--store", str(tmp_path / "s.db"), "run", str(tmp_path / "c.yaml"), "--quiet"]) == 0
    (listed,) = store.list_runs()
    run = store.get(listed.id)
    assert run is not None and run.status == "done", run and run.error
    files = list((tmp_path / "cache" / "lm_eval").glob("*.json"))
    assert len(files) == 2  # the FP answers, one file per count
    fp_acc = [json.loads(p.read_text())["metrics"]["mytask"]["acc"][0] for p in files]
    got = _by_name(run.metrics)
    for k in (0, 2):  # paired identity on the same items: acc(Q) = acc(FP at k) - lost + gained
        acc, lost, gained = (got[f"lm_eval.mytask.{m}.fewshot{k}"] for m in ("acc", "lost", "gained"))
        assert any(a == pytest.approx(acc + lost - gained) for a in fp_acc), k
        rel = json.loads(run.texts[f"lm_eval.mytask.reliability.fewshot{k}"])
        assert rel["n"] == 4 and rel["ece"] == pytest.approx(got[f"lm_eval.mytask.ece.fewshot{k}"])
