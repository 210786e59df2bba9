"""Which linear gets which weight spec: the scheme's weight section plus per-module overrides."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..models.adapter import Adapter
from ..models.weights import in_features, out_features
from ..nn.specs import ActivationSpec, activation_spec
from ..quant.spec import QuantSpec


@dataclass(frozen=True)
class Override:
    """One override: modules whose full name fully matches ``match`` get ``weight`` / ``activation`` merged in.

    ``None`` keeps the matched modules in full precision for that part; ``sets_weight`` /
    ``sets_activation`` say whether the entry gives that part at all.
    """

    match: str
    weight: Mapping[str, Any] | None
    activation: Mapping[str, Any] | None = None
    sets_weight: bool = True
    sets_activation: bool = False


@dataclass(frozen=True)
class LinearTarget:
    """A quantizable linear: its full name, decoder layer, group and spec."""

    name: str
    layer: int
    group: int
    relative: str
    spec: QuantSpec


def _spec_from(fields: Mapping[str, Any] | None, where: str) -> QuantSpec:
    if not fields:
        return QuantSpec(bits=16, where=where)
    try:
        return QuantSpec(**dict(fields), where=where)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _compile(model: nn.Module, overrides: Sequence[Override]) -> list[tuple[int, re.Pattern[str], Override]]:
    names = [n for n, _ in model.named_modules()]
    compiled = []
    for k, ov in enumerate(overrides):
        try:
            pattern = re.compile(ov.match)
        except re.error as exc:
            raise ConfigError(f"scheme.overrides[{k}].match={ov.match!r} is not a valid regex: {exc}") from exc
        if not any(pattern.fullmatch(n) for n in names):
            raise ConfigError(f"scheme.overrides[{k}].match={ov.match!r} matches no module of the model")
        compiled.append((k, pattern, ov))
    return compiled


def plan_weights(
    model: nn.Module,
    adapter: Adapter,
    weight: Mapping[str, Any] | None,
    overrides: Sequence[Override] = (),
) -> list[LinearTarget]:
    """Resolve the weight spec of every linear of every decoder layer, and check it fits.

    Args:
        model: The causal LM.
        adapter: Its family adapter.
        weight: The scheme's weight section (QuantSpec fields) or None for full precision.
        overrides: Applied in order; later entries win.

    Returns:
        One target per linear whose spec quantizes (bits < 16), in forward order.

    Raises:
        ConfigError: A pattern matches no module, a field is invalid, or a group size does not divide a
            module's width (the message names the module and the width).

    """
    compiled = _compile(model, overrides)
    layers_prefix = adapter.layers_path
    targets: list[LinearTarget] = []
    for li, layer in enumerate(adapter.layers(model)):
        for gi, group in enumerate(adapter.groups):
            for rel in group.linears:
                full = f"{layers_prefix}.{li}.{rel}"
                spec = _resolve(full, weight, compiled)
                spec.check_width(in_features(layer.get_submodule(rel)), full)
                if spec.enabled:
                    targets.append(LinearTarget(full, li, gi, rel, spec))
    return targets


def _merged(
    name: str,
    part: str,
    base: Mapping[str, Any] | None,
    compiled: list[tuple[int, re.Pattern[str], Override]],
) -> tuple[dict[str, Any] | None, str]:
    """The ``part`` (``weight`` or ``activation``) fields of module ``name`` after the overrides.

    Returns the fields (None: full precision) and the config path they came from; later entries win.
    """
    fields: dict[str, Any] | None = dict(base) if base else None
    where = f"scheme.{part}"
    for k, pattern, ov in compiled:
        if getattr(ov, f"sets_{part}") and pattern.fullmatch(name):
            where = f"scheme.overrides[{k}].{part}"
            given = getattr(ov, part)
            fields = None if given is None else {**(fields or {}), **dict(given)}
    return fields, where


def _resolve(
    name: str, weight: Mapping[str, Any] | None, compiled: list[tuple[int, re.Pattern[str], Override]]
) -> QuantSpec:
    return _spec_from(*_merged(name, "weight", weight, compiled))


def plan_activations(
    model: nn.Module,
    adapter: Adapter,
    activation: Mapping[str, Any] | None,
    overrides: Sequence[Override] = (),
) -> list[tuple[str, str, ActivationSpec]]:
    """Resolve the activation spec of the input of every linear of every decoder layer.

    Args:
        model: The causal LM.
        adapter: Its family adapter.
        activation: The scheme's activation section, or None.
        overrides: Applied in order; later entries win (``activation: null`` keeps inputs in FP).

    Returns:
        ``(module name, sharing key, spec)`` for each linear whose input is quantized; linears of one
        group share a key (they read the same tensor).

    Raises:
        ConfigError: An invalid field, or a pattern that matches no module.

    """
    compiled = _compile(model, overrides)
    out = []
    for li in range(len(adapter.layers(model))):
        for gi, group in enumerate(adapter.groups):
            for rel in group.linears:
                full = f"{adapter.layers_path}.{li}.{rel}"
                act = activation_spec(*_merged(full, "activation", activation, compiled))
                if act is not None:
                    if act.spec.granularity == "group":
                        act.spec.check_width(in_features(layer_module(model, adapter, li, rel)), full)
                    out.append((full, f"{li}.{gi}", act))
    return out


def layer_module(model: nn.Module, adapter: Adapter, layer: int, relative: str) -> nn.Module:
    """The module ``relative`` of decoder layer ``layer``."""
    return adapter.layers(model)[layer].get_submodule(relative)


def check_recipe_shapes(model: nn.Module, adapter: Adapter, targets: list[LinearTarget], recipe: Any) -> None:
    """Let every step of ``recipe`` check the shape of every target weight (e.g. LoRC's rank), before any work."""
    for t in targets:
        module = layer_module(model, adapter, t.layer, t.relative)
        recipe.check_shape(t.name, out_features(module), in_features(module))
