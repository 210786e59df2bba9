"""The allocation problem, a multiple-choice knapsack: one menu point per unit, least predicted loss under a budget.

Each unit ``u`` takes one option ``m`` with an integer cost ``c[u][m]`` (bits) and a value ``v[u][m]``
(its signal: the predicted loss it adds); the solvers minimise ``sum v[u][a_u]`` subject to
``sum c[u][a_u] <= capacity``.

- :func:`solve_exact` is dynamic programming over the budget, exactly: costs are integers, so after
  subtracting each unit's cheapest cost they are divided by their greatest common divisor (GGUF blocks or
  INT groups make it large: SmolLM2-135M's GGUF menu has under 4000 budget cells) and the table is exact,
  not discretised. A problem whose table would pass :data:`MAX_CELLS` is refused with a clear error.
- :func:`solve_greedy` upgrades, one step at a time, the unit whose next option buys the most loss per bit
  (the classic efficiency rule); never better than the exact solution.

Ties are broken deterministically (the cheaper option, then the lower menu index, then the earlier unit), so
the same problem always gives the same allocation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

from ..errors import ConfigError

MAX_CELLS = 50_000_000
"""The most cells (units x budget steps) the exact table may have (one byte each for the choices)."""


@dataclass(frozen=True)
class Solution:
    """An allocation: a menu index per unit, its total value (predicted loss) and cost (bits)."""

    choice: tuple[int, ...]
    value: float
    cost: int


def _check(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], capacity: int) -> None:
    if len(costs) != len(values) or not costs:
        raise ValueError("costs and values need one row per unit, and at least one unit")
    for u, (c, v) in enumerate(zip(costs, values, strict=True)):
        if len(c) != len(v) or not c:
            raise ValueError(f"unit {u}: costs and values need one entry per option")
    cheapest = sum(min(c) for c in costs)
    if cheapest > capacity:
        raise ValueError(f"no allocation fits {capacity} bits: the cheapest takes {cheapest}")


def _evaluate(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], choice: Sequence[int]) -> Solution:
    return Solution(tuple(choice), math.fsum(values[u][m] for u, m in enumerate(choice)),
                    sum(costs[u][m] for u, m in enumerate(choice)))


def _order(cost: Sequence[int]) -> list[int]:
    """A unit's options, cheapest first (lower menu index on equal cost): the order ties are broken in."""
    return sorted(range(len(cost)), key=lambda m: (cost[m], m))


def solve_exact(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], capacity: int,
                max_cells: int = MAX_CELLS) -> Solution:
    """The allocation of least total value whose cost fits ``capacity``, exactly (dynamic programming).

    Args:
        costs: ``costs[u][m]``: integer cost of option ``m`` of unit ``u``.
        values: ``values[u][m]``: its value (to be minimised in sum).
        capacity: The most the total cost may be.
        max_cells: The largest table allowed.

    Returns:
        The optimal allocation (ties: the cheaper option, then the lower index, of the later units first).

    Raises:
        ValueError: No allocation fits ``capacity``.
        ConfigError: The exact table would be too large (use the greedy solver, or coarser units).

    """
    _check(costs, values, capacity)
    base = [min(c) for c in costs]
    excess = [[x - b for x in c] for c, b in zip(costs, base, strict=True)]
    step = reduce(math.gcd, (x for row in excess for x in row if x), 0) or 1
    room = min((capacity - sum(base)) // step, sum(max(row) for row in excess) // step)
    cells = (room + 1) * len(costs)
    if cells > max_cells:
        raise ConfigError(f"search.solver exact: the knapsack table would have {cells} cells (budget steps of "
                          f"{step} bits over {len(costs)} units), more than {max_cells}; use solver: greedy or "
                          "unit: layer")
    best = np.zeros(room + 1)  # best[c]: least value of the units so far with excess cost <= c steps
    picks = np.zeros((len(costs), room + 1), dtype=np.int16)
    for u, row in enumerate(excess):
        now = np.full(room + 1, np.inf)
        pick = np.zeros(room + 1, dtype=np.int16)
        for m in _order(costs[u]):
            e = row[m] // step
            if e > room:
                continue
            shifted = np.full(room + 1, np.inf)
            shifted[e:] = best[: room + 1 - e] + values[u][m]
            better = shifted < now
            now[better] = shifted[better]
            pick[better] = m
        best, picks[u] = now, pick
    choice = [0] * len(costs)
    c = room
    for u in range(len(costs) - 1, -1, -1):
        m = int(picks[u, c])
        choice[u] = m
        c -= excess[u][m] // step
    return _evaluate(costs, values, choice)


def solve_greedy(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], capacity: int) -> Solution:
    """Every unit at its cheapest option, then the upgrade with the most value saved per cost unit, while one fits.

    Raises:
        ValueError: No allocation fits ``capacity``.

    """
    _check(costs, values, capacity)
    choice = [_order(c)[0] for c in costs]
    total = sum(costs[u][m] for u, m in enumerate(choice))
    while True:
        found: tuple[float, int, int] | None = None
        for u, m_now in enumerate(choice):
            for m in _order(costs[u]):
                extra = costs[u][m] - costs[u][m_now]
                gain = values[u][m_now] - values[u][m]
                if gain <= 0 or total + extra > capacity:
                    continue
                rate = gain / extra if extra > 0 else math.inf
                if found is None or rate > found[0]:
                    found = (rate, u, m)
        if found is None:
            return _evaluate(costs, values, choice)
        _, u, m = found
        total += costs[u][m] - costs[u][choice[u]]
        choice[u] = m


def solve(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], capacity: int,
          method: str = "exact") -> Solution:
    """:func:`solve_exact` or :func:`solve_greedy` by name.

    Raises:
        ValueError: No allocation fits, or an unknown method.

    """
    if method == "exact":
        return solve_exact(costs, values, capacity)
    if method == "greedy":
        return solve_greedy(costs, values, capacity)
    raise ValueError(f"unknown solver {method!r}: exact or greedy")
