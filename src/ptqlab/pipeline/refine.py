"""ZeroQuant-Local / -Global inside the layer loop, and the compensators that run after them."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..methods.base import WeightResult, divide_rows
from ..models.weights import set_weight_matrix, weight_matrix
from ..quant.spec import QuantSpec
from .capture import LayerCall, layer_output
from .distill import Trainable, distill_layer, distill_model, fp_copy

log = logging.getLogger(__name__)


class Refinement:
    """What a recipe with ZeroQuant steps needs around the layer loop.

    Args:
        model: The model, before any weight changes (ZeroQuant-Global copies it as its teacher).
        recipe: The recipe (``local_refiner``, ``global_refiner``, ``compensate``).

    """

    def __init__(self, model: nn.Module, recipe: Any) -> None:
        self.recipe = recipe
        self.local = getattr(recipe, "local_refiner", None)
        self.global_ = getattr(recipe, "global_refiner", None)
        self.teacher = fp_copy(model) if self.global_ is not None else None
        self.kept: list[Trainable] = []
        self.losses: list[dict[str, float]] = []
        self._inputs: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    @property
    def active(self) -> bool:
        """Whether the recipe has a ZeroQuant step."""
        return self.local is not None or self.global_ is not None

    def before_layer(self, layer: nn.Module, hidden: list[torch.Tensor | None], calls: list[LayerCall]) -> None:
        """Keep the layer's inputs and its FP outputs on them (ZeroQuant-Local's targets)."""
        if self.local is None:
            return
        self._inputs = [h.clone() for h in hidden if h is not None]
        self._targets = _run(layer, self._inputs, calls)

    def keep(self, module: nn.Module, W: torch.Tensor, result: WeightResult, spec: QuantSpec) -> None:
        """Remember a quantized linear: its weight before quantization and the quantizer's result."""
        if self.active:
            self.kept.append(Trainable(module, result, spec, W.detach().float().clone()))

    def rows_divided(self, module: nn.Module, rows: torch.Tensor, s: torch.Tensor) -> None:
        """A transform divided ``rows`` of ``module`` by ``s`` after it was kept: divide what was kept too."""
        for t in self.kept:
            if t.module is module:
                t.result = t.result.divide_rows(rows, s)
                if t.original is not None:
                    t.original = divide_rows(t.original, rows, s)

    def after_layer(
        self, layer: nn.Module, li: int, calls: list[LayerCall], outputs: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Distil the layer (local), then return its outputs on the kept inputs for the next layer."""
        if self.local is None:
            return outputs
        mine = [k for k in self.kept if any(k.module is m for m in layer.modules())]
        start, best = distill_layer(layer, mine, self._inputs, calls, self._targets, self.local.config)
        self.losses.append({"layer": float(li), "start": start, "best": best})
        log.info("zeroquant_local layer %d: output MSE %.3g -> %.3g", li, start, best)
        if self.global_ is None:
            self._compensate(mine)
        outs = _run(layer, self._inputs, calls)
        self._inputs, self._targets = [], []
        return outs

    def after_loop(self, model: nn.Module, calibration: torch.Tensor, batch_size: int) -> None:
        """Distil the whole model (global), then apply the compensators still pending."""
        if self.global_ is not None and self.teacher is not None:
            start, best = distill_model(model, self.teacher, self.kept, calibration, batch_size, self.global_.config)
            self.losses.append({"layer": -1.0, "start": start, "best": best})
            log.info("zeroquant_global: KL %.3g -> %.3g", start, best)
            self.teacher = None
        if self.local is None or self.global_ is not None:
            self._compensate(self.kept)
        self.kept = []

    def _compensate(self, kept: list[Trainable]) -> None:
        if not getattr(self.recipe, "compensators", None):
            return
        for t in kept:
            r = t.result
            now = WeightResult(weight_matrix(t.module).detach().float(), r.codes, r.qparams, r.g_idx)
            set_weight_matrix(t.module, self.recipe.compensate(t.original, now).weight)


def _run(layer: nn.Module, inputs: list[torch.Tensor], calls: list[LayerCall]) -> list[torch.Tensor]:
    """The layer's outputs on each chunk."""
    with torch.inference_mode():
        return [layer_output(layer(x, *c.args, **c.kwargs)) for x, c in zip(inputs, calls, strict=True)]
