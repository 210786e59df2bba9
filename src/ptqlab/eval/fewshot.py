"""Few-shot counts of lm-eval tasks: how a metric name says its count, and the pool each count draws from.

A task puts ``k`` examples in front of each item, drawn from its few-shot documents: its ``fewshot_split``
(gsm8k: ``train``), its ``fewshot_config.samples``, else its training, validation or test documents, as
lm-eval picks them. When the few-shot split is the split being evaluated, lm-eval leaves the item itself
out, so the pool is one smaller. A count past the pool fails inside lm-eval after the model work has
begun; :func:`check_pool` makes it an error before. A task whose definition sets ``num_fewshot: 0``
(truthfulqa: its prompt carries its own fixed examples) is run 0-shot by lm-eval whatever the count.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import ConfigError
from ..metrics import FEWSHOT_SUFFIX

log = logging.getLogger(__name__)


def shot_measure(measure: str, shots: int | None) -> str:
    """``<measure>.fewshot<k>``: a measure at one point of a few-shot curve (``shots`` None: the measure)."""
    return measure if shots is None else f"{measure}{FEWSHOT_SUFFIX}{shots}"


def fewshot_pool(task: Any) -> int:
    """How many few-shot examples an lm-eval task can draw for one item (0 when it has none)."""
    sampler = getattr(task, "sampler", None)
    if sampler is None:
        return 0
    docs = len(sampler.fewshot_docs())
    split = getattr(getattr(task, "fewshot_cfg", None), "split", None)
    same = split is not None and split == getattr(task.config, "test_split", None)
    return max(docs - 1, 0) if same else docs


def check_pool(task: Any, shots: int) -> None:
    """Fail when ``shots`` examples per item exceed the few-shot pool of an lm-eval task.

    Raises:
        ConfigError: Naming the task, the count and the pool's size.

    """
    name = getattr(task.config, "task", None) or type(task).__name__
    if getattr(task.config, "num_fewshot", None) == 0:
        log.warning("task %s fixes its few-shot count at 0 (lm-eval ignores evaluate.num_fewshot for it): "
                    "every count evaluates it 0-shot", name)
        return
    pool = fewshot_pool(task)
    if shots > pool:
        raise ConfigError(f"evaluate.num_fewshot: {shots} examples per item for task {name!r}, but its pool of "
                          f"few-shot examples holds {pool}")
