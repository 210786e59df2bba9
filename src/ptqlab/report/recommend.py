"""``ptqlab recommend``: the smallest stored configuration that meets a quality budget, from measured evidence.

A budget bounds one kind of loss against FP: the ZeroQuant-V2 class or the increase of mean perplexity
(quality), the accuracy drop on lm-eval tasks, or the KL divergence from FP. A size bound (effective bits
per weight or bytes: the measured GGUF file where the run has one, else the estimate from effective bits)
and a speed bound (generation tokens/s, llama.cpp's where several runtimes timed the run) narrow the
candidates; a run without the measurement a bound needs cannot meet it, and each recommendation counts
the runs left out so. The choice is the smallest run whose point estimate meets the budget (by measured
file size when every candidate has one, else by the estimate); it is *sure* when the whole 95% interval
(delta ± 1.96 se) does, and flagged when the budget is met only inside the interval or there is no
interval (the smallest sure run is then named as well).
When nothing meets the budget, the runs closest to it are named.

Runs are judged and ranked only within one cohort (one model, one evaluation protocol: see
:mod:`ptqlab.report.runs`): a mean perplexity over three corpora and one over wikitext2 alone are not the
same measurement. :func:`recommend` answers for one cohort and refuses several; :func:`recommend_each`
gives one recommendation per cohort, which is what ``ptqlab recommend`` prints.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ReportError
from ..metrics import parse_name, task_name
from .cost import ESTIMATED, MEASURED, Size, Speed, generation_speed, run_size
from .runs import Change, RunView, by_cohort, cohort_label, is_task_accuracy, json_ready, quality
from .sizes import model_sizes, params_text

__all__ = ["Budget", "Candidate", "Evidence", "Recommendation", "SizeChoice", "nearest_size", "recommend",
           "recommend_each", "several_cohorts"]

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
    min_tps: float | None = None

    def describe(self) -> str:
        """The budget in words."""
        if self.max_class is not None:
            bound = CLASS_BOUNDS[self.max_class]
            what = (f"ZeroQuant-V2 class <= {self.max_class} "
                    + (f"(Δppl <= {bound:g})" if math.isfinite(bound) else "(any Δppl)"))
        elif self.max_ppl_increase is not None:
            what = f"mean perplexity increase <= {self.max_ppl_increase:g}"
        elif self.max_acc_drop is not None:
            what = f"accuracy drop <= {self.max_acc_drop:g} on {self.task or 'every task'}"
        else:
            what = f"KL from FP <= {self.max_kl:g}"
        size = (f", bits/weight <= {self.max_bits:g}" if self.max_bits is not None else
                f", size <= {self.max_bytes:.0f} bytes" if self.max_bytes is not None else "")
        speed = f", generation >= {self.min_tps:g} tokens/s" if self.min_tps is not None else ""
        return what + size + speed


@dataclass
class Evidence:
    """One measurement a candidate was judged on, with its 95% interval, against the budget.

    ``loss`` is signed so that larger is worse (perplexity increase, accuracy drop, KL); ``interval`` is
    the 95 % interval of the loss (None: no standard error, so no interval); ``limit`` may be infinite
    (no bound: JSON null).
    """

    measure: str
    value: float
    fp: float | None
    loss: float
    interval: tuple[float, float] | None
    limit: float
    of: str | None = None
    stderr: float | None = None

    @property
    def met(self) -> bool:
        """The point estimate meets the limit."""
        return self.loss <= self.limit

    @property
    def sure(self) -> bool:
        """The whole interval meets the limit (False without an interval)."""
        return self.interval is not None and self.interval[1] <= self.limit

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping (strict: an infinite limit or a missing interval is null)."""
        return json_ready({"measure": self.measure, "of": self.of, "value": self.value, "fp": self.fp,
                           "loss": self.loss, "stderr": self.stderr,
                           "interval": list(self.interval) if self.interval else None,
                           "limit": self.limit, "met": self.met, "sure": self.sure})


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
    def size(self) -> Size | None:
        """The run's size: the measured GGUF file where it has one, else the estimate from effective bits."""
        return run_size(self.view)

    @property
    def speed(self) -> Speed | None:
        """The run's generation speed (llama.cpp's where several runtimes timed it), or None."""
        return generation_speed(self.view)

    @property
    def excess(self) -> float:
        """How far the worst measurement is over its limit (<= 0 when met)."""
        return max(e.loss - e.limit for e in self.evidence)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        v = self.view
        return json_ready({"id": v.id, "label": v.label, "model": v.record.model, "cohort": v.cohort_id,
                           "bits_weight": v.weight_bits, "size_bytes": v.size_bytes,
                           "size": self.size.to_json() if self.size else None,
                           "speed": self.speed.to_json() if self.speed else None, "met": self.met,
                           "sure": self.sure, "evidence": [e.to_json() for e in self.evidence]})


@dataclass
class Recommendation:
    """The choice within one cohort (None when nothing meets the budget), how sure it is, and the alternatives.

    ``cohort`` is the cohort's short id, ``protocol`` its evaluation protocol in words; ``ranked_by`` the
    size runs were ranked by (the measured GGUF file when every candidate has one, else the estimate);
    ``left_out`` how many runs with the quality measurements lacked the measurement a bound needs
    (``speed`` with ``--min-tps``, ``size`` with ``--max-bytes``).
    """

    budget: Budget
    choice: Candidate | None
    sure_choice: Candidate | None = None
    nearest: list[Candidate] = field(default_factory=list)
    candidates: int = 0
    cohort: str = ""
    model: str = ""
    protocol: str = ""
    runs: int = 0
    ranked_by: str = ESTIMATED
    left_out: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The cohort in words: model, protocol and id."""
        return f"{self.model}, {self.protocol} [cohort {self.cohort}]"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping (strict JSON); ``choice.id`` is the chosen run."""
        return json_ready({"budget": self.budget.describe(), "cohort": self.cohort, "model": self.model,
                           "protocol": self.protocol, "runs": self.runs, "candidates": self.candidates,
                           "ranked_by": f"size: {self.ranked_by}", "left_out_unmeasured": self.left_out,
                           "choice": self.choice.to_json() if self.choice else None,
                           "flagged": bool(self.choice and not self.choice.sure),
                           "sure_choice": self.sure_choice.to_json() if self.sure_choice else None,
                           "nearest": [c.to_json() for c in self.nearest]})


def _evidence(name: str, c: Change, loss_sign: float, limit: float, of: str | None = None) -> Evidence:
    iv = c.interval()
    ends = None if iv is None else sorted(loss_sign * x + 0.0 for x in iv)  # + 0.0: no negative zero
    loss = loss_sign * c.delta + 0.0
    return Evidence(name, c.value, c.fp, loss, None if ends is None else (ends[0], ends[1]), limit, of, c.stderr)


def _task_names(views: list[RunView]) -> list[str]:
    return sorted({str(parse_name(n).task) for v in views for n in v.metrics if is_task_accuracy(n)})


def _check_task(budget: Budget, views: list[RunView]) -> None:
    if budget.max_acc_drop is None or budget.task is None:
        return
    tasks = _task_names(views)
    if budget.task not in tasks:
        close = difflib.get_close_matches(budget.task, tasks, n=3)
        hint = f"; close: {', '.join(close)}" if close else f"; stored: {', '.join(tasks) or 'none'}"
        raise ReportError(f"no stored run has task {budget.task!r}{hint}")


def _judge(budget: Budget, views: list[RunView]) -> Callable[[RunView], list[Evidence] | None]:
    """The function that gives a run's evidence on the budget (None: the run lacks the measurements).

    ``views`` are one cohort's: with ``--max-acc-drop`` and no task, its tasks are the ones judged.
    """
    if budget.max_class is not None or budget.max_ppl_increase is not None:
        limit = CLASS_BOUNDS[budget.max_class] if budget.max_class is not None else float(budget.max_ppl_increase or 0)

        def ppl(v: RunView) -> list[Evidence] | None:
            q = quality(v)
            return None if q is None else [_evidence("mean perplexity", q, 1.0, limit, q.of)]
        return ppl
    if budget.max_acc_drop is not None:
        wanted = [budget.task] if budget.task else _task_names(views)
        drop = budget.max_acc_drop

        def acc(v: RunView) -> list[Evidence] | None:
            changes = [(t, v.change(task_name(t, "acc"))) for t in wanted]
            if not changes or any(c is None for _, c in changes):
                return None
            return [_evidence(task_name(t, "acc"), c, -1.0, drop) for t, c in changes if c is not None]
        return acc
    kl_limit = float(budget.max_kl or 0)

    def kl(v: RunView) -> list[Evidence] | None:
        names = sorted(n for n in v.metrics if parse_name(n).kind == "kl")
        if not names:
            return None
        value = v.metrics[names[0]]
        e = _evidence(names[0], Change(value, 0.0, v.stderr.get(names[0])), 1.0, kl_limit)
        e.fp = None  # KL is a divergence from FP already: no FP value of its own
        return [e]
    return kl


def _fits(budget: Budget, v: RunView) -> bool:
    if budget.max_bits is not None and (v.weight_bits is None or v.weight_bits > budget.max_bits):
        return False
    size, speed = run_size(v), generation_speed(v)
    if budget.max_bytes is not None and (size is None or size.bytes > budget.max_bytes):
        return False
    return not (budget.min_tps is not None and (speed is None or speed.value < budget.min_tps))


def _left_out(budget: Budget, measured: list[Candidate]) -> dict[str, int]:
    """How many runs with the quality measurements lack the measurement a size or speed bound needs."""
    out = {}
    if budget.min_tps is not None:
        out["speed"] = sum(1 for c in measured if c.speed is None)
    if budget.max_bytes is not None:
        out["size"] = sum(1 for c in measured if c.size is None)
    return out


def _ranking(candidates: list[Candidate]) -> tuple[str, Callable[[Candidate], tuple[float, float]]]:
    """What sizes rank ``candidates``: their measured files when every one has one, else the estimates."""
    measured = bool(candidates) and all(c.size is not None and c.size.measured for c in candidates)

    def key(c: Candidate) -> tuple[float, float]:
        v = c.view
        size = c.size.bytes if measured and c.size is not None else v.size_bytes
        return (size if size is not None else math.inf, v.weight_bits if v.weight_bits is not None else math.inf)

    return (MEASURED if measured else ESTIMATED), key


def _recommend_cohort(views: list[RunView], budget: Budget) -> Recommendation | None:
    """The recommendation among one cohort's runs (None: none of them has the measurements)."""
    judge = _judge(budget, views)
    measured = [Candidate(v, e) for v in views if (e := judge(v))]
    if not measured:
        return None
    first = views[0]
    fitting = [c for c in measured if _fits(budget, c.view)]
    ranked_by, size = _ranking(fitting or measured)
    met = sorted((c for c in fitting if c.met), key=lambda c: (*size(c), c.excess))
    rec = Recommendation(budget, met[0] if met else None, candidates=len(fitting), cohort=first.cohort_id,
                         model=first.record.model, protocol=first.protocol.describe(), runs=len(views),
                         ranked_by=ranked_by, left_out=_left_out(budget, measured))
    if rec.choice is not None and not rec.choice.sure:
        rec.sure_choice = next((c for c in met if c.sure), None)
    if rec.choice is None:
        rec.nearest = sorted(fitting or measured, key=lambda c: (c.excess, *size(c)))[:3]
    return rec


def recommend_each(views: list[RunView], budget: Budget) -> list[Recommendation]:
    """One recommendation per cohort whose runs have the measurements the budget needs, in store order.

    Raises:
        ReportError: No run has the measurements the budget needs (or the named task).

    """
    _check_task(budget, views)
    recs = [r for members in by_cohort(views) if (r := _recommend_cohort(members, budget)) is not None]
    if not recs:
        raise ReportError(f"no stored run has the measurements for the budget ({budget.describe()})")
    return recs


def recommend(views: list[RunView], budget: Budget) -> Recommendation:
    """The smallest run meeting ``budget`` among runs of one cohort (see the module docstring).

    Raises:
        ReportError: No run has the measurements the budget needs (or the named task), or runs of several
            cohorts do (the message names them and the ``--where cohort=ID`` that picks one).

    """
    recs = recommend_each(views, budget)
    if len(recs) > 1:
        raise ReportError(several_cohorts(views, recs))
    return recs[0]


def several_cohorts(views: list[RunView], recs: list[Recommendation]) -> str:
    """The message for a budget that runs of several cohorts could answer: each cohort and how to pick it."""
    wanted = {r.cohort for r in recs}
    lines = [f"runs of {len(recs)} cohorts (model and evaluation protocol) have the measurements; "
             "a recommendation ranks runs of one: add --where cohort=ID"]
    for members in by_cohort(views):
        if members[0].cohort_id in wanted:
            lines.append(f"  cohort={members[0].cohort_id}: {cohort_label(members[0])} ({len(members)} runs)")
    return "\n".join(lines)


# ---- model size: the recommendation for a model of N parameters ------------------------------------------------


@dataclass(frozen=True)
class SizeChoice:
    """Which measured model ``recommend --params N`` answers for, and why.

    ``model`` is None when the store holds fewer than two model sizes: the recommendation is then for the
    measured model(s) only, as ``note`` says.
    """

    asked: float
    model: str | None
    params: int | None
    measured: tuple[tuple[str, int], ...]
    inside: bool
    note: str

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        return json_ready({"asked": self.asked, "model": self.model, "params": self.params,
                           "measured": [{"model": m, "params": n} for m, n in self.measured],
                           "within_measured_range": self.inside, "note": self.note})


def nearest_size(views: list[RunView], params: float) -> tuple[list[RunView], SizeChoice]:
    """The runs of the measured model nearest ``params`` (on a log scale) when the store holds several sizes.

    With fewer than two model sizes of known parameter count, ``views`` come back unchanged and the choice says
    the recommendation is for the measured model only. A size outside the measured range takes the nearest end
    (nothing is extrapolated), and the note says so.
    """
    sizes = model_sizes(views)
    known = sorted((m for m in sizes.values() if m.params), key=lambda m: (m.params or 0, m.name))
    measured = tuple((m.name, int(m.params or 0)) for m in known)
    unknown = [m.name for m in sizes.values() if not m.params]
    left = f"; without a parameter count (no run keeps its weights in FP): {', '.join(unknown)}" if unknown else ""
    if len({m.params for m in known}) < 2:
        names = ", ".join(m.label for m in sizes.values())
        note = (f"the store holds one model size ({names}): the recommendation is for the measured model only, "
                f"not for a model of {params_text(params)} parameters{left}")
        return views, SizeChoice(params, None, None, measured, False, note)
    best = min(known, key=lambda m: (abs(math.log((m.params or 1) / params)), m.params or 0))
    lo, hi = known[0].params or 0, known[-1].params or 0
    inside = lo <= params <= hi
    where = ("within the measured range" if inside else
             f"outside the measured range ({params_text(lo)} to {params_text(hi)}): the nearest end, not an "
             "extrapolation")
    note = (f"for {params_text(params)} parameters: the nearest measured size, {best.label}, {where}; measured: "
            f"{', '.join(f'{n} ({params_text(p)})' for n, p in measured)}{left}")
    chosen = [v for v in views if v.record.model_fingerprint == best.fingerprint]
    return chosen, SizeChoice(params, best.name, best.params, measured, inside, note)
