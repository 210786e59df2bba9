"""A search from file to stored runs: check, signal, solve per budget, and run everything as one resumable sweep.

:func:`plan_search` checks everything before any work (the file, every menu spec against every module,
each budget against the range the menu allows), measures or reads the cached signal, solves the knapsack
per budget and draws the validation allocations; the result is an ordinary :class:`ptqlab.study.sweep.Sweep`
named after the search: the uniform menu points, the rule baseline, the searched allocation of each budget
(and of the rule's own budget), and the validation allocations, each a run configuration whose per-module
choices are ``scheme.overrides``. :func:`run_search` runs it with the sweep driver, so a killed search
resumes as a sweep does (only the missing runs are computed) and every run is an ordinary stored run.
Each run's sweep entry holds its roles and the signal's prediction (see :mod:`ptqlab.report.search`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..models.loading import LoadedModel, load_model, resolve_device
from ..models.registry import get_adapter
from ..report.search import KEY, ROLES
from ..schema import RunConfig
from ..store import Store, run_id
from ..study.config import parse_config
from ..study.executors import Executor
from ..study.sweep import Sweep, SweepRun
from ..study.sweeper import SweepPlan, SweepSummary, plan_sweep, run_sweep
from .allocate import allocation_config, random_allocation
from .config import SearchFile
from .rule import rule_allocation
from .signal import Signal, cached_signal, load_or_measure, signal_path
from .solver import solve
from .units import Units, build_units

log = logging.getLogger(__name__)

VARIED = [ROLES, "search.score", "search.bits"]
"""The sweep entry values a table of a search's runs shows."""


@dataclass
class Allocation:
    """One allocation the search runs: a menu index per unit, what it is for, and its run configuration."""

    choice: tuple[int, ...]
    roles: list[dict[str, Any]]
    config: RunConfig
    run_id: str
    bits: float
    score: float | None = None


@dataclass
class SearchPlan:
    """A checked search: its units, signal (None when not measured yet), allocations and sweep.

    Attributes:
        search: The search file.
        units: The units and their costs.
        fingerprint: The model's fingerprint.
        base_point: ``kl``: the menu index units move from (-1: FP); None for the proxies.
        signal: The signal, or None (``--dry-run`` before it is measured).
        signal_measured: Whether the signal was measured by this call (False: read from the cache).
        budgets: ``(kind, value, capacity in bits, whether it is the rule's own budget)`` of each budget solved.
        allocations: Every allocation to run, without repeats, in sweep order.
        feasible: The cheapest and the dearest budget the menu allows (in the budget's kind).
        key: What decides the signal and the solver's choices (the signal's cache key and the solver): a
            search's summary reads only the entries of its latest key, so runs of an earlier signal or solver
            under the same name are left out of it.

    """

    search: SearchFile
    units: Units
    fingerprint: str
    base_point: int | None
    signal: Signal | None
    signal_measured: bool
    budgets: list[tuple[str, float, int, bool]]
    allocations: list[Allocation] = field(default_factory=list)
    feasible: tuple[float, float] = (0.0, 0.0)
    key: str = ""

    @property
    def name(self) -> str:
        """The search's name (its sweep's)."""
        return self.search.name

    @property
    def sweep(self) -> Sweep:
        """The allocations as a sweep named after the search."""
        runs = [SweepRun(a.config, self.values(a)) for a in self.allocations]
        return Sweep(self.name, runs, list(VARIED))

    def values(self, a: Allocation) -> dict[str, Any]:
        """The sweep entry values of an allocation: its roles and the signal's prediction."""
        signal = self.signal
        return {ROLES: a.roles, "search.score": a.score, "search.bits": a.bits,
                "search.signal": self.search.section.signal, "search.budget_kind": self.search.section.budget.kind,
                "search.offset": None if signal is None else signal.offset, KEY: self.key}

    def role(self, role: str) -> list[Allocation]:
        """The allocations playing ``role``."""
        return [a for a in self.allocations if any(r["role"] == role for r in a.roles)]


def plan_search(search: SearchFile, *, measure: bool = True, progress: bool = True,
                model: LoadedModel | None = None) -> SearchPlan:
    """Check a search against its model, get its signal, solve each budget and draw the validation allocations.

    Args:
        search: The search file.
        measure: Measure the signal when it is not cached (False: leave the searched and validation
            allocations out when it is not, as ``--dry-run`` does).
        progress: Show progress bars.
        model: The loaded FP model (default: loaded from ``search.base.model`` on the CPU).

    Raises:
        ConfigError: Before any work: a menu spec that does not fit a module, a budget outside the range the
            menu allows (named with the range), a mixture-of-experts model.

    """
    cfg = search.base
    lm = model if model is not None else load_model(cfg.model, cfg.dtype, "cpu", cfg.trust_remote_code)
    adapter = get_adapter(lm.model)
    if adapter.experts is not None:
        raise ConfigError(f"search: {adapter.family} is a mixture of experts; searching per-expert formats is not "
                          "supported yet")
    recipe = cfg._compiled.scheme.recipe
    extra = recipe.extra_bits if recipe.compensators else None
    units = build_units(lm.model, adapter, search.menu, search.section.unit, extra)
    budget = search.section.budget
    feasible = units.feasible(budget.kind)
    _check_budgets(budget.kind, budget.values, feasible)
    base_data = cfg.model_dump(mode="json")

    def config_of(choice: Sequence[int]) -> RunConfig:
        return parse_config(allocation_config(base_data, units, choice, search.menu))

    size = len(search.menu)
    uniform = [tuple([m] * len(units.units)) for m in range(size)]
    base_point = _base_point(search, units, uniform)
    device = resolve_device(cfg.device)
    key = signal_path(search, units, lm.info.fingerprint, device.type, base_point)
    plan = SearchPlan(search, units, lm.info.fingerprint, base_point, None, False, [], feasible=feasible,
                      key=f"{'' if key is None else key.stem}-{search.section.solver}")
    chosen: list[tuple[tuple[int, ...], dict[str, Any]]] = []
    chosen += [(choice, {"role": "uniform", "menu": m}) for m, choice in enumerate(uniform)]
    rule = None
    if search.section.rule is not None:
        rule = rule_allocation(units, search.section.rule)
        chosen.append((rule, {"role": "rule", "menu": search.section.rule}))
    configs = {choice: config_of(choice) for choice, _ in chosen}  # checked (compiled) before any work
    signal: Signal | None
    if measure:
        signal, plan.signal_measured = load_or_measure(search, units, lm, device, base_point,
                                                       lambda m: configs[uniform[m]], progress=progress)
    else:
        signal = cached_signal(search, units, lm.info.fingerprint, device.type, base_point)
    plan.signal = signal
    budgets: list[tuple[str, float, int, bool]] = [
        (budget.kind, float(b), units.capacity(budget.kind, float(b)), False) for b in budget.values]
    if rule is not None:
        own = units.weight_bits(rule) if budget.kind == "bits" else units.model_bytes(rule)
        budgets.append((budget.kind, own, units.total_bits(rule), True))
    plan.budgets = budgets
    if signal is not None:
        chosen += _solved(search, units, signal, budgets)
    plan.allocations = _merged(chosen, units, signal, lambda c: configs.get(c) or config_of(c), lm.info.fingerprint)
    return plan


def _check_budgets(kind: str, values: Sequence[float], feasible: tuple[float, float]) -> None:
    lo, hi = feasible
    unit = "effective bits per weight" if kind == "bits" else "bytes"
    for b in values:
        if b < lo * (1 - 1e-12) or b > hi * (1 + 1e-12):
            where = "below the cheapest" if b < lo else "above the dearest"
            raise ConfigError(f"search.budget.{kind}: {b:g} is {where} allocation the menu allows; the feasible "
                              f"range is {lo:.6g} to {hi:.6g} {unit} (every unit at its cheapest / dearest menu "
                              "point)")


def _base_point(search: SearchFile, units: Units, uniform: Sequence[tuple[int, ...]]) -> int | None:
    """``kl``: the menu index units move from (``auto``: the uniform point nearest the mean budget; -1 for FP)."""
    section = search.section
    if section.signal != "kl":
        return None
    if section.base == "fp":
        return -1
    if isinstance(section.base, int):
        return section.base
    kind = section.budget.kind
    mean = sum(section.budget.values) / len(section.budget.values)
    sizes = [units.weight_bits(c) if kind == "bits" else units.model_bytes(c) for c in uniform]
    return min(range(len(uniform)), key=lambda m: (abs(sizes[m] - mean), -sizes[m], m))


def _solved(search: SearchFile, units: Units, signal: Signal,
            budgets: Sequence[tuple[str, float, int, bool]]) -> list[tuple[tuple[int, ...], dict[str, Any]]]:
    """The searched allocation of each budget, then the validation allocations of each (seeded)."""
    costs = [u.costs for u in units.units]
    section = search.section
    out: list[tuple[tuple[int, ...], dict[str, Any]]] = []
    for kind, value, capacity, own in budgets:
        solution = solve(costs, signal.values, capacity, section.solver)
        role: dict[str, Any] = {"role": "searched", "budget": value}
        if own:
            role["rule_budget"] = True
        out.append((solution.choice, role))
        log.info("budget %s %g: predicted sum %.6g at %.4f bits per weight", kind, value, solution.value,
                 units.weight_bits(solution.choice))
    for kind, value, capacity, own in budgets:
        if own:
            continue
        rng = random.Random(f"{section.seed}:{kind}:{value!r}")
        for k in range(section.validate_):
            out.append((random_allocation(units, capacity, rng), {"role": "validation", "budget": value, "k": k}))
    return out


def _merged(chosen: Sequence[tuple[tuple[int, ...], dict[str, Any]]], units: Units, signal: Signal | None,
            config_of: Callable[[tuple[int, ...]], RunConfig], fingerprint: str) -> list[Allocation]:
    """One allocation per distinct choice (its roles merged), in the order first asked for."""
    out: dict[tuple[int, ...], Allocation] = {}
    for choice, role in chosen:
        found = out.get(choice)
        if found is None:
            cfg = config_of(choice)
            found = Allocation(choice, [], cfg, run_id(cfg, fingerprint), units.weight_bits(choice),
                               None if signal is None else signal.score(choice))
            out[choice] = found
        found.roles.append(role)
    return list(out.values())


def run_search(plan: SearchPlan, store: Store, executor: Executor, *, retry_failed: bool = False,
               progress: bool = True) -> SweepSummary:
    """Run the search's allocations that are missing from the store, as a sweep named after the search.

    Raises:
        ConfigError: The signal is not measured (a plan made with ``measure=False``).

    """
    if plan.signal is None:
        raise ConfigError(f"search {plan.name}: its signal is not measured; plan it with measure=True")
    sweep_plan = plan_sweep(plan.sweep, store)
    return run_sweep(sweep_plan, store, executor, retry_failed=retry_failed, progress=progress)


def sweep_plan(plan: SearchPlan, store: Store | None) -> SweepPlan:
    """The search's runs against a store: which are done, failed or missing, and the time left."""
    return plan_sweep(plan.sweep, store)
