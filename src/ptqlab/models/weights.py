"""Read and write a linear's weight as (out_features, in_features), whatever its storage layout.

``nn.Linear`` stores (out, in); transformers' ``Conv1D`` (GPT-2) stores (in, out); an expert of a fused
mixture-of-experts block (:class:`~ptqlab.models.experts.ExpertLinear`) is the (out, in) slice of a 3-D
parameter. Every method in ptqlab works on the (out, in) matrix through these functions.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ptqlab.models.experts import ExpertLinear


def _check_supported(module: nn.Module) -> None:
    """Raise TypeError unless ``module`` is an ``nn.Linear``, a ``Conv1D``, an ``ExpertLinear`` or an embedding.

    An ``nn.Embedding``'s (tokens, width) table is a weight of the same layout: a row per token, ranges along
    the width (``scheme.embedding``).
    """
    if not isinstance(module, (nn.Linear, Conv1D, ExpertLinear, nn.Embedding)):
        raise TypeError(f"expected nn.Linear, transformers Conv1D or an expert's linear, got {type(module).__name__}")


def stored_transposed(module: nn.Module) -> bool:
    """Whether the linear stores its weight as (in, out) (``Conv1D``) rather than (out, in)."""
    _check_supported(module)
    return isinstance(module, Conv1D)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """Return the weight of a linear as an (out_features, in_features) tensor.

    For ``Conv1D`` this is a transposed view of the stored (in, out) parameter: it shares storage, so
    use :func:`set_weight_matrix` to write.

    Args:
        module: An ``nn.Linear``, ``transformers.pytorch_utils.Conv1D`` or ``ExpertLinear``.

    Returns:
        The weight, shape (out_features, in_features).

    """
    if isinstance(module, ExpertLinear):
        return module.weight
    weight = module.get_parameter("weight")
    return weight.t() if stored_transposed(module) else weight


def weight_parameter(module: nn.Module) -> nn.Parameter:
    """The parameter that stores a linear's weight: its own, or the fused one an expert's weight is a slice of."""
    _check_supported(module)
    if isinstance(module, ExpertLinear):
        return module.fused
    return module.get_parameter("weight")


@torch.no_grad()
def set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Write an (out_features, in_features) matrix into a linear's weight, in place.

    The values are cast to the parameter's dtype and device; the parameter object is kept.

    Args:
        module: An ``nn.Linear``, ``transformers.pytorch_utils.Conv1D`` or ``ExpertLinear``.
        w: The new weight, shape (out_features, in_features).

    Raises:
        ValueError: ``w`` has the wrong shape.

    """
    expected = (out_features(module), in_features(module))
    if tuple(w.shape) != expected:
        raise ValueError(f"weight of shape {tuple(w.shape)} given for a linear of shape {expected} (out, in)")
    if isinstance(module, ExpertLinear):
        module.weight.copy_(w)  # the expert's slice of the fused parameter
        return
    stored = w.t() if stored_transposed(module) else w
    module.get_parameter("weight").copy_(stored)


def in_features(module: nn.Module) -> int:
    """Return the input width of an ``nn.Linear``, ``Conv1D`` or ``ExpertLinear``."""
    return int(weight_matrix(module).shape[1])


def out_features(module: nn.Module) -> int:
    """Return the output width of an ``nn.Linear``, ``Conv1D`` or ``ExpertLinear``."""
    return int(weight_matrix(module).shape[0])


def input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The model's input embedding module (``get_input_embeddings``), or None when it has none."""
    getter = getattr(model, "get_input_embeddings", None)
    module = getter() if callable(getter) else None
    return module if isinstance(module, nn.Embedding) else None

