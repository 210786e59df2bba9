"""lm-eval tasks on the quantized model in memory, offline.

Five task names read data vendored with ptqlab (``lambada_openai``, ``piqa``, ``arc_easy``,
``arc_challenge``, ``hellaswag_local``): their YAMLs are written at run time into a temporary directory
with absolute paths to the data and handed to lm-eval's ``TaskManager(include_path=...)`` (they shadow
lm-eval's built-ins of the same names, which would download). A user's own directory of task YAMLs is
parsed by ptqlab first, so a broken file is an error instead of being skipped silently by lm-eval.
The model is wrapped by ptqlab's lm-eval model :class:`ptqlab.eval.lm.PtqlabLM` (no save-and-reload): it
tokenizes as lm-eval's ``HFLM`` does and gives its numbers, but runs a context shared by several choices
once and scores the choices from its KV cache (unless a runtime quantizer's range spans the tokens of a
forward call, see :mod:`ptqlab.eval.lm`).

Tasks are run at one or more few-shot counts (:func:`run_shots`, one lm-eval run per count on one task
manager). lm-eval's built-in task index (some 15 000 YAMLs, seconds to read) is only read when a task is
neither vendored nor in the user's directory. Tasks whose lm-eval code needs packages or data that
lm-eval does not install (``ifeval``: ``langdetect``, ``immutabledict``, nltk's ``punkt_tab``, which its
code would otherwise try to download when imported) are checked first and fail with one clear error.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import numbers
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from torch import nn

from ..errors import ConfigError
from ..paths import cache_root
from .cache import entry, load_or_compute
from .fewshot import check_pool
from .task_yaml import family, install_hint, load_task_yaml, missing_extras, yaml_value

if TYPE_CHECKING:
    from .lm import Scorer

log = logging.getLogger(__name__)

_LOCAL: dict[str, dict[str, Any]] = {
    "lambada_openai": {
        "output_type": "loglikelihood",
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    },
    "piqa": {
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}",
    },
    "arc_easy": {
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}",
    },
    "arc_challenge": {
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}",
    },
    "hellaswag_local": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{ctx}}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": "{{endings}}",
    },
}
_ACC = [
    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
]
LOCAL_TASKS: tuple[str, ...] = tuple(_LOCAL)


def _data_file(task: str) -> Path:
    return Path(str(resources.files("ptqlab") / "assets" / "data" / "tasks" / f"{task}.jsonl.gz"))


def local_task_yaml(task: str) -> dict[str, Any]:
    """The lm-eval task definition of a vendored task, reading its data file by absolute path."""
    spec = dict(_LOCAL[task])
    data = _data_file(task)
    if not data.is_file():
        raise ConfigError(f"task {task}: its data file is missing: {data}")
    spec.setdefault("metric_list", _ACC)
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        **spec,
        "metadata": {"version": 1.0, "source": "ptqlab vendored data"},
    }


def parse_task_dir(directory: str | Path) -> dict[str, Path]:
    """Parse every task YAML of a user's directory; return ``{task name: file}``.

    Raises:
        ConfigError: Missing directory, a file that does not parse, a task without a name, or a data
            file named by the task that does not exist.

    """
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"evaluate.tasks_dir: not a directory: {root}")
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.yaml")):
        try:
            doc = load_task_yaml(path)
        except yaml.YAMLError as exc:
            raise ConfigError(f"task file {path} does not parse: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"task file {path} is not a mapping")
        name = doc.get("task")
        if not isinstance(name, str):
            continue  # a group or include-only file
        _check_data_files(path, doc)
        found[name] = path
    return found


def _check_data_files(path: Path, doc: dict[str, Any]) -> None:
    files = (doc.get("dataset_kwargs") or {}).get("data_files")
    values = files.values() if isinstance(files, dict) else [files] if files else []
    for value in values:
        for f in value if isinstance(value, list) else [value]:
            p = Path(f) if Path(f).is_absolute() else path.parent / f
            if not p.exists() and not Path(f).exists():
                raise ConfigError(f"task {doc['task']} ({path}): data file not found: {f}")


@contextmanager
def task_manager(tasks_dir: str | Path | None = None, tasks: Sequence[str] | None = None) -> Iterator[Any]:
    """An lm-eval TaskManager that knows the vendored tasks (and a user's directory).

    Args:
        tasks_dir: A user's directory of task YAMLs (they shadow built-ins of the same names).
        tasks: The tasks it is for: when each is vendored or in ``tasks_dir``, lm-eval's built-in index is
            not read (None: it is).

    """
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="ptqlab-tasks-") as tmp:
        for task in LOCAL_TASKS:
            (Path(tmp) / f"{task}.yaml").write_text(yaml.safe_dump(local_task_yaml(task), sort_keys=False))
        paths = [tmp] + ([str(tasks_dir)] if tasks_dir else [])
        yield TaskManager(include_path=paths, include_defaults=tasks is None or _needs_builtins(tasks, tasks_dir))


def _needs_builtins(tasks: Sequence[str], tasks_dir: str | Path | None) -> bool:
    user = parse_task_dir(tasks_dir) if tasks_dir else {}
    return any(t not in LOCAL_TASKS and t not in user for t in tasks)


def check_extras(tasks: Sequence[str], tasks_dir: str | Path | None = None) -> None:
    """Fail on a task whose lm-eval code needs packages or nltk data that are not installed.

    Raises:
        ConfigError: Naming the task, what is missing and how to install it.

    """
    user = parse_task_dir(tasks_dir) if tasks_dir else {}
    for task in tasks:
        name = family(task, user.get(task))
        missing = missing_extras(name) if name else []
        if missing:
            raise ConfigError(f"evaluate.tasks: task {task!r} ({name}) needs {', '.join(missing)}, not installed "
                              f"here; install with: {install_hint(missing)}")


def check_tasks(tasks: Sequence[str], tasks_dir: str | Path | None = None,
                shots: Sequence[int | None] = ()) -> None:
    """Fail before any model work on what the tasks cannot run with.

    Args:
        tasks: lm-eval task names.
        tasks_dir: A user's directory of task YAMLs.
        shots: Few-shot counts to check against each task's pool of examples (None: the task's own count,
            checked for vendored and user tasks), where the task's data can be had.

    Raises:
        ConfigError: An unknown task name (with close matches), a broken task directory, a task whose extra
            packages or data are missing (:func:`check_extras`), or a few-shot count past a task's pool.

    """
    if _needs_builtins(tasks, tasks_dir) or _demands(tasks, tasks_dir, shots):
        with task_manager(tasks_dir, tasks) as tm:
            _check_with(tm, tasks, tasks_dir, shots)
    else:
        check_extras(tasks, tasks_dir)


def _demands(tasks: Sequence[str], tasks_dir: str | Path | None, shots: Sequence[int | None]) -> dict[str, int]:
    """The largest few-shot count each task is asked for, where it is more than 0.

    A count of None is the task's own ``num_fewshot``: read from the YAML of a user's task (a built-in
    task's own count fits its data); vendored tasks have none.
    """
    user = parse_task_dir(tasks_dir) if tasks_dir else {}
    out: dict[str, int] = {}
    for task in tasks:
        own = yaml_value(user[task], "num_fewshot") if None in shots and task in user else None
        counts = [k for k in shots if k is not None] + ([own] if isinstance(own, int) else [])
        if max(counts, default=0) > 0:
            out[task] = max(counts)
    return out


def _check_with(tm: Any, tasks: Sequence[str], tasks_dir: str | Path | None, shots: Sequence[int | None]) -> None:
    """:func:`check_tasks` on a task manager: names, extras, then (loading the tasks) the few-shot pools."""
    user = parse_task_dir(tasks_dir) if tasks_dir else {}
    unknown = [t for t in tasks if t not in LOCAL_TASKS and t not in user]
    names = set(tm.all_tasks) if unknown else set()
    for t in unknown:
        if t not in names:
            close = difflib.get_close_matches(t, sorted(names), n=5)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise ConfigError(f"evaluate.tasks: unknown lm-eval task {t!r}{hint}")
    check_extras(tasks, tasks_dir)
    _check_pools(tm, _demands(tasks, tasks_dir, shots))


def _check_pools(tm: Any, demands: dict[str, int]) -> None:
    """Each task's few-shot pool against its count; a task whose data cannot be had here is not checked."""
    for name, shots in demands.items():
        try:
            leaves = list(tm.load([name])["tasks"].values())
        except Exception as exc:  # noqa: BLE001 - data that cannot be had: lm-eval will say so when it runs
            log.debug("few-shot pool of %s not checked: %s", name, exc)
            continue
        for task in leaves:
            check_pool(task, shots)


def count_items(
    tasks: Sequence[str], limit: int | None = None, tasks_dir: str | Path | None = None
) -> dict[str, int | None]:
    """How many items each task evaluates (its evaluation documents, at most ``limit``).

    The task's data is read as lm-eval would read it; a task whose data cannot be had here (a hub data set
    offline) counts as ``limit`` per task, or None when there is no limit.
    """
    counts: dict[str, int | None] = {}
    with task_manager(tasks_dir, tasks) as tm:
        for name in tasks:
            try:
                sizes = [len(list(t.eval_docs)) for t in tm.load([name])["tasks"].values()]
                counts[name] = sum(min(n, limit) if limit else n for n in sizes)
            except Exception as exc:  # noqa: BLE001 - data that cannot be had is counted as unknown
                log.debug("items of %s not counted: %s", name, exc)
                counts[name] = limit
    return counts


@dataclass
class TaskResults:
    """lm-eval's results of tasks at one few-shot count.

    Attributes:
        metrics: ``{task: {measure: (value, stderr)}}``; a measure lm-eval reports under several filters
            (gsm8k's ``strict-match`` and ``flexible-extract``) is named ``<metric>.<filter>``.
        correct: Each item's correctness (``acc``, else ``exact_match``, else the first numeric per-item
            metric), in document order, for paired comparisons.
        choice: Each item's answer: the index of the most likely choice, 1/0 for a greedy loglikelihood
            match, or the (filtered) generated text.
        loglik: Multiple-choice tasks only: each item's log-likelihood of every choice.

    """

    metrics: dict[str, dict[str, tuple[float, float | None]]] = field(default_factory=dict)
    correct: dict[str, list[float]] = field(default_factory=dict)
    choice: dict[str, list[int | str]] = field(default_factory=dict)
    loglik: dict[str, list[list[float]]] = field(default_factory=dict)


ShotResults = dict[int | None, TaskResults]
"""Task results by few-shot count (None: each task's own default)."""


def _choice(sample: dict[str, Any]) -> int | str:
    """The answer the model gave: the most likely choice, 1/0 for a greedy (loglikelihood) match, or its text."""
    resps = sample.get("filtered_resps") or []
    if len(resps) > 1:
        return max(range(len(resps)), key=lambda i: float(resps[i][0]))
    if resps and isinstance(resps[0], str):
        return resps[0]
    if resps and isinstance(resps[0], list | tuple) and len(resps[0]) > 1:
        return int(bool(resps[0][1]))
    return -1


def _correct(sample: dict[str, Any]) -> float:
    """The item's correctness: lm-eval's per-item ``acc``, else ``exact_match``, else its first numeric metric."""
    for key in ("acc", "exact_match", *sample.get("metrics", [])):
        value = sample.get(key)
        if isinstance(value, numbers.Real):
            return float(value)
    return math.nan


def _logliks(sample: dict[str, Any]) -> list[float]:
    """The log-likelihood of each choice of a multiple-choice item (without mutual-information's dry runs)."""
    lls = [float(r[0]) for r in sample.get("filtered_resps") or []]
    return lls[: len(lls) // 2] if "acc_mutual_info" in sample.get("metrics", []) else lls


def paired(fp: TaskResults, q: TaskResults, task: str) -> dict[str, float]:
    """Agreement with FP's choice and correct answers lost / gained, over the items both answered."""
    n = min(len(fp.choice.get(task, [])), len(q.choice.get(task, [])))
    if n == 0:
        return {}
    agree = sum(fp.choice[task][i] == q.choice[task][i] for i in range(n)) / n
    lost = sum(fp.correct[task][i] == 1 and q.correct[task][i] == 0 for i in range(n)) / n
    gained = sum(fp.correct[task][i] == 0 and q.correct[task][i] == 1 for i in range(n)) / n
    return {"agree_fp": agree, "lost": lost, "gained": gained}


def run_shots(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    shots: Sequence[int | None],
    *,
    limit: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    tasks_dir: str | Path | None = None,
    scorer: Scorer | None = None,
) -> ShotResults:
    """Run lm-eval tasks on ``model`` as it is in memory, once per few-shot count.

    ``batch_size`` is the number of requests per forward when a request is run whole, and the number of
    distinct contexts per forward when contexts are shared (their choices then run in one more forward).
    ``scorer`` replaces how tokenized loglikelihood requests are scored (a streamed model's layer-major
    scorer, :class:`ptqlab.eval.streamed.StreamedScorer`); by default :func:`ptqlab.eval.lm.score_requests`.
    The few-shot examples of each count are drawn with ``seed``, as lm-eval draws them.

    Args:
        model: The model, where it runs.
        tokenizer: Its tokenizer.
        tasks: lm-eval task names (vendored, in ``tasks_dir``, or lm-eval's own).
        shots: The few-shot counts (None: each task's own default).
        limit: At most this many items per task.
        batch_size: See above.
        seed: Seeds lm-eval's sampling of few-shot examples and its other randomness.
        tasks_dir: A user's directory of task YAMLs.
        scorer: See above.

    Returns:
        Per count: metrics with their standard errors, each item's correctness and answer, and the choices'
        log-likelihoods of multiple-choice tasks.

    """
    from lm_eval import simple_evaluate

    from .lm import PtqlabLM, score_requests

    lm = PtqlabLM(model, tokenizer, batch_size=batch_size, scorer=scorer or score_requests)
    results: ShotResults = {}
    with task_manager(tasks_dir, tasks) as tm:
        _check_with(tm, tasks, tasks_dir, shots)
        for k in shots:
            out = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=k, task_manager=tm,
                                  log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed, bootstrap_iters=1000)
            results[k] = _collect(out, tasks)
            log.info("lm-eval %s at %s shots: %s", ", ".join(tasks), "default" if k is None else k,
                     {t: {m: round(v, 4) for m, (v, _) in ms.items()} for t, ms in results[k].metrics.items()})
    return results


def _collect(out: dict[str, Any], tasks: Sequence[str]) -> TaskResults:
    res = TaskResults()
    for task in tasks:
        res.metrics[task] = _task_metrics(out.get("results", {}).get(task) or {})
        samples = _one_filter(out.get("samples", {}).get(task, []))
        res.correct[task] = [_correct(s) for s in samples]
        res.choice[task] = [_choice(s) for s in samples]
        if (out.get("configs", {}).get(task) or {}).get("output_type") == "multiple_choice":
            res.loglik[task] = [_logliks(s) for s in samples]
    return res


def _task_metrics(results: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """lm-eval's ``metric,filter`` results as ``{measure: (value, stderr)}``; the filter named where needed."""
    keys = [k for k, v in results.items() if "," in k and "stderr" not in k and isinstance(v, int | float)]
    filters = Counter(k.split(",", 1)[0] for k in keys)
    metrics: dict[str, tuple[float, float | None]] = {}
    for key in keys:
        metric, filt = key.split(",", 1)
        err = results.get(f"{metric}_stderr,{filt}")
        name = metric if filters[metric] == 1 else f"{metric}.{filt}"
        stderr = float(err) if isinstance(err, int | float) and math.isfinite(err) else None
        metrics[name] = (float(results[key]), stderr)
    return metrics


def _one_filter(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples of one filter (the first lm-eval logged; a task with several logs each item once per filter)."""
    if not samples:
        return []
    first = samples[0].get("filter")
    return sorted((s for s in samples if s.get("filter") == first), key=lambda s: s["doc_id"])


def _results_to_json(r: TaskResults) -> dict[str, Any]:
    return {"metrics": {t: {m: list(v) for m, v in ms.items()} for t, ms in r.metrics.items()},
            "correct": r.correct, "choice": r.choice, "loglik": r.loglik}


def _results_from_json(d: dict[str, Any]) -> TaskResults:
    metrics = {t: {m: (float(v[0]), v[1]) for m, v in ms.items()} for t, ms in d["metrics"].items()}
    return TaskResults(metrics, d["correct"], d["choice"], d.get("loglik", {}))


class FPTaskCache:
    """The FP model's task results on disk (for paired measures), keyed by model, settings and few-shot count.

    Attributes:
        computed: How many results (one per few-shot count) this cache computed (the rest were read from disk).

    """

    def __init__(self, root: Path | None = None) -> None:
        """Use ``root`` (default ``$PTQLAB_CACHE/lm_eval`` or ~/.cache/ptqlab/lm_eval)."""
        self.root = root or cache_root() / "lm_eval"
        self.computed = 0

    def get(self, model: nn.Module, tokenizer: Any, fingerprint: str | None, dtype: str, tasks: Sequence[str],
            **settings: Any) -> TaskResults:
        """FP results of ``tasks`` at ``settings["num_fewshot"]`` (see :meth:`get_shots`)."""
        shots = settings.pop("num_fewshot", None)
        return self.get_shots(model, tokenizer, fingerprint, dtype, tasks, [shots], **settings)[shots]

    def get_shots(self, model: nn.Module, tokenizer: Any, fingerprint: str | None, dtype: str, tasks: Sequence[str],
                  shots: Sequence[int | None], **settings: Any) -> ShotResults:
        """FP results of ``tasks`` at each few-shot count: from disk, or computed now, before quantizing.

        The counts missing on disk are computed in one lm-eval session and written when the model has a
        fingerprint.
        """
        paths = {k: entry(self.root, ".json", model, fingerprint, dtype=dtype, tasks=sorted(tasks),
                          num_fewshot=str(k), **{n: str(v) for n, v in settings.items()}) for k in shots}
        missing = [k for k, p in paths.items() if p is None or not p.is_file()]
        fresh = run_shots(model, tokenizer, tasks, missing, **settings) if missing else {}

        def save(res: TaskResults, path: Path) -> None:
            path.write_text(json.dumps(_results_to_json(res)))

        out: ShotResults = {}
        for k, path in paths.items():
            out[k], computed = load_or_compute(path, lambda p: _results_from_json(json.loads(p.read_text())),
                                               partial(fresh.__getitem__, k), save)
            self.computed += computed
        return out
