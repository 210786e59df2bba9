"""Stored runs as the report sees them: what each quantizes, how, and its change from full precision.

A :class:`RunView` is one finished run with the labels every table groups by (target, bits, granularity,
symmetry, method, LoRC) and its measurements as changes from FP with standard errors. FP values come from
the run itself where it stored them (the FP window NLLs of its perplexity windows, its paired task
measures) and otherwise from an FP run of the same model in the store, preferring one evaluated with the
same protocol.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..metrics import BITS_WEIGHT, SIZE_MODEL_BYTES, MetricName, parse_name, task_name
from ..quant.spec import FIXED_BITS
from ..store import RunRecord, Store

__all__ = ["Change", "RunView", "describe_scheme", "load_views", "part_label", "quality", "zq_class"]

ZQ_CORPORA = ("wikitext2", "ptb_new", "c4local_new")



def is_task_accuracy(name: str | MetricName) -> bool:
    """Whether a metric is an lm-eval task's plain accuracy (``lm_eval.<task>.acc``, no few-shot count)."""
    m = parse_name(name) if isinstance(name, str) else name
    return m.kind == "lm_eval" and m.measure == "acc" and m.shots is None

@dataclass(frozen=True)
class Change:
    """A measurement of a quantized run against FP: both values, their difference and its standard error."""

    value: float
    fp: float
    stderr: float | None = None

    @property
    def delta(self) -> float:
        """The quantized value minus the FP value."""
        return self.value - self.fp

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """The normal interval of :attr:`delta` (the point itself when there is no standard error)."""
        half = z * (self.stderr or 0.0)
        return self.delta - half, self.delta + half


def part_label(prefix: str, section: Mapping[str, Any] | None) -> str | None:
    """``W4 group64`` / ``Anf4`` / ``KV4 head``, or None for a full-precision part."""
    if section is None or section_bits(section) is None:
        return None
    fmt = section.get("format") or "int"
    size = str(section.get("bits")) if fmt == "int" else fmt
    gran = section.get("granularity") or ""
    return f"{prefix}{size} {gran}{section.get('group_size') or ''}".strip()


def describe_scheme(scheme: Mapping[str, Any]) -> str:
    """A short description of a scheme, e.g. ``W4 group64 + A8 token + KV4 head`` (``FP`` if none)."""
    keys = (("W", "weight"), ("A", "activation"), ("KV", "kv_cache"))
    parts = [part_label(prefix, scheme.get(key)) for prefix, key in keys]
    return " + ".join(p for p in parts if p) or "FP"


def section_bits(section: Mapping[str, Any] | None) -> int | None:
    """The bits a scheme section quantizes to (a format's own bits), or None when it stays in full precision."""
    if not section:
        return None
    fmt = section.get("format") or "int"
    bits = section.get("bits") if fmt == "int" else FIXED_BITS.get(fmt, section.get("bits"))
    return None if bits is None or bits >= 16 else int(bits)


@dataclass
class RunView:
    """One finished run, labelled for the tables, with its FP baselines attached."""

    record: RunRecord
    sweeps: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float | None] = field(default_factory=dict)
    fp: dict[str, float] = field(default_factory=dict)
    fp_stderr: dict[str, float | None] = field(default_factory=dict)
    paired_se: dict[str, float] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The run id."""
        return self.record.id

    @property
    def scheme(self) -> dict[str, Any]:
        """The run's scheme section."""
        return dict(self.record.config.get("scheme") or {})

    @property
    def w_bits(self) -> int | None:
        """Weight bits (None: FP weights)."""
        return section_bits(self.scheme.get("weight"))

    @property
    def a_bits(self) -> int | None:
        """Activation bits (None: FP activations)."""
        return section_bits(self.scheme.get("activation"))

    @property
    def kv_bits(self) -> int | None:
        """KV-cache bits (None: FP cache)."""
        return section_bits(self.scheme.get("kv_cache"))

    @property
    def target(self) -> str:
        """What is quantized: ``FP``, ``W``, ``A``, ``KV``, ``W+A``, ``W+KV``, ``A+KV`` or ``W+A+KV``."""
        parts = [p for p, b in (("W", self.w_bits), ("A", self.a_bits), ("KV", self.kv_bits)) if b is not None]
        return "+".join(parts) or "FP"

    @property
    def bits(self) -> int | None:
        """The lowest bits among the quantized parts (None for FP)."""
        found = [b for b in (self.w_bits, self.a_bits, self.kv_bits) if b is not None]
        return min(found) if found else None

    @property
    def steps(self) -> list[str]:
        """The recipe's method names in order."""
        return [next(iter(step)) for step in self.record.config.get("recipe") or []]

    @property
    def lorc(self) -> bool:
        """Whether LoRC compensates the quantized weights."""
        return "lorc" in self.steps

    @property
    def method(self) -> str:
        """The weight method: the recipe without LoRC (``rtn`` for quantized weights with no recipe)."""
        names = [s for s in self.steps if s != "lorc"]
        if not names:
            return "rtn" if self.w_bits is not None else "-"
        return "+".join(names)

    @property
    def granularity(self) -> str:
        """The weight granularity: ``row`` (per output channel), ``g<size>``, ``tensor`` or ``-``."""
        weight = self.scheme.get("weight")
        if self.w_bits is None or not weight:
            return "-"
        gran = weight.get("granularity") or "channel"
        if gran == "group":
            return f"g{weight.get('group_size')}"
        return "row" if gran == "channel" else str(gran)

    @property
    def symmetric(self) -> str:
        """``sym`` / ``asym`` for the weights (``-`` for FP weights)."""
        weight = self.scheme.get("weight")
        if self.w_bits is None or not weight:
            return "-"
        return "sym" if weight.get("symmetric") else "asym"

    @property
    def label(self) -> str:
        """A short human label: scheme and recipe."""
        recipe = "+".join(self.steps)
        return describe_scheme(self.scheme) + (f" [{recipe}]" if recipe else "")

    @property
    def weight_bits(self) -> float | None:
        """Effective bits per weight (scales, zeros and LoRC factors counted)."""
        return self.metrics.get(BITS_WEIGHT)

    @property
    def size_bytes(self) -> float | None:
        """The model's size in bytes as quantized."""
        return self.metrics.get(SIZE_MODEL_BYTES)

    def change(self, name: str) -> Change | None:
        """The run's ``name`` against FP, or None when either side is missing."""
        if name not in self.metrics or name not in self.fp:
            return None
        se = self.paired_se.get(name)
        if se is None:
            errs = [e for e in (self.stderr.get(name), self.fp_stderr.get(name)) if e is not None]
            se = math.sqrt(sum(e * e for e in errs)) if errs else None
        return Change(self.metrics[name], self.fp[name], se)

    def perplexities(self, corpora: Iterable[str] | None = None) -> dict[str, str]:
        """``{corpus: metric name}`` of the run's perplexities (only ``corpora`` when given)."""
        wanted = None if corpora is None else set(corpora)
        out: dict[str, str] = {}
        for name in sorted(self.metrics):
            m = parse_name(name)
            if m.kind == "ppl" and m.corpus is not None and (wanted is None or m.corpus in wanted):
                out.setdefault(m.corpus, name)
        return out

    def quality(self, corpora: Iterable[str] = ZQ_CORPORA) -> Change | None:
        """ZeroQuant-V2's quality: the mean perplexity over ``corpora`` against FP's (None if any is missing)."""
        corpora = tuple(corpora)
        names = self.perplexities(corpora)
        changes = [self.change(names[c]) for c in corpora if c in names]
        if len(names) != len(corpora) or any(c is None for c in changes):
            return None
        found = [c for c in changes if c is not None]
        n = len(found)
        errs = [c.stderr for c in found]
        se = None if any(e is None for e in errs) else math.sqrt(sum(e * e for e in errs if e is not None)) / n
        return Change(sum(c.value for c in found) / n, sum(c.fp for c in found) / n, se)


def quality(v: RunView) -> Change | None:
    """ZeroQuant-V2's quality when the run has its three corpora, else the mean over the run's own corpora."""
    return v.quality(ZQ_CORPORA) or v.quality(v.perplexities())


def zq_class(delta: float) -> int:
    """ZeroQuant-V2's sensitivity class of a perplexity increase: 1 (<= 0.1), 2 (<= 0.5) or 3."""
    return 1 if delta <= 0.1 else 2 if delta <= 0.5 else 3


def load_views(store: Store, runs: list[RunRecord] | None = None) -> list[RunView]:
    """Views of the store's finished runs (or of ``runs``) with FP baselines attached, oldest first."""
    records = runs if runs is not None else store.list_runs(status="done")
    membership = store.memberships()
    missing = [r.id for r in records if not r.windows]  # records from ``get`` carry theirs already
    windows = store.windows(missing) if missing else {}
    views = [_view(r, membership.get(r.id, []), r.windows or windows.get(r.id, {})) for r in records]
    # FP runs outside ``runs`` can be the baseline too (every finished run is in ``records`` already when None)
    outside = [] if runs is None else [r for r in store.list_runs(status="done") if r.id not in {v.id for v in views}]
    fps = _fp_candidates([*views, *(_view(r, [], {}) for r in outside)])
    for v in views:
        _attach_fp(v, fps)
    return views


def _view(record: RunRecord, sweeps: list[str], windows: Mapping[str, Mapping[str, Any]]) -> RunView:
    view = RunView(record, sweeps=sweeps)
    view.metrics = {m.name: m.value for m in record.metrics}
    view.stderr = {m.name: m.stderr for m in record.metrics}
    for name, w in windows.items():
        nll, fp_nll = w.get("nll") or [], w.get("fp_nll")
        if not fp_nll or len(fp_nll) != len(nll) or not nll or name not in view.metrics:
            continue
        view.fp[name] = math.exp(statistics.fmean(fp_nll))
        diffs = [a - b for a, b in zip(nll, fp_nll, strict=True)]
        if len(diffs) > 1:
            view.paired_se[name] = view.metrics[name] * statistics.stdev(diffs) / math.sqrt(len(diffs))
    for name in list(view.metrics):
        task = _task_paired(view, name)
        if task is not None:
            view.fp.setdefault(name, task[0])
            if task[1] is not None:
                view.paired_se[name] = task[1]
    return view


def _task_paired(view: RunView, name: str) -> tuple[float, float | None] | None:
    """FP accuracy and the paired standard error of the change, from the run's own paired measures.

    ``gained - lost`` is the accuracy change over the items both answered (lm-eval's ``acc``); the number
    of items comes from lm-eval's standard error of the accuracy.
    """
    m = parse_name(name)
    if m.kind != "lm_eval" or m.task is None or m.measure != "acc" or m.shots is not None:
        return None
    lost, gained = view.metrics.get(task_name(m.task, "lost")), view.metrics.get(task_name(m.task, "gained"))
    if lost is None or gained is None:
        return None
    acc, se = view.metrics[name], view.stderr.get(name)
    fp = acc - gained + lost
    n = acc * (1 - acc) / (se * se) + 1 if se else None
    if n is None or n < 2:
        return fp, None
    diff = gained - lost
    return fp, math.sqrt(max(gained + lost - diff * diff, 0.0) / (n - 1))


def _fp_candidates(views: list[RunView]) -> list[RunView]:
    """FP runs: the views that quantize nothing."""
    return [v for v in views if v.target == "FP" and not v.steps]


def _protocol(view: RunView) -> str:
    evaluate = dict(view.record.config.get("evaluate") or {})
    evaluate.pop("adaptive", None)
    return json.dumps(evaluate, sort_keys=True)


def _attach_fp(view: RunView, fps: list[RunView]) -> None:
    """FP values for the metrics the run has no FP value of: same model, same protocol first."""
    same = [f for f in fps if f.record.model_fingerprint == view.record.model_fingerprint and f.id != view.id]
    same.sort(key=lambda f: (_protocol(f) != _protocol(view), f.record.created_at))
    for name in view.metrics:
        if name in view.fp:
            continue
        for f in same:
            if name in f.metrics:
                view.fp[name] = f.metrics[name]
                view.fp_stderr[name] = f.stderr.get(name)
                break
    if view.target == "FP" and not view.steps:
        for name, value in view.metrics.items():
            view.fp.setdefault(name, value)
