"""The knapsack solvers against brute force on small random menus (seeded), and their edges."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from ptqlab.errors import ConfigError
from ptqlab.search.solver import solve, solve_exact, solve_greedy


def _brute(costs, values, capacity):
    best = math.inf
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        if sum(costs[u][m] for u, m in enumerate(choice)) <= capacity:
            best = min(best, math.fsum(values[u][m] for u, m in enumerate(choice)))
    return best


def _instance(rng: random.Random):
    units = rng.randint(1, 6)
    options = rng.randint(1, 4)
    scale = rng.choice([1, 32, 144])  # block-like costs: a large common divisor, as GGUF menus have
    costs = [[scale * rng.randint(1, 40) for _ in range(options)] for _ in range(units)]
    values = [[rng.choice([rng.uniform(-1, 3), float(rng.randint(0, 3))]) for _ in range(options)]
              for _ in range(units)]
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    return costs, values, rng.randint(lo, hi)


def test_exact_equals_brute_force_and_greedy_is_never_better() -> None:
    rng = random.Random(1234)
    for _ in range(400):
        costs, values, capacity = _instance(rng)
        exact = solve_exact(costs, values, capacity)
        assert exact.cost <= capacity
        assert exact.cost == sum(costs[u][m] for u, m in enumerate(exact.choice))
        assert exact.value == pytest.approx(_brute(costs, values, capacity), abs=1e-12)
        greedy = solve_greedy(costs, values, capacity)
        assert greedy.cost <= capacity
        assert greedy.value >= exact.value - 1e-12


def test_the_same_problem_gives_the_same_allocation_and_ties_take_the_cheaper_option() -> None:
    costs = [[10, 20, 30]] * 4
    values = [[1.0, 0.5, 0.5]] * 4  # options 1 and 2 tie in value: the cheaper (1) is taken
    first = solve(costs, values, 200, "exact")
    assert first == solve(costs, values, 200, "exact")
    assert first.choice == (1, 1, 1, 1)
    assert solve(costs, values, 200, "greedy").choice == (1, 1, 1, 1)


def test_infeasible_and_oversized_problems_are_errors() -> None:
    with pytest.raises(ValueError, match="no allocation fits"):
        solve_exact([[10, 20]], [[1.0, 0.0]], 5)
    with pytest.raises(ConfigError, match="solver: greedy"):
        solve_exact([[1, 2, 1_000_003]] * 3, [[3.0, 2.0, 0.0]] * 3, 3_000_000, max_cells=1000)
    with pytest.raises(ValueError, match="unknown solver"):
        solve([[1]], [[0.0]], 1, "ilp")
