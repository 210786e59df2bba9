"""Searches in the store: their measured front, baselines and the check of the signal's additivity.

``ptqlab search`` stores each run it asks for as an ordinary run of a sweep named after the search, and
the sweep's entry of each run holds what the search meant by it (:data:`ROLES`): its roles (a ``uniform``
menu point, the ``rule`` baseline, the ``searched`` allocation of a budget, or a ``validation``
allocation), the signal's sum for its allocation (``search.score``) and the base point's KL
(``search.offset``, for the ``kl`` signal). Everything here is computed from those entries and the runs'
stored metrics, so ``ptqlab search``, the report and anyone reading the store get the same numbers:

- the front: at each budget, the searched run's KL (mean with its 95 % interval, ``± 1.96 se``) against the
  best uniform menu point and the rule baseline at no more effective bits (``bits.weight``);
- where the runs measured their cost (``evaluate.speed``), the same front against the measured file's size
  (``size.file.gguf``) and the generation speed (llama.cpp's ``speed.llama_cpp.tg*``, else torch's);
- the additivity check: on the validation allocations, the predicted KL (the base point's KL plus the sum
  of the units' KL increases; for a proxy signal, its sum times a scale fitted by least squares on the
  uniform points) against the measured KL: Spearman's rank correlation (scale-free) and the error of the
  sum (mean absolute and relative error, and the mean signed error, the bias).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..metrics import BITS_WEIGHT, SIZE_MODEL_BYTES, file_size_name
from ..store import Store
from .runs import Z95, RunView

ROLES = "search.roles"
"""The key of a search's sweep entries that lists a run's roles in the search."""
KEY = "search.key"
"""The key of a search's sweep entries that says which signal and solver made them (the latest is summarized)."""
GOAL_IMPROVEMENT = 0.10
"""The issue's goal: the searched run's KL at least 10 % below each baseline at no more bits."""


@dataclass
class Point:
    """One run of a search: its roles, the signal's sum, its measured bits and KL (None while not stored)."""

    run_id: str
    roles: list[dict[str, Any]]
    score: float
    planned_bits: float | None
    bits: float | None = None
    size: float | None = None
    kl: float | None = None
    kl_se: float | None = None
    predicted: float | None = None
    file_bytes: float | None = None
    tps: float | None = None

    def has(self, role: str) -> bool:
        """Whether the run plays ``role`` in the search."""
        return any(r.get("role") == role for r in self.roles)

    def budgets(self, role: str) -> list[float]:
        """The budgets at which the run plays ``role`` (``searched`` or ``validation``)."""
        return sorted({float(r["budget"]) for r in self.roles if r.get("role") == role and "budget" in r})

    def interval(self) -> tuple[float, float] | None:
        """The 95 % interval of the measured KL, or None without a standard error."""
        if self.kl is None or self.kl_se is None:
            return None
        return self.kl - Z95 * self.kl_se, self.kl + Z95 * self.kl_se


@dataclass
class Additivity:
    """Predicted against measured KL on the validation allocations.

    Attributes:
        n: Validation runs measured.
        spearman: Spearman's rank correlation of the signal's sum with the measured KL (None for n < 3 or a
            constant side).
        mean_abs_error: Mean |predicted - measured| KL (nats).
        mean_rel_error: Mean |predicted - measured| / measured.
        bias: Mean predicted - measured.
        scale: The factor a proxy's sum is multiplied by (1 for ``kl``; None when it could not be fitted).

    """

    n: int
    spearman: float | None
    mean_abs_error: float | None
    mean_rel_error: float | None
    bias: float | None
    scale: float | None


@dataclass
class FrontRow:
    """A budget's searched run against the best uniform point and the rule baseline at no more bits."""

    budget: float
    searched: Point
    uniform: Point | None
    rule: Point | None

    def against(self, other: Point | None) -> dict[str, Any] | None:
        """The comparison with a baseline: relative KL reduction and whether the 95 % intervals are apart."""
        if other is None or other.kl is None or self.searched.kl is None:
            return None
        reduction = 1 - self.searched.kl / other.kl if other.kl > 0 else None
        mine, theirs = self.searched.interval(), other.interval()
        apart = None if mine is None or theirs is None else mine[1] < theirs[0]
        met = reduction is not None and reduction >= GOAL_IMPROVEMENT and apart is True
        return {"run": other.run_id, "bits": other.bits, "kl": other.kl, "kl_se": other.kl_se,
                "reduction": reduction, "intervals_apart": apart, "goal_met": met}


@dataclass
class SearchSummary:
    """A search as the store holds it."""

    name: str
    signal: str | None
    metric: str | None
    budget_kind: str | None
    points: list[Point] = field(default_factory=list)
    additivity: Additivity | None = None
    front: list[FrontRow] = field(default_factory=list)

    def role(self, role: str) -> list[Point]:
        """The runs playing ``role``."""
        return [p for p in self.points if p.has(role)]

    def searched_ratios(self) -> list[tuple[float, float]]:
        """``(budget, measured KL / predicted KL)`` of each budget's searched run, where both are known.

        The validation allocations check the signal on random allocations; this checks it where the solver
        went, on the allocations it chose because their predicted loss was least.
        """
        return [(r.budget, r.searched.kl / r.searched.predicted) for r in self.front
                if r.searched.kl is not None and r.searched.predicted is not None and r.searched.predicted > 0]

    def to_json(self) -> dict[str, Any]:
        """The summary as JSON data (strict: no NaN or infinity)."""
        def point(p: Point | None) -> dict[str, Any] | None:
            if p is None:
                return None
            return {"run": p.run_id, "roles": p.roles, "bits": p.bits, "planned_bits": p.planned_bits,
                    "file_bytes": p.file_bytes, "tps": p.tps,
                    "kl": p.kl, "kl_se": p.kl_se, "score": _finite(p.score), "predicted": _finite(p.predicted)}

        add = self.additivity
        return {
            "name": self.name, "signal": self.signal, "metric": self.metric, "budget_kind": self.budget_kind,
            "front": [{"budget": r.budget, "searched": point(r.searched), "uniform": r.against(r.uniform),
                       "rule": r.against(r.rule)} for r in self.front],
            "uniform": [point(p) for p in self.role("uniform")],
            "rule": [point(p) for p in self.role("rule")],
            "validation": [point(p) for p in self.role("validation")],
            "additivity": None if add is None else {k: _finite(v) for k, v in vars(add).items()},
            "searched_measured_over_predicted": [{"budget": b, "ratio": _finite(r)} for b, r in self.searched_ratios()],
        }


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def is_search(values: Mapping[str, Any]) -> bool:
    """Whether a sweep entry's values are a search's."""
    return ROLES in values


def search_names(store: Store) -> list[str]:
    """The names of the searches in the store (sweeps whose entries carry search roles)."""
    return [name for name in store.sweeps() if any(is_search(e.values) for e in store.sweep_entries(name))]


def summarize(name: str, entries: Mapping[str, Mapping[str, Any]],
              measured: Mapping[str, Mapping[str, tuple[float, float | None]]]) -> SearchSummary:
    """A search's front and additivity from its entries and its runs' measurements.

    Args:
        name: The search's name.
        entries: ``{run id: sweep entry values}`` of the search's runs.
        measured: ``{run id: {metric name: (value, stderr)}}`` of the runs that are stored as done.

    """
    entries = _latest(entries)
    first = next(iter(entries.values()), {})
    summary = SearchSummary(name, first.get("search.signal"), None, first.get("search.budget_kind"))
    metric = _kl_metric([measured[r] for r in entries if r in measured])
    summary.metric = metric
    for run_id, values in entries.items():
        point = Point(run_id, list(values.get(ROLES) or []), float(values.get("search.score") or 0.0),
                      values.get("search.bits"))
        got = measured.get(run_id)
        if got is not None:
            bits, size = got.get(BITS_WEIGHT), got.get(SIZE_MODEL_BYTES)
            point.bits = None if bits is None else bits[0]
            point.size = None if size is None else size[0]
            if metric is not None and metric in got:
                point.kl, point.kl_se = got[metric]
            point.file_bytes = _value(got, file_size_name("gguf"))
            point.tps = _value(got, _generation_metric(got))
        summary.points.append(point)
    offset = first.get("search.offset")
    scale = 1.0 if summary.signal == "kl" else _fit_scale(summary.role("uniform"))
    for p in summary.points:
        if scale is not None:
            p.predicted = (offset or 0.0) + scale * p.score if summary.signal == "kl" else scale * p.score
    summary.additivity = _additivity(summary.role("validation"), scale)
    summary.front = _front(summary)
    return summary


def _latest(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The entries of the search's latest signal and solver: those of its uniform points' key.

    Every run of a search registers its uniform points again, so their key is the last one's; searched and
    validation entries an earlier signal or solver left under the same name are not summarized with it.
    """
    keys = [v.get(KEY) for v in entries.values()
            if any(r.get("role") == "uniform" for r in v.get(ROLES) or [])]
    if not keys:
        return dict(entries)
    latest = max(set(keys), key=lambda k: (keys.count(k), str(k)))
    return {r: v for r, v in entries.items() if v.get(KEY) == latest}


def search_summary(store: Store, name: str) -> SearchSummary:
    """The summary of the search ``name`` as stored (runs not stored yet have no measurements)."""
    entries = {e.run_id: e.values for e in store.sweep_entries(name) if is_search(e.values)}
    measured = {r.id: {m.name: (m.value, m.stderr) for m in r.metrics}
                for r in store.list_runs(sweep=name, status="done")}
    return summarize(name, entries, measured)


def _value(got: Mapping[str, tuple[float, float | None]], name: str | None) -> float | None:
    return None if name is None or name not in got else got[name][0]


def _generation_metric(got: Mapping[str, Any]) -> str | None:
    """The run's generation speed metric: llama.cpp's where it was timed there, else torch's, else None."""
    for runtime in ("llama_cpp", "torch"):
        names = sorted(n for n in got if n.startswith(f"speed.{runtime}.tg"))
        if names:
            return names[0]
    return None


def _kl_metric(measured: Sequence[Mapping[str, Any]]) -> str | None:
    names = sorted({n for m in measured for n in m if n.startswith("kl.")})
    return names[0] if names else None


def _fit_scale(uniform: Sequence[Point]) -> float | None:
    """Least squares through the origin of measured KL on the signal's sum, over the uniform points."""
    pairs = [(p.score, p.kl) for p in uniform if p.kl is not None]
    den = math.fsum(s * s for s, _ in pairs)
    if not pairs or den <= 0:
        return None
    return math.fsum(s * k for s, k in pairs) / den


def ranks(xs: Sequence[float]) -> list[float]:
    """Ranks from 1, ties given their mean rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on mid-ranks), or None for fewer than 3 pairs or a constant side."""
    if len(xs) != len(ys) or len(xs) < 3:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = math.fsum((a - mx) ** 2 for a in rx)
    syy = math.fsum((b - my) ** 2 for b in ry)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def _additivity(validation: Sequence[Point], scale: float | None) -> Additivity:
    done = [p for p in validation if p.kl is not None]
    rho = spearman([p.score for p in done], [p.kl or 0.0 for p in done])
    pairs = [(p.predicted, p.kl) for p in done if p.predicted is not None and p.kl is not None]
    if not pairs:
        return Additivity(len(done), rho, None, None, None, scale)
    errors = [pred - kl for pred, kl in pairs]
    rel = [abs(e) / kl for e, (_, kl) in zip(errors, pairs, strict=True) if kl > 0]
    return Additivity(len(done), rho, math.fsum(abs(e) for e in errors) / len(errors),
                      math.fsum(rel) / len(rel) if rel else None, math.fsum(errors) / len(errors), scale)


def _front(summary: SearchSummary) -> list[FrontRow]:
    """Each budget's searched run against the best uniform point and the rule within the same budget.

    A baseline counts at a budget when it takes no more than the budget (``bits.weight`` for a bits budget,
    ``size.model_bytes`` for a bytes budget), as the searched run does: the rule at its own budget is compared
    with the search at that budget.
    """
    def size(p: Point) -> float | None:
        return p.bits if summary.budget_kind != "bytes" else p.size

    def within(p: Point, budget: float) -> bool:
        s = size(p)
        return p.kl is not None and s is not None and s <= budget * (1 + 1e-9)

    rows = []
    searched = sorted(((b, p) for p in summary.role("searched") for b in p.budgets("searched")), key=lambda x: x[0])
    for budget, p in searched:
        best = min((u for u in summary.role("uniform") if within(u, budget)), key=lambda u: (u.kl or 0.0, u.run_id),
                   default=None)
        rule = min((r for r in summary.role("rule") if within(r, budget)), key=lambda r: (r.kl or 0.0, r.run_id),
                   default=None)
        rows.append(FrontRow(budget, p, best, rule))
    return rows


# ---- the report -------------------------------------------------------------------------------------------------


def search_texts(store: Store, views: Sequence[RunView],
                 texts: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """``texts`` with, for each run of the views that a search asked for, ``texts[run]["search"]``.

    The text is JSON: a list of ``{"name": search, **its sweep entry's values}``, one per search the run is in.
    """
    out = {k: dict(v) for k, v in texts.items()}
    ids = {v.id for v in views}
    found: dict[str, list[dict[str, Any]]] = {}
    for name in store.sweeps():
        for e in store.sweep_entries(name):
            if e.run_id in ids and is_search(e.values):
                found.setdefault(e.run_id, []).append({"name": name, **e.values})
    for run_id, items in found.items():
        out.setdefault(run_id, {})["search"] = json.dumps(items, sort_keys=True)
    return out


def _cohort_searches(views: Sequence[RunView], texts: Mapping[str, Mapping[str, str]]) -> dict[str, SearchSummary]:
    """The searches with runs among ``views`` (one cohort), summarized from those runs alone."""
    entries: dict[str, dict[str, dict[str, Any]]] = {}
    for v in views:
        text = (texts.get(v.id) or {}).get("search")
        for item in json.loads(text) if text else []:
            entries.setdefault(item["name"], {})[v.id] = item
    measured = {v.id: {n: (x, v.stderr.get(n)) for n, x in v.metrics.items()} for v in views}
    return {name: summarize(name, found, measured) for name, found in sorted(entries.items())}


def search_figures(plt: Any, cohort: Any, out: Path, texts: Mapping[str, Mapping[str, str]]) -> list[Any]:
    """Per search with runs in the cohort: its front, baselines and validation scatter, as one figure.

    Args:
        plt: matplotlib's pyplot, set up by the report.
        cohort: The report's cohort (``views``, ``figure(...)``, ``caption(...)``: see
            :mod:`ptqlab.report.plots`).
        out: The figures' folder.
        texts: ``{run id: texts}`` with the ``search`` texts of :func:`search_texts`.

    Returns:
        The figures written.

    """
    figures = []
    for summary in _cohort_searches(cohort.views, texts).values():
        if summary.metric is None:
            continue
        figures.append(_figure(plt, cohort, out, summary))
    return figures


_AXES: dict[str, tuple[Any, str]] = {
    "bits": (lambda p: p.bits, "effective bits per decoder-linear weight (bits.weight)"),
    "file": (lambda p: None if p.file_bytes is None else p.file_bytes / 2**20, "measured GGUF file, MiB"),
    "speed": (lambda p: p.tps, "generation speed, tokens/s (measured)"),
}
"""The x axes a front is drawn against: what of a point, and the label."""


def _errorbar(ax: Any, points: Sequence[Point], x: Any = _AXES["bits"][0], **style: Any) -> None:
    pts = sorted((p for p in points if p.kl is not None and x(p) is not None), key=lambda p: (x(p), p.kl))
    if not pts:
        return
    ax.errorbar([x(p) for p in pts], [p.kl for p in pts],
                yerr=[Z95 * p.kl_se if p.kl_se is not None else 0.0 for p in pts], capsize=3, **style)


def _front_panel(ax: Any, summary: SearchSummary, axis: str) -> None:
    """The searched runs, the uniform points and the rule against one x axis (bits, file size or speed)."""
    x, label = _AXES[axis]
    _errorbar(ax, [r.searched for r in summary.front], x, fmt="o-", color="C0",
              label=f"searched ({summary.signal} signal)")
    _errorbar(ax, summary.role("uniform"), x, fmt="s", color="C1", label="uniform menu points")
    _errorbar(ax, summary.role("rule"), x, fmt="D", color="C2", label="rule (Q4_K_M-like)")
    ax.set_xlabel(label)
    ax.set_ylabel(f"KL(FP || Q), nats ({summary.metric})")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("measured front, 95 % intervals" if axis == "bits" else f"the same runs by {axis}")


_COST_WORDS = {"file": "the measured GGUF file's size", "speed": "the measured generation speed"}


def _figure(plt: Any, cohort: Any, out: Path, summary: SearchSummary) -> Any:
    from .tables import slug

    measured = [p for p in summary.points if p.kl is not None]
    axes = ["bits"] + [a for a in ("file", "speed") if sum(_AXES[a][0](p) is not None for p in measured) >= 2]
    fig, panels = plt.subplots(1, len(axes) + 1, figsize=(5 * (len(axes) + 1), 4))
    for ax, axis in zip(panels, axes, strict=False):
        _front_panel(ax, summary, axis)
    scatter = panels[-1]
    valid = [p for p in summary.role("validation") if p.kl is not None and p.predicted is not None]
    add = summary.additivity
    if valid:
        scatter.errorbar([p.predicted for p in valid], [p.kl for p in valid],
                         yerr=[Z95 * p.kl_se if p.kl_se is not None else 0.0 for p in valid], fmt="o", color="C3",
                         capsize=2, label="validation allocations")
        others = [p for p in summary.points if not p.has("validation") and p.kl is not None and p.predicted is not None]
        if others:
            scatter.plot([p.predicted for p in others], [p.kl for p in others], "x", color="0.4",
                         label="uniform, rule and searched")
        every = [x for p in [*valid, *others] for x in (p.predicted, p.kl) if x is not None and x > 0]
        if every:
            lo, hi = min(every), max(every)
            scatter.plot([lo, hi], [lo, hi], "-", color="0.6", lw=0.8, label="predicted = measured")
            scatter.set_xscale("log")
            scatter.set_yscale("log")
        scatter.legend(fontsize=7)
    scatter.set_xlabel("predicted KL (sum of the units' signal)")
    scatter.set_ylabel("measured KL")
    scatter.set_title("additivity check")
    runs = [p.run_id for p in summary.points if p.kl is not None]
    text = (f"Search {summary.name}: the searched allocation at each budget ({summary.budget_kind}), the uniform "
            f"menu points and the rule baseline, each with its 95 % interval (1.96 standard errors of the mean "
            f"per-token KL)"
            + ("" if len(axes) == 1 else f", against bits and against {' and '.join(_COST_WORDS[a] for a in axes[1:])}")
            + "; right, the validation allocations' measured KL against the signal's prediction.")
    if add is not None:
        rho = "n/a" if add.spearman is None else f"{add.spearman:.3f}"
        mae = "n/a" if add.mean_abs_error is None else f"{add.mean_abs_error:.4g}"
        mre = "n/a" if add.mean_rel_error is None else f"{100 * add.mean_rel_error:.1f} %"
        text += f" Additivity: Spearman {rho} over {add.n} validation runs; mean |error| of the sum {mae} ({mre})."
    ratios = summary.searched_ratios()
    if ratios:
        each = ", ".join(f"{r:.2f} at {b:g}" for b, r in ratios)
        text += f" The searched allocations measured {each} times their predicted KL."
    shown = [v for v in cohort.views if v.id in set(runs)]
    caption = cohort.caption(text, shown, ["kl"], sum(1 for p in summary.points if p.kl is not None
                                                      and p.kl_se is None))
    return cohort.figure(plt, fig, out, f"search-{slug(summary.name)}", f"Mixed-precision search {summary.name}",
                         caption, runs)
