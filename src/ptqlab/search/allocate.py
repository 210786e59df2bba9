"""Allocations as ordinary run configurations, read back from them, and random allocations to validate with.

An allocation (one menu index per unit) becomes the base configuration with ``scheme.weight`` the menu point
most of the decoder linears take and one ``scheme.overrides`` entry per other linear (its full name, escaped,
with the full menu spec), in forward order: an ordinary run that report, recommend, compare and export read
as they read any run. :func:`read_allocation` resolves a run's configuration the way the pipeline does
(:func:`ptqlab.pipeline.plan.plan_weights`: ``re.fullmatch``, later entries win, fields merged) and names
the menu point each unit took, so a stored run can be checked against its allocation.
"""

from __future__ import annotations

import copy
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from .units import Units


def module_specs(units: Units, choice: Sequence[int], menu: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{module full name: its menu weight section}`` under ``choice``."""
    return {name: dict(menu[m]) for u, m in zip(units.units, choice, strict=True) for name in u.modules}


def allocation_config(base: Mapping[str, Any], units: Units, choice: Sequence[int],
                      menu: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The run configuration (plain data) of ``choice``: the default menu point plus per-module overrides.

    Args:
        base: The base configuration as plain data (no ``scheme.weight`` or ``scheme.overrides`` of its own).
        units: The units.
        choice: One menu index per unit.
        menu: The menu's full weight sections.

    """
    per_module = [(name, m) for u, m in zip(units.units, choice, strict=True) for name in u.modules]
    counts = Counter(m for _, m in per_module)
    default = min(counts, key=lambda m: (-counts[m], m))
    cfg = copy.deepcopy(dict(base))
    scheme = dict(cfg.get("scheme") or {})
    scheme["weight"] = dict(menu[default])
    scheme["overrides"] = [{"match": re.escape(name), "weight": dict(menu[m])} for name, m in per_module
                           if m != default]
    cfg["scheme"] = scheme
    return cfg


def read_allocation(config: Mapping[str, Any], units: Units, menu: Sequence[Mapping[str, Any]]) -> tuple[int, ...]:
    """The menu index each unit takes in a run configuration (as the pipeline resolves its weight specs).

    Raises:
        ConfigError: A module whose resolved spec is no menu point, or a unit whose modules differ.

    """
    scheme = config.get("scheme") or {}
    weight = scheme.get("weight")
    compiled = [(re.compile(o["match"]), o) for o in scheme.get("overrides") or []]
    normal = [_key(m) for m in menu]
    choice = []
    for u in units.units:
        found = set()
        for name in u.modules:
            fields: dict[str, Any] | None = dict(weight) if weight else None
            for pattern, ov in compiled:
                if "weight" in ov and pattern.fullmatch(name):
                    fields = None if ov["weight"] is None else {**(fields or {}), **ov["weight"]}
            key = _key(fields or {})
            if key not in normal:
                raise ConfigError(f"{name}: its weight spec {fields} is no menu point")
            found.add(normal.index(key))
        if len(found) != 1:
            raise ConfigError(f"unit {u.name}: its linears take different menu points {sorted(found)}")
        choice.append(found.pop())
    return tuple(choice)


def _key(fields: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, repr(v)) for k, v in fields.items()))


def random_allocation(units: Units, capacity: int, rng: random.Random) -> tuple[int, ...]:
    """A random allocation that fits ``capacity``, near it: random choices, cut down to fit, then filled up.

    Each unit draws a menu point uniformly; while the total is over ``capacity`` a random unit that can moves
    to a random cheaper point; then the units, in random order, move to a random dearer point that still fits.
    The result depends only on the generator's state (``random.Random(seed)`` gives the same allocations).
    """
    size = units.menu_size
    choice = [rng.randrange(size) for _ in units.units]
    total = units.total_bits(choice)
    while total > capacity:
        cheaper = [u for u, m in enumerate(choice) if any(c < units.units[u].costs[m] for c in units.units[u].costs)]
        u = rng.choice(cheaper)
        costs = units.units[u].costs
        m = rng.choice([k for k in range(size) if costs[k] < costs[choice[u]]])
        total += costs[m] - costs[choice[u]]
        choice[u] = m
    order = list(range(len(choice)))
    rng.shuffle(order)
    for u in order:
        costs = units.units[u].costs
        dearer = [k for k in range(size) if costs[k] > costs[choice[u]] and total + costs[k] - costs[choice[u]]
                  <= capacity]
        if dearer:
            m = rng.choice(dearer)
            total += costs[m] - costs[choice[u]]
            choice[u] = m
    return tuple(choice)
