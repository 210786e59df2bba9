"""The steps after the quantizer, around the layer loop: refiners, then compensators.

A quantized linear is kept (with the weight its quantizer was given) while a later step may still change
it. :func:`compensation_point` is the one place that decides when the compensators run: once nothing
will change the weight any more, i.e. right after the quantizer when the recipe has no refiner, after
each layer's refiners, or after the model refiners at the end of the loop.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal

import torch
from torch import nn

from ..methods import QuantizedLinear, Recipe, Refined, WeightResult
from ..methods.base import divide_rows
from ..metrics import Metric
from ..models.weights import set_weight_matrix, weight_matrix
from ..nn.capture import LayerCall, layer_output
from ..quant.spec import QuantSpec

log = logging.getLogger(__name__)

Point = Literal["quantize", "layer", "model"]


def compensation_point(recipe: Recipe) -> Point:
    """When the compensators run: right after the quantizer, after the layer refiners, or after the loop."""
    if recipe.model_refiners:
        return "model"
    if recipe.layer_refiners:
        return "layer"
    return "quantize"


class LaterSteps:
    """The refiners and compensators of a recipe, run at their points of the layer loop.

    Args:
        model: The model before any weight of the loop changes (a model refiner copies it as its FP teacher).
        recipe: The recipe.

    """

    def __init__(self, model: nn.Module, recipe: Recipe) -> None:
        self.recipe = recipe
        self.point = compensation_point(recipe)
        self.teacher = fp_copy(model) if recipe.model_refiners else None
        self.kept: list[QuantizedLinear] = []
        self._refined: list[tuple[int, int, Refined]] = []  # (refiner index, layer or -1, loss)
        self._inputs: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def quantized(self, module: nn.Module, W: torch.Tensor, result: WeightResult, spec: QuantSpec) -> WeightResult:
        """A linear's quantizer returned ``result``: the value to write now (compensated if it is their point)."""
        if self.point == "quantize":
            return self.recipe.compensate(W, result)
        self.kept.append(QuantizedLinear(module, result, spec, W.detach().float().clone()))
        return result

    def rows_divided(self, module: nn.Module, rows: torch.Tensor, s: torch.Tensor) -> None:
        """A transform divided ``rows`` of an already quantized ``module`` by ``s``: divide what was kept too."""
        for t in self.kept:
            if t.module is module:
                t.result = t.result.divide_rows(rows, s, t.spec)
                t.original = divide_rows(t.original, rows, s)

    def before_layer(self, layer: nn.Module, hidden: list[torch.Tensor | None], calls: list[LayerCall]) -> None:
        """Keep the layer's inputs and its FP outputs on them (the layer refiners' targets)."""
        if self.recipe.layer_refiners:
            self._inputs = [h.clone() for h in hidden if h is not None]
            self._targets = _run(layer, self._inputs, calls)

    def after_layer(
        self, layer: nn.Module, li: int, calls: list[LayerCall], outputs: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Refine the layer, compensate it if that is their point; return its outputs for the next layer."""
        if not self.recipe.layer_refiners:
            return outputs
        inside = {id(m) for m in layer.modules()}
        mine = [k for k in self.kept if id(k.module) in inside]
        if not mine:  # every linear of the layer kept in full precision: nothing to train
            self._inputs, self._targets = [], []
            return outputs
        xs = [_plain(x) for x in self._inputs]
        args = [_plain(c.args) for c in calls]
        kwargs = [_plain(c.kwargs) for c in calls]
        targets = [_plain(y) for y in self._targets]

        def forward(c: int) -> torch.Tensor:
            return layer_output(layer(xs[c], *args[c], **kwargs[c]))

        for k, refiner in enumerate(self.recipe.layer_refiners):
            loss = refiner.refine_layer(layer, mine, forward, targets)
            self._refined.append((k, li, loss))
            log.info("%s layer %d: output MSE %.3g -> %.3g", type(refiner).__name__, li, loss.start, loss.best)
        if self.point == "layer":
            self._compensate(mine)
            self.kept = [k for k in self.kept if id(k.module) not in inside]
        outs = _run(layer, self._inputs, calls)
        self._inputs, self._targets = [], []
        return outs

    def after_loop(self, model: nn.Module, batches: list[torch.Tensor]) -> None:
        """Refine the whole model, then apply the compensators still pending."""
        n_layer = len(self.recipe.layer_refiners)
        if self.teacher is not None:
            for k, refiner in enumerate(self.recipe.model_refiners if self.kept else []):
                loss = refiner.refine_model(model, self.teacher, self.kept, batches)
                self._refined.append((n_layer + k, -1, loss))
                log.info("%s: loss %.3g -> %.3g", type(refiner).__name__, loss.start, loss.best)
            self.teacher = None
        if self.point == "model":
            self._compensate(self.kept)
        self.kept = []

    def metrics(self) -> list[Metric]:
        """What each refiner reports about its work."""
        refiners: list[Any] = [*self.recipe.layer_refiners, *self.recipe.model_refiners]
        return [m for k, r in enumerate(refiners) for m in r.metrics([d for i, _, d in self._refined if i == k])]

    @property
    def losses(self) -> list[dict[str, float]]:
        """``{"layer", "start", "best"}`` per refinement, in order (layer -1: the model refiners)."""
        return [{"layer": float(layer), "start": d.start, "best": d.best} for _, layer, d in self._refined]

    def _compensate(self, kept: list[QuantizedLinear]) -> None:
        if not self.recipe.compensators:
            return
        for t in kept:
            r = t.result
            now = WeightResult(weight_matrix(t.module).detach().float(), r.codes, r.qparams, r.g_idx)
            set_weight_matrix(t.module, self.recipe.compensate(t.original, now).weight)


def fp_copy(model: nn.Module) -> nn.Module:
    """A frozen full-precision copy of ``model`` (the teacher of a model refiner)."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _plain(value: Any) -> Any:
    """Copies of tensors (inference-mode tensors cannot take part in autograd), recursively."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _run(layer: nn.Module, inputs: list[torch.Tensor], calls: list[LayerCall]) -> list[torch.Tensor]:
    """The layer's outputs on each chunk."""
    with torch.inference_mode():
        return [layer_output(layer(x, *c.args, **c.kwargs)) for x, c in zip(inputs, calls, strict=True)]
