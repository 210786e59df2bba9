"""What every export format shares: the refusals, the recipe checks, and writing the model's own files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..pipeline.plan import QuantizationPlan


def refuse_runtime_quantizers(plan: QuantizationPlan, holder: str, activation_hint: str, kv_hint: str) -> None:
    """Refuse the quantizers that run at inference time, which a file of weights (``holder``) cannot hold.

    Args:
        plan: The run's quantization plan.
        holder: What would have to hold them (``a plain HF checkpoint``).
        activation_hint: What to do about ``scheme.activation`` (or attention inputs).
        kv_hint: What to do about ``scheme.kv_cache``.

    Raises:
        ConfigError: Activation or attention-input quantization, or KV-cache quantization.

    """
    if plan.activations or plan.attention is not None:
        raise ConfigError(f"scheme.activation quantizes activations at run time, which {holder} cannot hold; "
                          f"{activation_hint}")
    if plan.kv is not None:
        raise ConfigError(f"scheme.kv_cache quantizes the KV cache at run time, which {holder} cannot hold; "
                          f"{kv_hint}")


def refuse_runtime_ops(plan: QuantizationPlan, runtime: str) -> None:
    """Refuse ops a checkpoint cannot carry: an online rotation (a forward hook) or an explicit scale op.

    SmoothQuant and AWQ on a family whose scale cannot fold into a norm or a linear (the input of fc2 after
    a GELU) insert a module that divides the activation per channel; ``runtime`` builds the model from its
    own classes and would drop it.

    Raises:
        ConfigError: The recipe has such a rotation or scale op.

    """
    for transform in plan.recipe.model_transforms:
        if transform.runtime_hooks:
            raise ConfigError(f"recipe rotation with online_down: true rotates down_proj's input in a forward "
                              f"hook that {runtime} does not run; set online_down: false to export")
    if plan.recipe.layer_transforms and any(g.fold == "scale" for g in plan.adapter.groups):
        names = ", ".join(type(t).__name__ for t in plan.recipe.layer_transforms)
        raise ConfigError(f"recipe {names} on family {plan.adapter.family} inserts an explicit scale op after the "
                          f"activation function (no norm or linear can absorb the scale there), which {runtime} "
                          "does not run; export a recipe without it")


def refuse_off_grid_recipe(plan: QuantizationPlan, fmt: str, runtime: str) -> None:
    """Refuse recipes whose weights a packed format cannot hold as codes and block scales.

    Raises:
        ConfigError: An online rotation (a hook ``runtime`` does not run), GPTQ act-order (a column order of
            groups), or LoRC (low-rank factors beside the codes).

    """
    refuse_runtime_ops(plan, runtime)
    if plan.outliers is not None:
        raise ConfigError(f"scheme.outliers keeps input columns in FP16 beside the codes, and {fmt} has no place "
                          "for them; use --format hf for the weights, or drop the outliers section")
    if plan.recipe.quantizer.permutes_columns:
        raise ConfigError(f"gptq act_order: true gives each column its own group order, and {fmt} has no group "
                          "index (g_idx); export a run with act_order: false")
    if plan.recipe.compensators:
        names = ", ".join(type(c).__name__ for c in plan.recipe.compensators)
        raise ConfigError(f"recipe {names} adds low-rank factors to the quantized weights, and {fmt} has no place "
                          "for them; use --format hf, which folds them into the weights, or drop them")


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
