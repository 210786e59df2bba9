"""The kinds of step a recipe is made of: one protocol per kind, and the order in which kinds run.

A method declares its kind (``kind = "quantizer"``) and implements that kind's protocol; the pipeline
dispatches on the kind alone:

1. ``model_transform``: changes the whole model before the layer loop, keeping its function (rotation);
2. ``layer_transform``: picks per-input-channel scales of each linear group inside the layer loop,
   folded so the function is kept (SmoothQuant, AWQ's scale search);
3. ``quantizer``: chooses each weight's quantized value (RTN, GPTQ, AWQ's clipping search);
4. ``layer_refiner`` / ``model_refiner``: trains the quantized weights of a layer (after it is quantized)
   or of the whole model (after the loop) against the FP model (ZeroQuant-Local / -Global);
5. ``compensator``: corrects a quantized weight once nothing will change it any more (LoRC).

Besides its verbs, a kind's protocol lists the capabilities its methods declare, which the pipeline and the
exporters read instead of probing a method's options: a model transform's ``runtime_hooks`` and
``rotates_cached_keys``, a quantizer's ``permutes_columns`` and ``min_tokens`` (and its ``check_spec`` of the
weight formats it rounds to). A method declares each one,
as a ``ClassVar`` when it is fixed or a property when its options decide it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, TypeAlias

import torch
from torch import nn

from ..metrics import Metric
from ..models.adapter import Adapter
from ..quant.spec import QuantSpec
from .base import GroupInputs, WeightResult

Kind = Literal["model_transform", "layer_transform", "quantizer", "layer_refiner", "model_refiner", "compensator"]
KINDS: tuple[Kind, ...] = (
    "model_transform", "layer_transform", "quantizer", "layer_refiner", "model_refiner", "compensator"
)
RANK: dict[str, int] = {
    "model_transform": 0, "layer_transform": 1, "quantizer": 2, "layer_refiner": 3, "model_refiner": 3,
    "compensator": 4,
}


@dataclass
class QuantizedLinear:
    """A quantized linear kept for the steps after its quantizer (refiners, compensators).

    Attributes:
        module: The linear, whose weight holds the quantized value.
        result: The quantizer's result (its scales and zero points stay fixed).
        spec: Its weight spec.
        original: The weight the quantizer was given (out, in), float32.

    """

    module: nn.Module
    result: WeightResult
    spec: QuantSpec
    original: torch.Tensor


@dataclass(frozen=True)
class Refined:
    """A refiner's loss before training and of the iterate it kept (on its first calibration chunk)."""

    start: float
    best: float


class Step(Protocol):
    """What every step declares: its kind and whether it needs calibration data."""

    kind: ClassVar[str]
    needs_calibration: ClassVar[bool]


class ModelTransform(Step, Protocol):
    """Changes the whole model before the layer loop, keeping its float function (``kind = "model_transform"``)."""

    @property
    def rotates_cached_keys(self) -> bool:
        """Whether the KV cache's keys are to be quantized in a rotated basis."""
        ...

    @property
    def runtime_hooks(self) -> bool:
        """Whether :meth:`apply` installs forward hooks (an online rotation), which a checkpoint cannot carry."""
        ...

    def check(self, model: nn.Module, adapter: Adapter) -> None:
        """Raise ConfigError, before any work, when the transform cannot be applied exactly to the model."""
        ...

    def apply(self, model: nn.Module, adapter: Adapter) -> list[Any]:
        """Transform the model in place; return the handles of any hooks it installed."""
        ...


class Quantizer(Step, Protocol):
    """Chooses the quantized value of each weight (``kind = "quantizer"``)."""

    @property
    def permutes_columns(self) -> bool:
        """Whether the weight's columns are quantized in an order of their own (GPTQ's act-order).

        The groups then follow that order, so a format without a group index (g_idx) cannot hold the result.
        """
        ...

    @property
    def min_tokens(self) -> int:
        """Fewest calibration tokens a linear's Hessian must come from; below, the pipeline rounds to nearest.

        At least 1 (never quantize from a zero Hessian); data-free quantizers declare 1.
        """
        ...

    def check_spec(self, spec: QuantSpec) -> None:
        """Raise ConfigError, before any work, when the quantizer cannot round a weight of ``spec``."""
        ...

    def quantize(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None) -> WeightResult:
        """Quantize ``W`` (out, in); calibrated quantizers receive the input Hessian ``H``."""
        ...


class LayerTransform(Step, Protocol):
    """Picks per-slot input scales of a linear group, folded so the function is kept (``kind = "layer_transform"``)."""

    def slot_scales(self, group: GroupInputs) -> torch.Tensor:
        """Positive scales per slot; the group's input is divided by them, its weights' columns multiplied."""
        ...

    def default_quantizer(self) -> Quantizer | None:
        """The quantizer that goes with this transform when the recipe names none (AWQ's clipping), or None."""
        ...


class LayerRefiner(Step, Protocol):
    """Trains one decoder layer's quantized weights after the layer is quantized (``kind = "layer_refiner"``)."""

    def refine_layer(
        self,
        layer: nn.Module,
        linears: Sequence[QuantizedLinear],
        forward: Callable[[int], torch.Tensor],
        targets: Sequence[torch.Tensor],
    ) -> Refined:
        """Train ``linears`` so that ``forward(c)`` (the layer on calibration chunk c) matches ``targets[c]``."""
        ...

    def metrics(self, losses: Sequence[Refined]) -> list[Metric]:
        """What the step reports about its work over all layers."""
        ...


class ModelRefiner(Step, Protocol):
    """Trains every quantized weight of the model after the layer loop (``kind = "model_refiner"``)."""

    def refine_model(
        self, model: nn.Module, teacher: nn.Module, linears: Sequence[QuantizedLinear], batches: Sequence[torch.Tensor]
    ) -> Refined:
        """Train ``linears`` so that ``model`` matches the FP ``teacher`` on the calibration ``batches``."""
        ...

    def metrics(self, losses: Sequence[Refined]) -> list[Metric]:
        """What the step reports about its work."""
        ...


class Compensator(Step, Protocol):
    """Corrects a quantized weight once nothing will change it any more (``kind = "compensator"``)."""

    def check_shape(self, module: str, rows: int, cols: int) -> None:
        """Raise ConfigError, before any work, when the step cannot work on a (rows, cols) weight."""
        ...

    def extra_bits(self, rows: int, cols: int) -> int:
        """Bits the correction adds to a quantized (rows, cols) weight."""
        ...

    def compensate(self, W: torch.Tensor, result: WeightResult) -> WeightResult:
        """The result corrected toward the weight ``W`` it quantized."""
        ...


Method: TypeAlias = ModelTransform | LayerTransform | Quantizer | LayerRefiner | ModelRefiner | Compensator
"""A step of any kind: what ``register_method`` takes (mypy checks a registered class against its kind)."""

PROTOCOLS: dict[str, type[Any]] = {
    "model_transform": ModelTransform, "layer_transform": LayerTransform, "quantizer": Quantizer,
    "layer_refiner": LayerRefiner, "model_refiner": ModelRefiner, "compensator": Compensator,
}


def protocol_members(kind: str) -> tuple[str, ...]:
    """What a method of ``kind`` declares: its protocol's attributes, capabilities and methods, sorted.

    Args:
        kind: One of :data:`KINDS`.

    Returns:
        The member names of the kind's protocol and of :class:`Step`, e.g. ``kind``, ``min_tokens``,
        ``needs_calibration``, ``permutes_columns``, ``quantize`` for a quantizer.

    """
    names: set[str] = set()
    for proto in PROTOCOLS[kind].__mro__:
        if Step in proto.__mro__:
            names.update(proto.__dict__.get("__annotations__", {}))
            names.update(n for n in vars(proto) if not n.startswith("_"))
    return tuple(sorted(names))
