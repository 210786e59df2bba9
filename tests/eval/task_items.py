"""Helpers of the task tests: a small multiple-choice task they write as jsonl (question, two choices, the
right one), and :func:`run_tasks`, lm-eval tasks at one few-shot count."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ptqlab.eval.tasks import TaskResults, run_shots

ITEMS = [
    {"q": "The sky is", "choices": ["blue", "a cat"], "label": 0},
    {"q": "Water is", "choices": ["dry", "wet"], "label": 1},
    {"q": "Fire is", "choices": ["hot", "cold"], "label": 0},
    {"q": "Once upon a", "choices": ["time", "table"], "label": 0},
    {"q": "The girl was very", "choices": ["happy", "purple"], "label": 0},
    {"q": "Lily went to the", "choices": ["park", "seventeen"], "label": 0},
]


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
) -> TaskResults:
    """Run lm-eval tasks on ``model`` as it is in memory at one few-shot count (``run_shots`` with one count)."""
    return run_shots(model, tokenizer, tasks, [num_fewshot], limit=limit, batch_size=batch_size, seed=seed,
                     tasks_dir=tasks_dir)[num_fewshot]
