"""``ptqlab recommend``: the smallest stored configuration that meets a quality budget, from measured evidence.

A budget bounds one kind of loss against FP: the ZeroQuant-V2 class or the increase of mean perplexity
(quality), the accuracy drop on lm-eval tasks, or the KL divergence from FP. A size bound (effective bits
per weight or bytes) narrows the candidates. The choice is the smallest run whose point estimate meets
the budget; it is *sure* when the whole 95% interval does, and flagged when the budget is met only inside
the interval (the smallest sure run is then named as well). When nothing meets the budget, the runs
closest to it are named.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ReportError
from ..metrics import parse_name, task_name
from .runs import Change, RunView, is_task_accuracy, quality

__all__ = ["Budget", "Evidence", "Recommendation", "recommend"]

CLASS_BOUNDS = {1: 0.1, 2: 0.5, 3: math.inf}


@dataclass(frozen=True)
class Budget:
    """What a configuration must meet; exactly one quality bound is set."""

    max_class: int | None = None
    max_ppl_increase: float | None = None
    max_acc_drop: float | None = None
    task: str | None = None
    max_kl: float | None = None
    max_bits: float | None = None
    max_bytes: float | None = None

    def describe(self) -> str:
        """The budget in words."""
        if self.max_class is not None:
            what = f"ZeroQuant-V2 class <= {self.max_class} (Δppl <= {CLASS_BOUNDS[self.max_class]:g})"
        elif self.max_ppl_increase is not None:
            what = f"mean perplexity increase <= {self.max_ppl_increase:g}"
        elif self.max_acc_drop is not None:
            what = f"accuracy drop <= {self.max_acc_drop:g} on {self.task or 'every task'}"
        else:
            what = f"KL from FP <= {self.max_kl:g}"
        size = (f", bits/weight <= {self.max_bits:g}" if self.max_bits is not None else
                f", size <= {self.max_bytes:.0f} bytes" if self.max_bytes is not None else "")
        return what + size


@dataclass
class Evidence:
    """One measurement a candidate was judged on, with its 95% interval, against the budget."""

    measure: str
    value: float
    fp: float | None
    loss: float
    interval: tuple[float, float]
    limit: float

    @property
    def met(self) -> bool:
        """The point estimate meets the limit."""
        return self.loss <= self.limit

    @property
    def sure(self) -> bool:
        """The whole interval meets the limit."""
        return self.interval[1] <= self.limit

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        return {"measure": self.measure, "value": self.value, "fp": self.fp, "loss": self.loss,
                "interval": list(self.interval), "limit": self.limit, "met": self.met, "sure": self.sure}


@dataclass
class Candidate:
    """A run, its size and the evidence on the budget."""

    view: RunView
    evidence: list[Evidence]

    @property
    def met(self) -> bool:
        """Every measurement meets the budget (point estimates)."""
        return all(e.met for e in self.evidence)

    @property
    def sure(self) -> bool:
        """Every interval meets the budget."""
        return all(e.sure for e in self.evidence)

    @property
    def excess(self) -> float:
        """How far the worst measurement is over its limit (<= 0 when met)."""
        return max(e.loss - e.limit for e in self.evidence)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        v = self.view
        return {"id": v.id, "label": v.label, "model": v.record.model, "bits_weight": v.weight_bits,
                "size_bytes": v.size_bytes, "met": self.met, "sure": self.sure,
                "evidence": [e.to_json() for e in self.evidence]}


@dataclass
class Recommendation:
    """The choice (None when nothing meets the budget), how sure it is, and the alternatives."""

    budget: Budget
    choice: Candidate | None
    sure_choice: Candidate | None = None
    nearest: list[Candidate] = field(default_factory=list)
    candidates: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping; ``choice.id`` is the chosen run."""
        return {"budget": self.budget.describe(), "candidates": self.candidates,
                "choice": self.choice.to_json() if self.choice else None,
                "flagged": bool(self.choice and not self.choice.sure),
                "sure_choice": self.sure_choice.to_json() if self.sure_choice else None,
                "nearest": [c.to_json() for c in self.nearest]}


def _evidence(name: str, c: Change, loss_sign: float, limit: float) -> Evidence:
    lo, hi = c.interval()
    loss_lo, loss_hi = sorted((loss_sign * lo, loss_sign * hi))
    return Evidence(name, c.value, c.fp, loss_sign * c.delta, (loss_lo, loss_hi), limit)


def _task_names(views: list[RunView]) -> list[str]:
    return sorted({str(parse_name(n).task) for v in views for n in v.metrics if is_task_accuracy(n)})


def _judge(budget: Budget, views: list[RunView]) -> Callable[[RunView], list[Evidence] | None]:
    """The function that gives a run's evidence on the budget (None: the run lacks the measurements)."""
    if budget.max_class is not None or budget.max_ppl_increase is not None:
        limit = CLASS_BOUNDS[budget.max_class] if budget.max_class is not None else float(budget.max_ppl_increase or 0)

        def ppl(v: RunView) -> list[Evidence] | None:
            q = quality(v)
            return None if q is None else [_evidence("mean perplexity", q, 1.0, limit)]
        return ppl
    if budget.max_acc_drop is not None:
        tasks = _task_names(views)
        if budget.task is not None and budget.task not in tasks:
            close = difflib.get_close_matches(budget.task, tasks, n=3)
            hint = f"; close: {', '.join(close)}" if close else f"; stored: {', '.join(tasks) or 'none'}"
            raise ReportError(f"no stored run has task {budget.task!r}{hint}")
        wanted = [budget.task] if budget.task else tasks
        drop = budget.max_acc_drop

        def acc(v: RunView) -> list[Evidence] | None:
            changes = [(t, v.change(task_name(t, "acc"))) for t in wanted]
            if any(c is None for _, c in changes):
                return None
            return [_evidence(task_name(t, "acc"), c, -1.0, drop) for t, c in changes if c is not None]
        return acc
    kl_limit = float(budget.max_kl or 0)

    def kl(v: RunView) -> list[Evidence] | None:
        names = sorted(n for n in v.metrics if parse_name(n).kind == "kl")
        if not names:
            return None
        return [Evidence(names[0], v.metrics[names[0]], 0.0, v.metrics[names[0]],
                         (v.metrics[names[0]], v.metrics[names[0]]), kl_limit)]
    return kl


def _fits(budget: Budget, v: RunView) -> bool:
    if budget.max_bits is not None and (v.weight_bits is None or v.weight_bits > budget.max_bits):
        return False
    return not (budget.max_bytes is not None and (v.size_bytes is None or v.size_bytes > budget.max_bytes))


def _size(c: Candidate) -> tuple[float, float]:
    v = c.view
    size = v.size_bytes if v.size_bytes is not None else math.inf
    return size, v.weight_bits if v.weight_bits is not None else math.inf


def recommend(views: list[RunView], budget: Budget) -> Recommendation:
    """The smallest run meeting ``budget`` (see the module docstring).

    Raises:
        ReportError: No run has the measurements the budget needs (or the named task).

    """
    judge = _judge(budget, views)
    judged = [(v, judge(v)) for v in views]
    measured = [Candidate(v, e) for v, e in judged if e]
    if not measured:
        raise ReportError(f"no stored run has the measurements for the budget ({budget.describe()})")
    fitting = [c for c in measured if _fits(budget, c.view)]
    met = sorted((c for c in fitting if c.met), key=lambda c: (*_size(c), c.excess))
    rec = Recommendation(budget, met[0] if met else None, candidates=len(fitting))
    if rec.choice is not None and not rec.choice.sure:
        rec.sure_choice = next((c for c in met if c.sure), None)
    if rec.choice is None:
        rec.nearest = sorted(fitting or measured, key=lambda c: (c.excess, *_size(c)))[:3]
    return rec
