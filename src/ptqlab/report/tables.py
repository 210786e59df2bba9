"""The report's tables, built from run views: ZeroQuant-V2's quality tables and qllm-eval's degradation tables.

Every row is one stored run (or one scheme with and without LoRC) and names the runs behind its numbers.
Cells hold raw values (numbers stay numbers for CSV and sorting); :mod:`.render` formats them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..metrics import MetricName, parse_name, task_name
from .runs import ZQ_CORPORA, Change, RunView, is_task_accuracy, quality, zq_class

__all__ = ["Table", "build_tables"]

Cell = str | float | int | None


@dataclass
class Table:
    """A titled table: columns, rows of raw cells and, per row, the run ids behind it."""

    key: str
    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    runs: list[list[str]] = field(default_factory=list)
    note: str = ""

    def add(self, cells: list[Cell], runs: Iterable[str]) -> None:
        """Append a row and the runs it comes from."""
        self.rows.append(cells)
        self.runs.append(list(runs))


def _bits(b: int | None) -> Cell:
    return 16 if b is None else b


def _quality_cells(q: Change | None) -> list[Cell]:
    """Mean ppl, its increase over FP, the standard error of the increase, the class."""
    if q is None:
        return [None, None, None, None]
    return [q.value, q.delta, q.stderr, zq_class(q.delta)]


def _delta_class(q: Change | None) -> list[Cell]:
    return [None, None] if q is None else [q.delta, zq_class(q.delta)]


QUALITY_COLUMNS = ["mean ppl", "Δ ppl", "± (se)", "class"]


def _order(v: RunView) -> tuple[Any, ...]:
    return (-(v.w_bits or 16), -(v.a_bits or 16), -(v.kv_bits or 16), v.granularity, v.symmetric, v.method, v.id)


def _weight_only(views: list[RunView]) -> Table:
    t = Table("zq-weight", "ZeroQuant-V2: weight-only (RTN)", ["W bits", "granularity", "symmetry", "bits/weight",
                                                              *QUALITY_COLUMNS])
    for v in sorted((v for v in views if v.target == "W" and v.method == "rtn" and not v.lorc), key=_order):
        t.add([v.w_bits, v.granularity, v.symmetric, v.weight_bits, *_quality_cells(quality(v))], [v.id])
    return t


def _activation_only(views: list[RunView]) -> Table:
    t = Table("zq-activation", "ZeroQuant-V2: activation-only", ["A bits", "granularity", "symmetry", *QUALITY_COLUMNS])
    for v in sorted((v for v in views if v.target == "A"), key=_order):
        act = v.scheme.get("activation") or {}
        sym = "sym" if act.get("symmetric") else "asym"
        t.add([v.a_bits, act.get("granularity") or "token", sym, *_quality_cells(quality(v))], [v.id])
    return t


def _weight_activation(views: list[RunView]) -> Table:
    t = Table("zq-weight-activation", "ZeroQuant-V2: weights and activations",
              ["W bits", "A bits", "granularity", "symmetry", "method", *QUALITY_COLUMNS])
    for v in sorted((v for v in views if v.target == "W+A"), key=_order):
        t.add([v.w_bits, v.a_bits, v.granularity, v.symmetric, v.method, *_quality_cells(quality(v))], [v.id])
    return t


def _methods(views: list[RunView]) -> Table:
    """Per weight scheme and method: quality without and with LoRC, and what LoRC gains."""
    t = Table("zq-methods", "ZeroQuant-V2: methods, without and with LoRC",
              ["W bits", "granularity", "symmetry", "method", "Δ ppl", "class", "Δ ppl +LoRC", "class +LoRC",
               "LoRC gain"])
    t.note = "LoRC gain: the increase over FP without LoRC minus the increase with it (positive: LoRC helps)."
    groups: dict[tuple[Any, ...], dict[bool, RunView]] = {}
    for v in views:
        if v.target == "W" and quality(v) is not None:
            groups.setdefault((v.w_bits, v.granularity, v.symmetric, v.method), {}).setdefault(v.lorc, v)
    for key in sorted(groups, key=lambda k: (-(k[0] or 16), k[1], k[2], k[3])):
        pair = groups[key]
        plain, lorc = (pair.get(False), pair.get(True))
        qp = quality(plain) if plain else None
        ql = quality(lorc) if lorc else None
        gain = qp.delta - ql.delta if qp and ql else None
        t.add([*key, *_delta_class(qp), *_delta_class(ql), gain], [v.id for v in (plain, lorc) if v is not None])
    return t


def _qllm(views: list[RunView], key: str, title: str, measures: list[tuple[str, Callable[[RunView], Cell]]],
          keep: Callable[[RunView], bool]) -> Table:
    t = Table(key, title, ["target", "bits", "scheme", *[m for m, _ in measures]])
    chosen = [v for v in views if keep(v)]
    for v in sorted(chosen, key=lambda v: (v.target != "FP", v.target, -(v.bits or 16), v.label, v.id)):
        t.add([v.target, _bits(v.bits), v.label, *[f(v) for _, f in measures]], [v.id])
    return t


def _names(views: list[RunView], keep: Callable[[MetricName], bool]) -> list[str]:
    return sorted({n for v in views for n in v.metrics if keep(parse_name(n))})


def _change(name: str, *, se: bool = False) -> Callable[[RunView], Cell]:
    """The run's change from FP on metric ``name`` (or its standard error)."""
    def cell(v: RunView) -> Cell:
        c = v.change(name)
        return None if c is None else c.stderr if se else c.delta
    return cell


def _value(name: str) -> Callable[[RunView], Cell]:
    return lambda v: v.metrics.get(name)


def _qllm_tables(views: list[RunView]) -> list[Table]:
    tables = []
    ppl = _names(views, lambda m: m.kind == "ppl" and m.corpus is not None)  # one column per protocol
    if ppl:
        measures: list[tuple[str, Callable[[RunView], Cell]]] = []
        for name in ppl:
            measures += [(f"Δ {name}", _change(name)), (f"± {parse_name(name).corpus}", _change(name, se=True))]
        tables.append(_qllm(views, "qllm-perplexity", "qllm-eval: perplexity change by target and bits", measures,
                            lambda v: any(n in v.metrics for n in ppl)))
    accs = _names(views, is_task_accuracy)
    if accs:
        measures = []
        for name in accs:
            task = str(parse_name(name).task)
            measures += [(f"Δ acc {task}", _change(name)), (f"± {task}", _change(name, se=True)),
                         (f"agree {task}", _value(task_name(task, "agree_fp")))]
        tables.append(_qllm(views, "qllm-tasks", "qllm-eval: basic tasks (accuracy change, paired with FP)", measures,
                            lambda v: any(n in v.metrics for n in accs)))
    kls = _names(views, lambda m: m.kind == "kl") + _names(views, lambda m: m.kind == "top1")
    if kls:
        tables.append(_qllm(views, "qllm-divergence", "qllm-eval: divergence from FP",
                            [(n, _value(n)) for n in kls], lambda v: any(n in v.metrics for n in kls)))
    ret = sorted(_names(views, lambda m: m.kind == "retrieval"), key=_retrieval_length)
    if ret:
        measures = []
        for n in ret:
            length = f"len{parse_name(n).length}"
            measures += [(f"{length} acc", _value(n)), (f"± {length}", _binomial_se(n)), (f"Δ {length}", _change(n))]
        tables.append(_qllm(views, "qllm-long-context", "qllm-eval: long-context retrieval accuracy", measures,
                            lambda v: any(n in v.metrics for n in ret)))
    return tables


def _binomial_se(name: str) -> Callable[[RunView], Cell]:
    """The standard error of a retrieval accuracy over its ``n<samples>`` samples (binomial)."""
    samples = parse_name(name).samples or 0

    def cell(v: RunView) -> Cell:
        p = v.metrics.get(name)
        return None if p is None or samples < 2 else math.sqrt(p * (1 - p) / samples)
    return cell


def _retrieval_length(name: str) -> int:
    return parse_name(name).length or 0


def build_tables(views: list[RunView]) -> list[Table]:
    """Every table the runs have data for (a table with no row is left out).

    ZeroQuant-V2's tables hold the runs with its three corpora when there are any, else every run with a
    perplexity (their quality is then the mean over their own corpora, as the tables' note says).
    """
    zq = [v for v in views if v.quality(ZQ_CORPORA) is not None]
    note = "Quality: mean perplexity over wikitext2, ptb_new and c4local_new"
    if not zq:
        zq = [v for v in views if quality(v) is not None]
        corpora = sorted({c for v in zq for c in v.perplexities()})
        note = f"Quality: mean perplexity over the runs' corpora ({', '.join(corpora)})"
    note += "; class by the increase over FP (<= 0.1: 1, <= 0.5: 2, else 3)."
    tables = [_weight_only(zq), _activation_only(zq), _weight_activation(zq), _methods(zq)]
    for t in tables:
        t.note = " ".join(x for x in (note, t.note) if x)
    return [t for t in [*tables, *_qllm_tables(views)] if t.rows]
