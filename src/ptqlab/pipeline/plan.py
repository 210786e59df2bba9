"""Which linear gets which weight spec: the scheme's weight section plus per-module overrides."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..models.adapter import Adapter
from ..models.weights import in_features
from ..quant.spec import QuantSpec


@dataclass(frozen=True)
class Override:
    """One override: modules whose full name fully matches ``match`` get ``weight`` merged in.

    ``weight=None`` keeps the matched modules in full precision.
    """

    match: str
    weight: Mapping[str, Any] | None


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


def _resolve(
    name: str, weight: Mapping[str, Any] | None, compiled: list[tuple[int, re.Pattern[str], Override]]
) -> QuantSpec:
    fields: dict[str, Any] | None = dict(weight) if weight else None
    where = "scheme.weight"
    for k, pattern, ov in compiled:
        if pattern.fullmatch(name):
            where = f"scheme.overrides[{k}].weight"
            fields = None if ov.weight is None else {**(fields or {}), **dict(ov.weight)}
    return _spec_from(fields, where)
