"""PTQ methods: each a frozen config dataclass and a class that quantizes weight matrices.

A recipe names methods in order, e.g. ``[{gptq: {damp: 0.01}}, {lorc: {rank: 8}}]``: at most one
*quantizer* (rtn, gptq; RTN when none is named), then *compensators* (lorc) that correct its result.
:func:`build_quantizer` turns the recipe into the weight quantizer the pipeline runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from ..errors import ConfigError
from ..quant.spec import QuantSpec
from .awq import AWQClip, AWQConfig, AWQScale
from .base import WeightResult
from .gptq import GPTQ, GPTQConfig
from .lorc import LoRC, LoRCConfig
from .rotation import RotationConfig
from .rtn import RTN, RTNConfig
from .smoothquant import SmoothQuant, SmoothQuantConfig
from .zeroquant import LKDConfig, ZeroQuantGlobal, ZeroQuantLocal


class WeightQuantizer(Protocol):
    """A method that chooses the quantized value of each weight."""

    @property
    def needs_calibration(self) -> bool:
        """Whether the method needs calibration data (input Hessians)."""
        ...

    def quantize(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None) -> WeightResult:
        """Quantize ``W`` (out, in); calibrated methods receive the input Hessian ``H``."""
        ...


QUANTIZERS: dict[str, tuple[type[Any], type[Any]]] = {
    "rtn": (RTNConfig, RTN),
    "gptq": (GPTQConfig, GPTQ),
}
COMPENSATORS: dict[str, tuple[type[Any], type[Any]]] = {
    "lorc": (LoRCConfig, LoRC),
}
REFINERS: dict[str, tuple[type[Any], type[Any]]] = {
    "zeroquant_local": (LKDConfig, ZeroQuantLocal),
    "zeroquant_global": (LKDConfig, ZeroQuantGlobal),
}
TRANSFORMS: dict[str, tuple[type[Any], type[Any]]] = {
    "smoothquant": (SmoothQuantConfig, SmoothQuant),
    "awq": (AWQConfig, AWQScale),  # also the quantizer (AWQ's clipping search) when the recipe names none
}


class Recipe:
    """Transforms, then a quantizer, then compensators, in recipe order.

    Attributes:
        steps: Method names in the order they run.
        transforms: Function-preserving rescalings folded before quantization (SmoothQuant).
        quantizer: The weight quantizer.
        compensators: Corrections applied to the quantizer's result, in order.

    """

    def __init__(
        self,
        quantizer: WeightQuantizer,
        compensators: Sequence[LoRC] = (),
        steps: Sequence[str] = (),
        transforms: Sequence[Any] = (),
        refiners: Sequence[ZeroQuantLocal] = (),
        rotation: RotationConfig | None = None,
    ) -> None:
        """Compose ``transforms``, ``quantizer``, ``refiners`` (ZeroQuant LKD) and ``compensators``."""
        self.quantizer = quantizer
        self.compensators = list(compensators)
        self.transforms = list(transforms)
        self.refiners = list(refiners)
        self.rotation = rotation
        self.steps = list(steps) or [type(quantizer).__name__.lower()]

    @property
    def needs_calibration(self) -> bool:
        """Whether any step needs calibration data."""
        return (
            self.quantizer.needs_calibration
            or bool(self.transforms)
            or bool(self.refiners)
            or any(c.needs_calibration for c in self.compensators)
        )

    @property
    def name(self) -> str:
        """The steps joined by ``+``, e.g. ``gptq+lorc``."""
        return "+".join(self.steps)

    def quantize(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None) -> WeightResult:
        """Quantize ``W``, then apply each compensator to the result (when no refiner runs in between)."""
        result = self.quantizer.quantize(W, spec, H)
        return result if self.refiners else self.compensate(W, result)

    def compensate(self, W: torch.Tensor, result: WeightResult) -> WeightResult:
        """Apply the compensators to a quantized ``result`` of the original weight ``W``."""
        for c in self.compensators:
            result = c.compensate(W, result)
        return result

    @property
    def local_refiner(self) -> ZeroQuantLocal | None:
        """The ZeroQuant-Local step, if any."""
        return next((r for r in self.refiners if type(r) is ZeroQuantLocal), None)

    @property
    def global_refiner(self) -> ZeroQuantGlobal | None:
        """The ZeroQuant-Global step, if any."""
        return next((r for r in self.refiners if isinstance(r, ZeroQuantGlobal)), None)

    def check_shape(self, module: str, rows: int, cols: int) -> None:
        """Raise ConfigError when a step cannot work on a (rows, cols) weight (e.g. LoRC's rank)."""
        for c in self.compensators:
            c.check_shape(module, rows, cols)

    def extra_bits(self, rows: int, cols: int) -> int:
        """Bits the compensators add to a (rows, cols) weight."""
        return sum(c.extra_bits(rows, cols) for c in self.compensators)


def _config(name: str, cls: type[Any], options: Mapping[str, Any] | None, where: str) -> Any:
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        names = ", ".join(sorted(known)) or "none"
        raise ConfigError(f"{where}.{unknown[0]}: unknown option of {name}; known: {names}")
    return cls(**options)


def build_quantizer(recipe: Sequence[Mapping[str, Any]]) -> Recipe:
    """Build the weight quantizer of a recipe (RTN when the recipe names none).

    Args:
        recipe: Steps, each a one-key mapping ``{method_name: options}``.

    Returns:
        The configured recipe.

    Raises:
        ConfigError: Unknown method or option, more than one quantizer, or a compensator placed before
            the quantizer.

    """
    quantizers: list[WeightQuantizer] = []
    compensators: list[LoRC] = []
    transforms: list[Any] = []
    refiners: list[ZeroQuantLocal] = []
    rotation: RotationConfig | None = None
    steps: list[str] = []
    known = sorted({**QUANTIZERS, **COMPENSATORS, **TRANSFORMS, **REFINERS, "rotation": None})
    for k, step in enumerate(recipe):
        if len(step) != 1:
            raise ConfigError(f"recipe[{k}] must have exactly one key (the method name), got {sorted(step)}")
        ((name, options),) = step.items()
        where = f"recipe[{k}].{name}"
        if name in QUANTIZERS:
            if compensators or refiners:
                raise ConfigError(f"recipe[{k}]: quantizer {name!r} comes after a compensator or refiner; the "
                                  "order is transforms, quantizer, zeroquant_local/global, lorc")
            config_cls, method_cls = QUANTIZERS[name]
            quantizers.append(method_cls(_config(name, config_cls, options, where)))
        elif name == "rotation":
            if quantizers or compensators or refiners or transforms:
                raise ConfigError(f"recipe[{k}]: rotation is a model-level transform that runs first; put it first")
            rotation = _config(name, RotationConfig, options, where)
        elif name in REFINERS:
            if compensators:
                raise ConfigError(f"recipe[{k}]: {name!r} comes after a compensator; put lorc last")
            if any(type(r) is REFINERS[name][1] for r in refiners):
                raise ConfigError(f"recipe[{k}]: {name!r} is named twice")
            config_cls, method_cls = REFINERS[name]
            refiners.append(method_cls(_config(name, config_cls, options, where)))
        elif name in TRANSFORMS:
            if quantizers or compensators or refiners:
                raise ConfigError(f"recipe[{k}]: transform {name!r} is placed after a quantizer or compensator; "
                                  "transforms go first (e.g. [smoothquant, gptq, lorc])")
            config_cls, method_cls = TRANSFORMS[name]
            transforms.append(method_cls(_config(name, config_cls, options, where)))
        elif name in COMPENSATORS:
            config_cls, method_cls = COMPENSATORS[name]
            compensators.append(method_cls(_config(name, config_cls, options, where)))
        else:
            raise ConfigError(f"recipe[{k}]: unknown method {name!r}; known: {', '.join(known)}")
        steps.append(name)
    if len(quantizers) > 1:
        raise ConfigError("recipe names more than one weight quantizer; use one of rtn, gptq")
    awq = [t for t in transforms if isinstance(t, AWQScale)]
    if not quantizers and awq:
        quantizers.append(AWQClip(awq[-1].config))
    elif not quantizers:
        steps.insert(len(transforms) + (rotation is not None), "rtn")
    return Recipe(quantizers[0] if quantizers else RTN(), compensators, steps, transforms, refiners, rotation)


__all__ = [
    "COMPENSATORS",
    "GPTQ",
    "QUANTIZERS",
    "RTN",
    "GPTQConfig",
    "LoRC",
    "LoRCConfig",
    "LKDConfig",
    "REFINERS",
    "RTNConfig",
    "Recipe",
    "RotationConfig",
    "ZeroQuantGlobal",
    "ZeroQuantLocal",
    "SmoothQuant",
    "SmoothQuantConfig",
    "TRANSFORMS",
    "WeightQuantizer",
    "WeightResult",
    "build_quantizer",
]
