"""Read and write a linear's weight as (out_features, in_features), whatever its storage layout.

``nn.Linear`` stores (out, in); transformers' ``Conv1D`` (GPT-2) stores (in, out). Every method in ptqlab
works on the (out, in) matrix through these functions.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def _check_supported(module: nn.Module) -> None:
    """Raise TypeError unless ``module`` is an ``nn.Linear`` or a ``Conv1D``."""
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def stored_transposed(module: nn.Module) -> bool:
    """Whether the linear stores its weight as (in, out) (``Conv1D``) rather than (out, in)."""
    _check_supported(module)
    return isinstance(module, Conv1D)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """Return the weight of a linear as an (out_features, in_features) tensor.

    For ``Conv1D`` this is a transposed view of the stored (in, out) parameter: it shares storage, so
    use :func:`set_weight_matrix` to write.

    Args:
        module: An ``nn.Linear`` or ``transformers.pytorch_utils.Conv1D``.

    Returns:
        The weight, shape (out_features, in_features).

    """
    weight = module.get_parameter("weight")
    return weight.t() if stored_transposed(module) else weight


@torch.no_grad()
def set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Write an (out_features, in_features) matrix into a linear's weight, in place.

    The values are cast to the parameter's dtype and device; the parameter object is kept.

    Args:
        module: An ``nn.Linear`` or ``transformers.pytorch_utils.Conv1D``.
        w: The new weight, shape (out_features, in_features).

    Raises:
        ValueError: ``w`` has the wrong shape.

    """
    expected = (out_features(module), in_features(module))
    if tuple(w.shape) != expected:
        raise ValueError(f"weight of shape {tuple(w.shape)} given for a linear of shape {expected} (out, in)")
    stored = w.t() if stored_transposed(module) else w
    module.get_parameter("weight").copy_(stored)


def in_features(module: nn.Module) -> int:
    """Return the input width of an ``nn.Linear`` or ``Conv1D``."""
    return int(weight_matrix(module).shape[1])


def out_features(module: nn.Module) -> int:
    """Return the output width of an ``nn.Linear`` or ``Conv1D``."""
    return int(weight_matrix(module).shape[0])
