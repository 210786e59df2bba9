"""The rule baseline: a hand-made mix in the manner of llama.cpp's Q4_K_M.

llama.cpp's Q4_K_M quantizes every tensor as Q4_K except the attention value projection and the MLP down
projection of some layers, which take Q6_K, one type up (``llama-quant.cpp``, ``use_more_bits``): the layers
in the first and the last eighth, and every third layer between (``(i - n/8) % 3 == 2``). Here the base type
is a menu point and "one type up" the next menu point; the rule's size is its own budget.
"""

from __future__ import annotations

from .units import Units


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third one between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def rule_allocation(units: Units, base: int) -> tuple[int, ...]:
    """Every unit at menu point ``base``; the value and down projections of :func:`use_more_bits` layers one up.

    With ``unit: layer`` a layer's linears move together, so the chosen layers move up whole.
    """
    up = base + 1
    choice = []
    for u in units.units:
        bumped = use_more_bits(u.layer, units.layers) and any(
            name in units.value_modules or units.groups.get(name) in ("down", "fc2") for name in u.modules)
        choice.append(up if bumped else base)
    return tuple(choice)
