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
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from torch import nn

from ..errors import ConfigError
from ..paths import cache_root
from .cache import entry, load_or_compute

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


class _AnyTagLoader(yaml.SafeLoader):
    """A safe loader that accepts lm-eval's custom tags (``!function``) as plain values."""


def _any_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_mapping(node)  # type: ignore[arg-type]


_AnyTagLoader.add_multi_constructor("!", _any_tag)


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
            doc = yaml.load(path.read_text(), Loader=_AnyTagLoader)  # noqa: S506 - a SafeLoader subclass
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
def task_manager(tasks_dir: str | Path | None = None) -> Iterator[Any]:
    """An lm-eval TaskManager that knows the vendored tasks (and a user's directory)."""
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="ptqlab-tasks-") as tmp:
        for task in LOCAL_TASKS:
            (Path(tmp) / f"{task}.yaml").write_text(yaml.safe_dump(local_task_yaml(task), sort_keys=False))
        paths = [tmp] + ([str(tasks_dir)] if tasks_dir else [])
        yield TaskManager(include_path=paths)


def check_tasks(tasks: Sequence[str], tasks_dir: str | Path | None = None) -> None:
    """Fail before any work on an unknown task name (with close matches) or a broken task directory."""
    user = parse_task_dir(tasks_dir) if tasks_dir else {}
    unknown = [t for t in tasks if t not in LOCAL_TASKS and t not in user]
    if not unknown:
        return
    with task_manager(tasks_dir) as tm:
        names = list(tm.all_tasks)
    for t in unknown:
        if t not in names:
            close = difflib.get_close_matches(t, names, n=5)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise ConfigError(f"evaluate.tasks: unknown lm-eval task {t!r}{hint}")


def count_items(
    tasks: Sequence[str], limit: int | None = None, tasks_dir: str | Path | None = None
) -> dict[str, int | None]:
    """How many items each task evaluates (its evaluation documents, at most ``limit``).

    The task's data is read as lm-eval would read it; a task whose data cannot be had here (a hub data set
    offline) counts as ``limit`` per task, or None when there is no limit.
    """
    from lm_eval.tasks import get_task_dict

    counts: dict[str, int | None] = {}
    with task_manager(tasks_dir) as tm:
        for name in tasks:
            try:
                sizes = [len(list(t.eval_docs)) for t in _leaf_tasks(get_task_dict([name], tm))]
                counts[name] = sum(min(n, limit) if limit else n for n in sizes)
            except Exception as exc:  # noqa: BLE001 - data that cannot be had is counted as unknown
                log.debug("items of %s not counted: %s", name, exc)
                counts[name] = limit
    return counts


def _leaf_tasks(tree: Any) -> list[Any]:
    """The tasks of a (nested) lm-eval task dict, groups opened."""
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in _leaf_tasks(value)]
    return [tree]


@dataclass
class TaskResults:
    """lm-eval metrics per task (``{task: {metric: (value, stderr)}}``), each item's correctness and choice."""

    metrics: dict[str, dict[str, tuple[float, float | None]]] = field(default_factory=dict)
    correct: dict[str, list[float]] = field(default_factory=dict)
    choice: dict[str, list[int]] = field(default_factory=dict)


def _choice(sample: dict[str, Any]) -> int:
    """The answer the model picked: the most likely choice, or 1/0 for a greedy (loglikelihood) match."""
    resps = sample.get("filtered_resps") or []
    if len(resps) > 1:
        return max(range(len(resps)), key=lambda i: float(resps[i][0]))
    if resps and isinstance(resps[0], list | tuple) and len(resps[0]) > 1:
        return int(bool(resps[0][1]))
    return -1


def paired(fp: TaskResults, q: TaskResults, task: str) -> dict[str, float]:
    """Agreement with FP's choice and correct answers lost / gained, over the items both answered."""
    n = min(len(fp.choice.get(task, [])), len(q.choice.get(task, [])))
    if n == 0:
        return {}
    agree = sum(fp.choice[task][i] == q.choice[task][i] for i in range(n)) / n
    lost = sum(fp.correct[task][i] == 1 and q.correct[task][i] == 0 for i in range(n)) / n
    gained = sum(fp.correct[task][i] == 0 and q.correct[task][i] == 1 for i in range(n)) / n
    return {"agree_fp": agree, "lost": lost, "gained": gained}


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    seed: int = 0,
    tasks_dir: str | Path | None = None,
    scorer: Scorer | None = None,
) -> TaskResults:
    """Run lm-eval tasks on ``model`` as it is in memory.

    ``batch_size`` is the number of requests per forward when a request is run whole, and the number of
    distinct contexts per forward when contexts are shared (their choices then run in one more forward).
    ``scorer`` replaces how tokenized loglikelihood requests are scored (a streamed model's layer-major
    scorer, :class:`ptqlab.eval.streamed.StreamedScorer`); by default :func:`ptqlab.eval.lm.score_requests`.

    Returns:
        Metrics with their standard errors, and each item's ``acc`` (for paired comparisons).

    """
    from lm_eval import simple_evaluate

    from .lm import PtqlabLM, score_requests

    check_tasks(tasks, tasks_dir)
    lm = PtqlabLM(model, tokenizer, batch_size=batch_size, scorer=scorer or score_requests)
    with task_manager(tasks_dir) as tm:
        out = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                              task_manager=tm, log_samples=True, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=1000)
    return _collect(out, tasks)


def _collect(out: dict[str, Any], tasks: Sequence[str]) -> TaskResults:
    res = TaskResults()
    for task in tasks:
        metrics: dict[str, tuple[float, float | None]] = {}
        for key, value in (out.get("results", {}).get(task) or {}).items():
            if "," not in key or "stderr" in key or not isinstance(value, int | float):
                continue
            name = key.split(",")[0]
            err = out["results"][task].get(f"{name}_stderr,{key.split(',', 1)[1]}")
            metrics[name] = (float(value), float(err) if isinstance(err, int | float) and math.isfinite(err) else None)
        res.metrics[task] = metrics
        samples = sorted(out.get("samples", {}).get(task, []), key=lambda s: s["doc_id"])
        res.correct[task] = [float(s.get("acc", math.nan)) for s in samples]
        res.choice[task] = [_choice(s) for s in samples]
    return res


def _results_to_json(r: TaskResults) -> dict[str, Any]:
    return {"metrics": {t: {m: list(v) for m, v in ms.items()} for t, ms in r.metrics.items()},
            "correct": r.correct, "choice": r.choice}


def _results_from_json(d: dict[str, Any]) -> TaskResults:
    metrics = {t: {m: (float(v[0]), v[1]) for m, v in ms.items()} for t, ms in d["metrics"].items()}
    return TaskResults(metrics, d["correct"], d["choice"])


class FPTaskCache:
    """The FP model's task results on disk (for paired measures), keyed by model and settings.

    Attributes:
        computed: How many results this cache computed (the rest were read from disk).

    """

    def __init__(self, root: Path | None = None) -> None:
        """Use ``root`` (default ``$PTQLAB_CACHE/lm_eval`` or ~/.cache/ptqlab/lm_eval)."""
        self.root = root or cache_root() / "lm_eval"
        self.computed = 0

    def get(self, model: nn.Module, tokenizer: Any, fingerprint: str | None, dtype: str, tasks: Sequence[str],
            **settings: Any) -> TaskResults:
        """FP results of ``tasks``: from disk, or computed now, before quantizing (and written, with a fingerprint)."""
        path = entry(self.root, ".json", model, fingerprint, dtype=dtype, tasks=sorted(tasks),
                     **{k: str(v) for k, v in settings.items()})

        def save(res: TaskResults, path: Path) -> None:
            path.write_text(json.dumps(_results_to_json(res)))

        res, computed = load_or_compute(
            path, lambda p: _results_from_json(json.loads(p.read_text())),
            lambda: run_tasks(model, tokenizer, tasks, **settings), save,
        )
        self.computed += computed
        return res
