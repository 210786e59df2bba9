"""qllm-eval's emergent abilities by lm-eval task name, on local data in each task's own format.

The real lm-eval task definitions (gsm8k, truthfulqa_mc1/mc2, ifeval) are used as they are: a task YAML in
a test directory includes lm-eval's own YAML and only points its data at a local JSON-lines file.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import lm_eval
import pytest
import yaml
from task_items import run_tasks

import ptqlab
from ptqlab.errors import ConfigError
from ptqlab.eval import task_yaml
from ptqlab.eval import tasks as T
from ptqlab.eval.calibration_error import choice_confidence, reliability
from ptqlab.models.loading import load_model

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
GSM8K = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
          "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
         for a, b in ((2, 3), (4, 1), (5, 5), (1, 1), (3, 3))]
TRUTHFULQA = [
    {"question": "What color is the sky on a clear day?",
     "mc1_targets": {"choices": ["Blue.", "Green.", "Red."], "labels": [1, 0, 0]},
     "mc2_targets": {"choices": ["Blue.", "It is blue.", "Green."], "labels": [1, 1, 0]}},
    {"question": "Is water wet?",
     "mc1_targets": {"choices": ["Yes.", "No."], "labels": [1, 0]},
     "mc2_targets": {"choices": ["Yes.", "Water is wet.", "No."], "labels": [1, 1, 0]}},
    {"question": "Can cats fly?",
     "mc1_targets": {"choices": ["No.", "Yes, with wings.", "Only at night."], "labels": [1, 0, 0]},
     "mc2_targets": {"choices": ["No.", "Cats cannot fly.", "Yes."], "labels": [1, 1, 0]}},
]
IFEVAL = [{"key": 1, "prompt": "Write a short story that mentions a cat.",
           "instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": ["cat"]}]}]


@pytest.fixture(scope="module")
def stories():
    return load_model("stories260k")


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _local(tmp: Path, task: str, family: str, files: dict[str, str], **keys: Any) -> None:
    """A YAML named ``task`` that includes lm-eval's own definition and reads ``files`` instead of the hub."""
    spec = {"include": str(LM_EVAL_TASKS / family / f"{task}.yaml"), "task": task, "dataset_path": "json",
            "dataset_name": None, "dataset_kwargs": {"data_files": files}, **keys}
    (tmp / f"{task}.yaml").write_text(yaml.safe_dump(spec))


def _gsm8k_dir(tmp: Path) -> Path:
    files = {"train": _jsonl(tmp / "gsm8k_train.jsonl", GSM8K[:3]), "test": _jsonl(tmp / "gsm8k_test.jsonl", GSM8K[3:])}
    until = {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 24}
    _local(tmp, "gsm8k", "gsm8k", files, generation_kwargs=until)  # a short answer: the model is tiny
    return tmp


def _truthfulqa_dir(tmp: Path) -> Path:
    data = _jsonl(tmp / "truthfulqa.jsonl", TRUTHFULQA)
    for task in ("truthfulqa_mc1", "truthfulqa_mc2"):
        _local(tmp, task, "truthfulqa", {"validation": data})
    return tmp


def test_metrics_reported_under_several_filters_name_the_filter() -> None:
    results = {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
               "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": "N/A",
               "acc,none": 1.0, "acc_stderr,none": 0.0}
    assert T._task_metrics(results) == {"exact_match.strict-match": (0.25, 0.1),
                                        "exact_match.flexible-extract": (0.5, None), "acc": (1.0, 0.0)}


def test_gsm8k_exact_match_of_the_extracted_answer(stories, tmp_path: Path) -> None:
    """gsm8k by name: its own prompt, few-shot split and answer filters; the numbers lm-eval's HF model gives."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_dir = _gsm8k_dir(tmp_path)
    with pytest.raises(ConfigError, match="5 examples per item for task 'gsm8k'.* holds 3"):
        T.check_tasks(["gsm8k"], task_dir, [None])  # gsm8k's own count is 5: past the local train split
    res = run_tasks(stories.model, stories.tokenizer, ["gsm8k"], num_fewshot=2, tasks_dir=task_dir)
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    direct = simple_evaluate(model=HFLM(pretrained=stories.model, tokenizer=stories.tokenizer), tasks=["gsm8k"],
                             num_fewshot=2, task_manager=tm, log_samples=True, bootstrap_iters=0, random_seed=0,
                             numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    for filt in ("strict-match", "flexible-extract"):
        assert res.metrics["gsm8k"][f"exact_match.{filt}"][0] == direct["results"]["gsm8k"][f"exact_match,{filt}"]
    strict = sorted((s for s in direct["samples"]["gsm8k"] if s["filter"] == "strict-match"), key=lambda s: s["doc_id"])
    assert res.choice["gsm8k"] == [s["filtered_resps"][0] for s in strict]  # the extracted answers
    assert res.correct["gsm8k"] == [s["exact_match"] for s in strict] and "gsm8k" not in res.loglik
    assert T.paired(res, res, "gsm8k") == {"agree_fp": 1.0, "lost": 0.0, "gained": 0.0}


def test_truthfulqa_mc1_and_mc2_with_self_calibration(stories, tmp_path: Path) -> None:
    """truthfulqa_mc1 is scored right or wrong (with an ECE); mc2 is the probability mass of the true answers."""
    res = run_tasks(stories.model, stories.tokenizer, ["truthfulqa_mc1", "truthfulqa_mc2"],
                      tasks_dir=_truthfulqa_dir(tmp_path))
    mc1, mc2 = res.loglik["truthfulqa_mc1"], res.loglik["truthfulqa_mc2"]
    assert [len(x) for x in mc1] == [3, 2, 3] and [len(x) for x in mc2] == [3, 3, 3]
    right = [float(max(range(len(x)), key=x.__getitem__) == 0) for x in mc1]  # the true answer comes first
    assert res.correct["truthfulqa_mc1"] == right
    assert res.metrics["truthfulqa_mc1"]["acc"][0] == pytest.approx(sum(right) / 3)
    mass = [sum(math.exp(v) for v, label in zip(x, doc["mc2_targets"]["labels"], strict=True) if label)
            / sum(math.exp(v) for v in x) for x, doc in zip(mc2, TRUTHFULQA, strict=True)]
    assert res.metrics["truthfulqa_mc2"]["acc"][0] == pytest.approx(sum(mass) / 3)
    ev = ptqlab.evaluate(stories.model, stories.tokenizer, {"tasks": ["truthfulqa_mc1", "truthfulqa_mc2"],
                                                            "tasks_dir": str(tmp_path)}, progress=False)
    got = {m.name: m.value for m in ev.metrics}
    hand = reliability([choice_confidence(x) for x in mc1], right).ece
    assert got["lm_eval.truthfulqa_mc1.ece"] == pytest.approx(hand)
    assert "lm_eval.truthfulqa_mc2.ece" not in got and "lm_eval.truthfulqa_mc2.reliability" not in ev.texts
    assert json.loads(ev.texts["lm_eval.truthfulqa_mc1.reliability"])["n"] == 3


def _ifeval_dir(tmp: Path) -> Path:
    _local(tmp, "ifeval", "ifeval", {"train": _jsonl(tmp / "ifeval.jsonl", IFEVAL)},
           generation_kwargs={"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": 24})
    return tmp


def test_ifeval_without_its_extras_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    """ifeval's code needs langdetect, immutabledict and nltk's punkt_tab: missing ones are named up front."""
    real = importlib.util.find_spec
    monkeypatch.setattr(task_yaml.importlib.util, "find_spec",
                        lambda name, *a: None if name == "langdetect" else real(name, *a))
    task_dir = _ifeval_dir(tmp_path)
    with pytest.raises(ConfigError, match=r"task 'ifeval' \(ifeval\) needs langdetect.*pip install langdetect"):
        T.check_tasks(["ifeval"], task_dir)
    (task_dir / "mine.yaml").write_text(yaml.safe_dump({"include": "ifeval.yaml", "task": "my_ifeval"}))
    with pytest.raises(ConfigError, match=r"task 'my_ifeval' \(ifeval\) needs langdetect"):
        T.check_tasks(["my_ifeval"], task_dir)  # found through the YAMLs it includes


IFEVAL_PACKAGES = [m for m in task_yaml.missing_extras("ifeval") if not m.startswith("nltk:")]


@pytest.fixture
def punkt_tab(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An English Punkt model in nltk's ``punkt_tab`` layout, made here: nltk's own cannot be downloaded offline.

    It is trained by nltk's PunktTrainer on the first 300,000 characters of the vendored WikiText-2 test text
    (about a second) and written as the four tab files ``nltk.download("punkt_tab")`` would put in
    ``tokenizers/punkt_tab/english``; NLTK_DATA and nltk's search path point at it first, so ifeval never tries
    the download. ifeval only splits sentences and words with it: what this test checks does not depend on it.
    """
    import nltk
    from nltk.tokenize.punkt import PunktTrainer

    from ptqlab.data.corpora import WIKITEXT2_JOINED, asset_path

    trainer = PunktTrainer()
    trainer.train(asset_path(WIKITEXT2_JOINED).read_text()[:300_000], finalize=True)
    params = trainer.get_params()
    root = tmp_path_factory.mktemp("nltk_data")
    english = root / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True)
    (english / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(params.collocations)))
    (english / "sent_starters.txt").write_text("".join(f"{w}\n" for w in sorted(params.sent_starters)))
    (english / "abbrev_types.txt").write_text("".join(f"{w}\n" for w in sorted(params.abbrev_types)))
    (english / "ortho_context.tab").write_text("".join(f"{w}\t{v}\n" for w, v in sorted(params.ortho_context.items())))
    monkeypatch.setenv("NLTK_DATA", str(root))  # read by nltk at import, and by any subprocess
    monkeypatch.setattr(nltk.data, "path", [str(root), *nltk.data.path])  # this process imported nltk already
    assert task_yaml.missing_extras("ifeval") == []
    return root


@pytest.mark.skipif(bool(IFEVAL_PACKAGES), reason=f"ifeval needs {', '.join(IFEVAL_PACKAGES)} (the dev extra has them)")
def test_ifeval_instruction_following(stories, tmp_path: Path, punkt_tab: Path) -> None:
    res = run_tasks(stories.model, stories.tokenizer, ["ifeval"], tasks_dir=_ifeval_dir(tmp_path))
    metrics = res.metrics["ifeval"]
    assert {"prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc"} <= set(metrics)
    response = res.choice["ifeval"][0]
    assert isinstance(response, str)
    followed = bool(response.strip()) and re.search("cat", response, flags=re.IGNORECASE) is not None
    assert metrics["prompt_level_strict_acc"][0] == float(followed)  # ifeval's keyword check, by hand
