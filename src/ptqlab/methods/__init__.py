"""PTQ methods: each a frozen config dataclass and a class that quantizes weight matrices.

A recipe names methods in order, e.g. ``[{gptq: {damp: 0.01}}]``; :func:`build_quantizer` turns the
recipe into the weight quantizer the pipeline runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from ..errors import ConfigError
from ..quant.spec import QuantSpec
from .base import WeightResult
from .gptq import GPTQ, GPTQConfig
from .rtn import RTN, RTNConfig


class WeightQuantizer(Protocol):
    """A method that chooses the quantized value of each weight."""

    needs_calibration: bool

    def quantize(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None) -> WeightResult:
        """Quantize ``W`` (out, in); calibrated methods receive the input Hessian ``H``."""
        ...


QUANTIZERS: dict[str, tuple[type[Any], type[Any]]] = {
    "rtn": (RTNConfig, RTN),
    "gptq": (GPTQConfig, GPTQ),
}


def _config(name: str, cls: type[Any], options: Mapping[str, Any] | None, where: str) -> Any:
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        names = ", ".join(sorted(known)) or "none"
        raise ConfigError(f"{where}.{unknown[0]}: unknown option of {name}; known: {names}")
    return cls(**options)


def build_quantizer(recipe: Sequence[Mapping[str, Any]]) -> WeightQuantizer:
    """Build the weight quantizer of a recipe (RTN when the recipe names none).

    Args:
        recipe: Steps, each a one-key mapping ``{method_name: options}``.

    Returns:
        The configured quantizer.

    Raises:
        ConfigError: Unknown method or option, or more than one quantizer.

    """
    chosen: list[WeightQuantizer] = []
    for k, step in enumerate(recipe):
        if len(step) != 1:
            raise ConfigError(f"recipe[{k}] must have exactly one key (the method name), got {sorted(step)}")
        ((name, options),) = step.items()
        if name not in QUANTIZERS:
            raise ConfigError(f"recipe[{k}]: unknown method {name!r}; known: {', '.join(sorted(QUANTIZERS))}")
        config_cls, method_cls = QUANTIZERS[name]
        chosen.append(method_cls(_config(name, config_cls, options, f"recipe[{k}].{name}")))
    if len(chosen) > 1:
        raise ConfigError("recipe names more than one weight quantizer; use one of rtn, gptq")
    return chosen[0] if chosen else RTN()


__all__ = ["GPTQ", "QUANTIZERS", "RTN", "GPTQConfig", "RTNConfig", "WeightQuantizer", "WeightResult", "build_quantizer"]
