"""What a search chooses for: its units (a decoder linear, or a decoder layer's linears) and their costs.

A unit's cost at each menu point is the bits its weights take, counted by ptqlab's own size accounting
(:func:`ptqlab.quant.size.weight_storage_bits`, what :func:`ptqlab.pipeline.size.size_metrics` sums into
``bits.weight`` and ``size.model_bytes``), so a budget and the stored run's ``bits.weight`` agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..metrics import SIZE_MODEL_BYTES
from ..models.adapter import Adapter
from ..models.weights import in_features, out_features
from ..pipeline.plan import spec_from
from ..pipeline.size import size_metrics
from ..quant.size import weight_storage_bits


@dataclass(frozen=True)
class Unit:
    """One choice of the search: the linears that take one menu point together.

    Attributes:
        name: The module's full name (unit ``module``), or ``<layers path>.<i>`` (unit ``layer``).
        modules: The full names of its linears, in forward order.
        layer: Its decoder layer.
        costs: The bits its weights take at each menu point (codes and per-range parameters).

    """

    name: str
    modules: tuple[str, ...]
    layer: int
    costs: tuple[int, ...]


@dataclass(frozen=True)
class Units:
    """The units of a model under a menu, with the size accounting the budgets are read in.

    Attributes:
        units: The units, in forward order.
        params: Weights of every decoder linear (the denominator of ``bits.weight``).
        other_bits: Bits of every other parameter (16 each), the rest of ``size.model_bytes``.
        groups: ``{module full name: its linear group's name}`` (``qkv``, ``o``, ``down``...).
        value_modules: The attention value projections (from the adapter: what the ``o`` group reads).
        layers: The number of decoder layers.

    """

    units: tuple[Unit, ...]
    params: int
    other_bits: int
    groups: Mapping[str, str]
    value_modules: frozenset[str]
    layers: int

    @property
    def menu_size(self) -> int:
        """How many menu points each unit may take."""
        return len(self.units[0].costs)

    def total_bits(self, choice: Sequence[int]) -> int:
        """Bits of every decoder linear's weights under ``choice`` (one menu index per unit)."""
        return sum(u.costs[m] for u, m in zip(self.units, choice, strict=True))

    def weight_bits(self, choice: Sequence[int]) -> float:
        """``bits.weight`` of ``choice``: effective bits per decoder-linear weight."""
        return self.total_bits(choice) / self.params

    def model_bytes(self, choice: Sequence[int]) -> float:
        """``size.model_bytes`` of ``choice``."""
        return (self.total_bits(choice) + self.other_bits) / 8

    def capacity(self, kind: str, budget: float) -> int:
        """The most bits the decoder linears may take under a ``bits`` or ``bytes`` budget (rounded down)."""
        if kind == "bits":
            return math.floor(budget * self.params * (1 + 1e-12))
        return math.floor(budget * 8 * (1 + 1e-12)) - self.other_bits

    def feasible(self, kind: str) -> tuple[float, float]:
        """The cheapest and the dearest budget of ``kind`` any choice meets (every unit at its cheapest / dearest)."""
        low = [_cheapest(u.costs) for u in self.units]
        high = [_dearest(u.costs) for u in self.units]
        if kind == "bits":
            return self.weight_bits(low), self.weight_bits(high)
        return self.model_bytes(low), self.model_bytes(high)


def _cheapest(costs: Sequence[int]) -> int:
    """The cheapest menu index (the lower on equal cost)."""
    return min(range(len(costs)), key=lambda m: (costs[m], m))


def _dearest(costs: Sequence[int]) -> int:
    """The dearest menu index (the lower on equal cost)."""
    return max(range(len(costs)), key=lambda m: (costs[m], -m))


def build_units(model: nn.Module, adapter: Adapter, menu: Sequence[Mapping[str, Any]], unit: str,
                extra_bits: Callable[[int, int], int] | None = None) -> Units:
    """The units of ``model`` and their cost at each menu point, each spec checked against each module.

    Args:
        model: The causal LM.
        adapter: Its family adapter.
        menu: The menu's weight sections.
        unit: ``module`` or ``layer``.
        extra_bits: Bits the recipe adds to a quantized (rows, cols) weight (LoRC's factors), as the size
            accounting counts them.

    Raises:
        ConfigError: A menu spec that cannot quantize a module (a block type whose blocks do not divide its
            width), naming the menu entry and the module.

    """
    specs = [spec_from(m, f"search.menu[{k}]") for k, m in enumerate(menu)]
    per_module: list[tuple[str, int, tuple[int, ...]]] = []
    groups: dict[str, str] = {}
    values: set[str] = set()
    params = 0
    layers = adapter.layers(model)
    for li, layer in enumerate(layers):
        for group in adapter.groups:
            for rel in group.linears:
                full = f"{adapter.layers_path}.{li}.{rel}"
                module = layer.get_submodule(rel)
                rows, cols = out_features(module), in_features(module)
                for spec in specs:
                    spec.check_width(cols, full)
                extra = extra_bits(rows, cols) if extra_bits is not None else 0
                costs = tuple(weight_storage_bits(s, rows, cols) + (extra if s.enabled else 0) for s in specs)
                per_module.append((full, li, costs))
                groups[full] = group.name
                params += rows * cols
            if group.name == "o" and group.prev_part is None and group.prev_op is not None:
                values.add(f"{adapter.layers_path}.{li}.{group.prev_op}")
    if not per_module:
        raise ConfigError(f"search: the model has no decoder linear to choose a weight spec for ({adapter.family})")
    if unit == "module":
        units = tuple(Unit(name, (name,), li, costs) for name, li, costs in per_module)
    else:
        by_layer: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
        for name, li, costs in per_module:
            by_layer.setdefault(li, []).append((name, costs))
        units = tuple(
            Unit(f"{adapter.layers_path}.{li}", tuple(n for n, _ in members), li,
                 tuple(sum(c[k] for _, c in members) for k in range(len(specs))))
            for li, members in sorted(by_layer.items())
        )
    cheapest = [_cheapest(costs) for _, _, costs in per_module]
    chosen = {name: specs[k] for (name, _, _), k in zip(per_module, cheapest, strict=True) if specs[k].enabled}
    sizes = size_metrics(model, adapter, chosen, extra_bits=extra_bits)
    linear_bits = sum(costs[k] for (_, _, costs), k in zip(per_module, cheapest, strict=True))
    other_bits = round(sizes[SIZE_MODEL_BYTES] * 8) - linear_bits
    return Units(units, params, other_bits, groups, frozenset(values & set(groups)), len(layers))
