"""Transforms inside the layer pass: per-channel statistics at each group, scales folded at its barrier."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..models.adapter import Adapter
from ..models.weights import weight_matrix
from .fold import can_fold, fold_group_scale, slots, tie

log = logging.getLogger(__name__)


class ScaleTransform(Protocol):
    """A method that picks per-input-channel scales from activation and weight ranges (SmoothQuant)."""

    def scales(self, act_absmax: torch.Tensor, weight_absmax: torch.Tensor) -> torch.Tensor:
        """Scales per slot from per-slot activation and weight absolute maxima."""
        ...


class LayerTransforms:
    """Collects max|x| per input channel of each foldable group and folds the recipe's scales into it."""

    def __init__(self, config: Any, adapter: Adapter, layer: nn.Module, transforms: Sequence[ScaleTransform]):
        """Prepare for one decoder layer."""
        self.config, self.adapter, self.layer = config, adapter, layer
        self.transforms = list(transforms)
        self.absmax: dict[int, torch.Tensor] = {}
        self.skipped: list[str] = []

    @property
    def active(self) -> bool:
        """Whether the recipe has transforms."""
        return bool(self.transforms)

    def observe(self, gi: int, x: torch.Tensor) -> None:
        """Record the per-channel absolute maximum of a chunk's input to group ``gi``."""
        if not self.transforms or not can_fold(self.adapter.groups[gi]):
            return
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        prev = self.absmax.get(gi)
        self.absmax[gi] = m if prev is None else torch.maximum(prev, m)

    def apply(self, gi: int) -> torch.Tensor | None:
        """Fold the scales of group ``gi``; return the per-channel divisor of its input, or None."""
        group = self.adapter.groups[gi]
        act = self.absmax.pop(gi, None)
        if act is None:
            if self.transforms and not can_fold(group):
                self.skipped.append(group.name)
            return None
        width = act.shape[0]
        slot = slots(self.config, self.adapter, self.layer, group, width).to(act.device)
        total = torch.ones(width, device=act.device)
        for t in self.transforms:
            w_absmax = torch.stack(
                [weight_matrix(self.layer.get_submodule(rel)).detach().abs().amax(dim=0).float()
                 for rel in group.linears]
            ).amax(dim=0)
            slot_scale = t.scales(tie(act / total, slot), tie(w_absmax.to(act.device), slot))
            total = total * fold_group_scale(self.config, self.adapter, self.layer, group, slot_scale, slot)
        return total


def divide_by(s: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x / s`` in the input's dtype."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x / s.to(x.device, x.dtype)

    return fn


def transform_hessian(H: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Hessian of inputs divided by ``s``: ``diag(1/s) H diag(1/s)``."""
    inv = (1.0 / s).to(H.device, H.dtype)
    return H * inv[:, None] * inv[None, :]
