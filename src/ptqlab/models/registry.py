"""Find the family adapter of a model: by class name, then by ``config.model_type``, then by config."""

from __future__ import annotations

from typing import Any

from torch import nn

from ptqlab.errors import UnsupportedModelError
from ptqlab.models.adapter import Adapter
from ptqlab.models.experts import bind_experts
from ptqlab.models.families import ADAPTERS


def supported_classes() -> list[str]:
    """Return the model class names that have an adapter, sorted and without repeats."""
    return sorted({cls for adapter in ADAPTERS for cls in adapter.classes})


def _config_matches(adapter: Adapter, config: Any) -> bool:
    """Whether ``config`` satisfies every condition of ``adapter.when``."""
    return all(getattr(config, attr, None) in allowed for attr, allowed in adapter.when)


def _describe_conditions(adapter: Adapter) -> str:
    """Human-readable form of an adapter's config conditions."""
    parts = [f"{attr} in {list(allowed)}" for attr, allowed in adapter.when]
    return f"{adapter.extra.get('variant', adapter.family)} ({', '.join(parts) or 'any config'})"


def _candidates(class_name: str, model_type: str | None) -> list[Adapter]:
    """Adapters serving the class, or failing that, the model type."""
    by_class = [a for a in ADAPTERS if class_name in a.classes]
    if by_class:
        return by_class
    if model_type is None:
        return []
    return [a for a in ADAPTERS if model_type in a.model_types]


def get_adapter(model: nn.Module) -> Adapter:
    """Return the adapter describing ``model``'s decoder layers.

    The class name (``type(model).__name__``) is tried first, then ``model.config.model_type``. When a
    class has several layouts (OPT, Falcon), the adapter whose ``when`` conditions the config meets wins.
    For a family with fused experts (Mixtral, Qwen3-MoE) the adapter returned lists every expert's
    matrices, and each expert of ``model`` is exposed as linears of its own (see
    :mod:`ptqlab.models.experts`: the parameters, state dict and function stay the same).

    Args:
        model: A causal LM, e.g. ``LlamaForCausalLM``.

    Returns:
        The matching adapter.

    Raises:
        UnsupportedModelError: No adapter serves the class or model type, none fits its config, or its
            experts are not stored as its family's are.

    """
    class_name = type(model).__name__
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    candidates = _candidates(class_name, model_type)
    if not candidates:
        raise UnsupportedModelError(
            f"no family adapter for model class {class_name} (model_type={model_type!r}); "
            f"supported classes: {', '.join(supported_classes())}"
        )
    for adapter in candidates:
        if _config_matches(adapter, config):
            return bind_experts(model, adapter)
    variants = "; ".join(_describe_conditions(a) for a in candidates)
    raise UnsupportedModelError(
        f"model class {class_name} is supported, but not with this configuration; supported variants: {variants}"
    )
