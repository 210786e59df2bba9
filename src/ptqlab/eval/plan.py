"""The evaluation plan: an ``evaluate`` section checked and its token windows prepared, before any work."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..data.corpora import CORPORA, eval_windows
from ..errors import ConfigError
from ..schema import Evaluate
from .dialogue import check_dialogue_source
from .judge import judge_of
from .retrieval import make_sample, model_max_length, too_long
from .tasks import check_tasks


@dataclass(frozen=True)
class EvalPlan:
    """What an evaluation runs, with its tokens.

    Attributes:
        config: The ``evaluate`` section.
        windows: Perplexity windows (windows, seqlen) per corpus, in the order of ``config.perplexity``.
        divergence: The windows KL and top-k agreement are measured on, or None.
        sensitivity: The windows per-module deviations are measured on, or None.

    """

    config: Evaluate
    windows: dict[str, torch.Tensor] = field(default_factory=dict)
    divergence: torch.Tensor | None = None
    sensitivity: torch.Tensor | None = None

    @property
    def task_settings(self) -> dict[str, Any]:
        """The lm-eval settings of the tasks but the few-shot counts (limit, batch size, seed, task directory)."""
        ev = self.config
        return {"limit": ev.limit, "batch_size": ev.batch_size, "seed": ev.seed, "tasks_dir": ev.tasks_dir}

    @property
    def shots(self) -> list[int | None]:
        """The few-shot counts the tasks run at (None: each task's own default)."""
        return self.config.shot_counts()

    def shot_label(self, shots: int | None) -> int | None:
        """The count a metric name says for results at ``shots``: the count on a few-shot curve, else None."""
        return shots if self.config.fewshot_curve else None

    def without_sensitivity(self) -> EvalPlan:
        """The same plan without the per-module sensitivity."""
        return replace(self, config=self.config.model_copy(update={"sensitivity": None}), sensitivity=None)


def check_evaluate(config: Evaluate) -> None:
    """Check what can be checked without a model: corpora, tasks, their extras and few-shot pools.

    Corpora and lm-eval task names must be known, a task directory must parse, a task's extra packages
    must be installed, and a few-shot count must fit each task's pool of examples (where its data can be
    had).

    Raises:
        ConfigError: Naming the field and the known values.

    """
    known = ", ".join(sorted(CORPORA))
    for k, name in enumerate(config.perplexity):
        if name not in CORPORA:
            raise ConfigError(f"evaluate.perplexity[{k}]={name!r} is unknown; known: {known}")
    div = config.divergence_config()
    if div is not None and div.corpus not in CORPORA:
        raise ConfigError(f"evaluate.divergence.corpus={div.corpus!r} is unknown; known: {known}")
    sens = config.sensitivity
    if sens is not None and sens.corpus not in CORPORA:
        raise ConfigError(f"evaluate.sensitivity.corpus={sens.corpus!r} is unknown; known: {known}")
    if config.tasks or config.tasks_dir:
        check_tasks(config.tasks, config.tasks_dir, config.shot_counts())
    if config.dialogue is not None:
        check_dialogue_source(config.dialogue.path)
    if config.judge is not None:
        judge_of(config).check()  # a URL that does not answer fails here, within seconds


def plan_evaluation(config: Evaluate, tokenizer: Any, model: nn.Module | None = None) -> EvalPlan:
    """Tokenize every corpus the evaluation reads and check it against the model, before any work.

    Args:
        config: The ``evaluate`` section (checked with :func:`check_evaluate` first).
        tokenizer: The model's tokenizer.
        model: The model, to check long-context lengths against its context.

    Returns:
        The plan.

    Raises:
        ConfigError: A length past the model's context or too short for the records.
        DataError: A corpus too short for one window.

    """
    if model is not None:
        _check_long_context(config, model, tokenizer)
    windows = {c: eval_windows(c, tokenizer, config.seqlen, config.max_windows).input_ids for c in config.perplexity}
    div = config.divergence_config()
    sens = config.sensitivity
    return EvalPlan(
        config,
        windows,
        None if div is None else eval_windows(div.corpus, tokenizer, div.seqlen, div.windows).input_ids,
        None if sens is None else eval_windows(sens.corpus, tokenizer, sens.seqlen, sens.windows).input_ids,
    )


def _check_long_context(config: Evaluate, model: nn.Module, tokenizer: Any) -> None:
    """Lengths past the model's context, or too short for the records, are an error before any work."""
    lc = config.long_context
    if lc is None:
        return
    bad = too_long(model, lc.lengths)
    if bad:
        raise ConfigError(f"evaluate.long_context.lengths {bad} exceed the model's context of "
                          f"{model_max_length(model)} tokens")
    try:
        make_sample(tokenizer, min(lc.lengths), lc.seed, 0, lc.pairs)
    except ValueError as exc:
        raise ConfigError(f"evaluate.long_context: {exc}") from None
