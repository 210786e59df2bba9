"""Layer transforms inside the layer pass: per-channel statistics at each group, scales folded at its barrier."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..methods import GroupInputs, LayerTransform
from ..methods.base import scaled_hessian
from ..models.adapter import Adapter
from ..models.weights import weight_matrix
from ..quant.spec import QuantSpec
from .fold import RowsDivided, can_fold, fold_group_scale, slots, tie

log = logging.getLogger(__name__)


class LayerTransforms:
    """Collects |x| statistics per input channel of each foldable group and folds the recipe's scales."""

    def __init__(
        self,
        config: Any,
        adapter: Adapter,
        layer: nn.Module,
        transforms: Sequence[LayerTransform],
        on_rows: RowsDivided | None = None,
    ) -> None:
        """Prepare for one decoder layer; ``on_rows`` is told of rows divided in a linear before a group."""
        self.config, self.adapter, self.layer = config, adapter, layer
        self.on_rows = on_rows
        self.transforms = list(transforms)
        self.absmax: dict[int, torch.Tensor] = {}
        self.abssum: dict[int, torch.Tensor] = {}
        self.count: dict[int, int] = {}
        self.skipped: list[str] = []

    def observe(self, gi: int, x: torch.Tensor) -> None:
        """Record per-channel max and sum of |x| of a chunk's input to group ``gi``."""
        if not self.transforms or not can_fold(self.adapter.groups[gi]):
            return
        a = x.detach().abs().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        m, total = a.amax(dim=0), a.sum(dim=0)
        if gi in self.absmax:
            m, total = torch.maximum(self.absmax[gi], m), self.abssum[gi] + total
        self.absmax[gi], self.abssum[gi] = m, total
        self.count[gi] = self.count.get(gi, 0) + a.shape[0]

    def apply(
        self, gi: int, H: torch.Tensor | None = None, specs: dict[str, QuantSpec] | None = None
    ) -> torch.Tensor | None:
        """Fold the scales of group ``gi``; return the per-channel divisor of its input, or None.

        Args:
            gi: The group.
            H: Hessian of the group's input, when a member is quantized.
            specs: Spec of each quantized member, by relative module name.

        """
        group = self.adapter.groups[gi]
        act = self.absmax.pop(gi, None)
        if act is None:
            if self.transforms and not can_fold(group):
                self.skipped.append(group.name)
            return None
        mean = self.abssum.pop(gi) / max(1, self.count.pop(gi))
        slot = slots(self.config, self.adapter, self.layer, group, act.shape[0]).to(act.device)
        specs = specs or {}
        total = torch.ones_like(act)
        for t in self.transforms:
            mods = {rel: self.layer.get_submodule(rel) for rel in group.linears}
            w_absmax = torch.stack([weight_matrix(m).detach().abs().amax(dim=0).float() for m in mods.values()])
            inputs = GroupInputs(
                act_absmax=tie(act / total, slot),
                act_mean=tie(mean / total, slot, "mean"),
                weight_absmax=tie(w_absmax.amax(dim=0).to(act.device), slot),
                slot=slot,
                weights=[weight_matrix(mods[rel]).detach() for rel in specs],
                specs=list(specs.values()),
                H=None if H is None else scaled_hessian(H, total),
            )
            slot_scale = t.slot_scales(inputs)
            total = total * fold_group_scale(
                self.config, self.adapter, self.layer, group, slot_scale, slot, self.on_rows
            )
        return total


def divide_by(s: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x / s`` in the input's dtype."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x / s.to(x.device, x.dtype)

    return fn
