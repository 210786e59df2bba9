"""What every export format shares: the online-rotation check, and writing the model's own files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..pipeline.plan import QuantizationPlan


def refuse_online_rotation(plan: QuantizationPlan, runtime: str) -> None:
    """A rotation that rotates an input online is a forward hook ``runtime`` does not run.

    Raises:
        ConfigError: The recipe has such a rotation.

    """
    for transform in plan.recipe.model_transforms:
        if getattr(getattr(transform, "config", None), "online_down", False):
            raise ConfigError(f"recipe rotation with online_down: true rotates down_proj's input in a forward "
                              f"hook that {runtime} does not run; set online_down: false to export")


def save_checkpoint(model: nn.Module, tokenizer: Any, out: Path,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Create ``out`` and write ``model`` (by transformers) and its tokenizer there.

    ``state_dict``, when given, is written in place of the model's own tensors (a compressed layout).

    Raises:
        ConfigError: ``model`` is not a transformers model.

    """
    save = getattr(model, "save_pretrained", None)
    if not callable(save):
        raise ConfigError(f"{type(model).__name__} is not a transformers model: it has no save_pretrained")
    out.mkdir(parents=True)
    if state_dict is None:
        save(out)
    else:
        save(out, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
