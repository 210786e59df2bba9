"""The report's figures (matplotlib, Agg), one set per cohort: one model under one evaluation protocol.

No figure draws runs of two protocols or two models together (their numbers are not comparable); each
title names the model and each caption the protocol and its sample sizes. Every point carries its 95 %
error bar (1.96 standard errors; Wilson intervals for accuracies of a known number of samples); a point
without a standard error is said to be so in the caption. Perplexity increases are drawn on a symmetric
log axis, linear near 0, so a negative increase (the quantized run better than FP) is drawn where it is,
never clipped.

Figures: quality against effective bits with the Pareto front; perplexity increase against bits (one line
per scheme with its bit width open: W4A8 and W4A4 are on different lines); task accuracy change against
bits, per task; the few-shot curve (accuracy and calibration error against shots, per scheme);
long-context retrieval against length; KL against accuracy change; quality against the model file's size
and against generation speed, with their Pareto fronts, where runs measured them; and per-module
sensitivity heatmaps, in layer order, on one colour scale shared by every heatmap of the report.

Each figure is written as PNG and SVG (text as paths, no date: the same runs give the same files).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..metrics import BITS_ACTIVATION, BITS_KV, BITS_WEIGHT, parse_name, task_name
from ..store import RunRecord
from .cost import SpeedMetric, measured_size, run_size, speed, speed_metrics, speed_settings
from .runs import Z95, RunView, quality, wilson
from .search import search_figures
from .tables import (
    Section,
    model_label,
    model_labels,
    model_params,
    protocol_sections,
    run_label,
    sample_sizes,
    series_label,
    slug,
    swept_bits,
)

__all__ = ["CostPanel", "Figure", "cost_panels", "draw_figures", "pareto_front", "sensitivity_grid"]

LINTHRESH = 0.1  # the symmetric-log axes of perplexity increases are linear within ±0.1 (ZeroQuant-V2's class 1)
TARGET_BITS = {"W": BITS_WEIGHT, "W+A": BITS_WEIGHT, "W+KV": BITS_WEIGHT, "W+A+KV": BITS_WEIGHT,
               "A": BITS_ACTIVATION, "KV": BITS_KV, "A+KV": BITS_ACTIVATION}
SYMLOG_NOTE = (f"The y axis is symmetric-logarithmic, linear within ±{LINTHRESH:g}: increases below 0 (the quantized "
               "run better than FP) are drawn as measured, not clipped.")


@dataclass
class Figure:
    """A written figure: its files, title, caption, the runs it shows and its protocol section."""

    key: str
    title: str
    caption: str
    png: Path
    svg: Path
    runs: list[str] = field(default_factory=list)
    section: int = 1


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (smaller is better on both), by x.

    A point is dominated when another is at most as large on both axes and smaller on one; two equal points
    do not dominate each other, so both are on the front when one is. To prefer larger values on an axis,
    pass it negated.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best = math.inf
    for i in order:
        if points[i][1] < best or (front and points[i] == points[front[-1]]):
            front.append(i)
            best = points[i][1]
    return front


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "path", "svg.hashsalt": "ptqlab", "figure.dpi": 100, "font.size": 9})
    return plt


def _save(plt: Any, fig: Any, out: Path, key: str) -> tuple[Path, Path]:
    png, svg = out / f"{key}.png", out / f"{key}.svg"
    fig.tight_layout()
    fig.savefig(png, metadata={"Software": None})
    fig.savefig(svg, metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return png, svg


@dataclass
class _Cohort:
    """The runs of one model under one protocol, and how its figures are named and captioned."""

    section: Section
    views: list[RunView]
    model: str
    model_slug: str
    multi: bool

    def key(self, base: str) -> str:
        return base + self.section.suffix + (f"-{self.model_slug}" if self.multi else "")

    def title(self, text: str) -> str:
        return f"{text}: {self.model}{self.section.title_suffix}"

    def figure(self, plt: Any, fig: Any, out: Path, base: str, title: str, caption: str,
               runs: list[str]) -> Figure:
        """Write ``fig`` under this cohort's key for ``base``; the figure with its title and caption."""
        key = self.key(base)
        png, svg = _save(plt, fig, out, key)
        return Figure(key, self.title(title), caption, png, svg, runs, self.section.index)

    def caption(self, text: str, shown: Sequence[RunView], kinds: Sequence[str], missing: int = 0) -> str:
        sizes = sample_sizes(shown, kinds)
        parts = [text, f"Model: {self.model}.", f"Protocol: {self.section.protocol.describe()}."]
        if sizes:
            parts.append(f"Sample sizes: {sizes}.")
        if missing:
            parts.append(f"{missing} point{'s have' if missing > 1 else ' has'} no standard error, hence no bar.")
        return " ".join(parts)


def _yerr(ses: Sequence[float | None]) -> tuple[list[float], int]:
    """95 % half-widths (0 where there is no standard error) and how many are missing."""
    return [Z95 * s if s is not None else 0.0 for s in ses], sum(1 for s in ses if s is None)


def _symlog(ax: Any, ys: Sequence[float], errs: Sequence[float]) -> None:
    """A symmetric-log y axis spanning the points and their bars, 0 included (nothing clipped)."""
    ax.set_yscale("symlog", linthresh=LINTHRESH)
    ax.axhline(0, color="0.6", lw=0.8)
    lo = min([0.0, *(y - e for y, e in zip(ys, errs, strict=True))])
    hi = max([LINTHRESH, *(y + e for y, e in zip(ys, errs, strict=True))])
    ax.set_ylim(lo * 2 if lo < 0 else -LINTHRESH / 2, hi * 2)


def _panel_of(v: RunView) -> str:
    """The Pareto panel of a run: its target, with the bits of the parts not on the x axis (``W+A, A8``)."""
    if "+" not in v.target:
        return v.target
    others = [f"{p}{b}" for p, b in (("A", v.a_bits), ("KV", v.kv_bits)) if b is not None and p != v.target[0]]
    return f"{v.target}, {' '.join(others)}"


def _pareto(plt: Any, c: _Cohort, out: Path) -> Figure | None:
    panels: dict[str, list[tuple[float, float, float | None, RunView]]] = {}
    for v in c.views:
        q, name = quality(v), TARGET_BITS.get(v.target)
        if q is not None and name is not None and name in v.metrics:
            panels.setdefault(_panel_of(v), []).append((v.metrics[name], q.delta, q.stderr, v))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.5), squeeze=False)
    shown: list[RunView] = []
    missing = 0
    for ax, (panel, pts) in zip(axes[0], sorted(panels.items()), strict=True):
        front = pareto_front([(x, y) for x, y, _, _ in pts])
        err, miss = _yerr([p[2] for p in pts])
        missing += miss
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=err, fmt="o", ms=4, color="0.55", ecolor="0.7",
                    capsize=2, label="runs")
        ys, errs = [p[1] for p in pts], err
        fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
        ax.errorbar(fx, fy, yerr=[err[i] for i in front], fmt="o-", ms=5, color="C3", capsize=2,
                    label="Pareto front")
        _symlog(ax, ys, errs)
        target = panel.split(",")[0]
        ax.set_xlabel(f"effective bits ({TARGET_BITS[target].split('.')[1]})")
        ax.set_ylabel("Δ perplexity over FP (quality)")
        ax.set_title(f"target {panel}")
        ax.legend(fontsize=7)
        shown += [p[3] for p in pts]
    fig.suptitle(c.model, fontsize=9)
    return c.figure(plt, fig, out, "pareto", "Quality against effective bits, Pareto front per target",
                    c.caption("Quality: the mean perplexity over the protocol's corpora. Each point is a run with its "
                              "95 % interval (1.96 standard errors, paired with FP over the windows); the red line "
                              "joins the runs no other run beats on both bits and quality (point estimates). W+A "
                              "panels are split by activation bits. " + SYMLOG_NOTE,
                              shown, ["ppl"], missing),
                    [v.id for v in shown])


def _series_lines(views: Sequence[RunView], value: Callable[[RunView], tuple[float, float | None] | None]
                  ) -> dict[str, dict[int, tuple[float, float | None, RunView]]]:
    """``{series: {bits: (y, se, run)}}``; of two runs at one point of a series, the older is kept."""
    lines: dict[str, dict[int, tuple[float, float | None, RunView]]] = {}
    for v in views:
        b, y = swept_bits(v), value(v)
        if b is not None and y is not None:
            lines.setdefault(series_label(v), {}).setdefault(b, (y[0], y[1], v))
    return lines


def _draw_lines(ax: Any, lines: dict[str, dict[int, tuple[float, float | None, RunView]]],
                colors: Mapping[str, str] | None = None) -> tuple[list[RunView], int, list[float], list[float]]:
    """One line with error bars per series; the runs drawn, the points without a standard error, the ys and bars."""
    shown: list[RunView] = []
    missing = 0
    ys: list[float] = []
    errs: list[float] = []
    xs: set[int] = set()
    for series, pts in sorted(lines.items()):
        bits = sorted(pts, reverse=True)
        err, miss = _yerr([pts[b][1] for b in bits])
        missing += miss
        ax.errorbar(bits, [pts[b][0] for b in bits], yerr=err, fmt="o-", ms=4, capsize=2, label=series,
                    color=(colors or {}).get(series))
        shown += [pts[b][2] for b in bits]
        ys += [pts[b][0] for b in bits]
        errs += err
        xs.update(bits)
    ax.set_xticks(sorted(xs))
    ax.set_xlim(max(xs) + 0.5, min(xs) - 0.5)  # fewer bits to the right
    ax.set_xlabel("bits (b)")
    return shown, missing, ys, errs


def _quality_point(v: RunView) -> tuple[float, float | None] | None:
    q = quality(v)
    return None if q is None else (q.delta, q.stderr)


def _loss_by_bits(plt: Any, c: _Cohort, out: Path) -> Figure | None:
    chosen = [v for v in c.views if v.bits is not None and not v.lorc and v.method in ("rtn", "-")]
    by_target: dict[str, list[RunView]] = {}
    for v in chosen:
        if _quality_point(v) is not None:
            by_target.setdefault(v.target, []).append(v)
    if not by_target:
        return None
    fig, axes = plt.subplots(1, len(by_target), figsize=(4.4 * len(by_target), 3.8), squeeze=False)
    shown: list[RunView] = []
    missing = 0
    for ax, (target, views) in zip(axes[0], sorted(by_target.items()), strict=True):
        s, m, ys, errs = _draw_lines(ax, _series_lines(views, _quality_point))
        shown, missing = shown + s, missing + m
        _symlog(ax, ys, errs)
        ax.set_ylabel("Δ perplexity over FP")
        ax.set_title(f"target {target}")
        ax.legend(fontsize=6, title="scheme", title_fontsize=6)
    fig.suptitle(c.model, fontsize=9)
    return c.figure(plt, fig, out, "loss-by-bits", "Perplexity increase against bits, one line per scheme",
                    c.caption("RTN runs without LoRC; each line is one scheme with its bit width b open (W4A8 and "
                              "W4A4 are different lines), each point its mean perplexity increase over FP with the "
                              "95 % interval. " + SYMLOG_NOTE, shown, ["ppl"], missing),
                    [v.id for v in shown])


def _task_accuracies(views: Sequence[RunView]) -> list[str]:
    return sorted({n for v in views for n in v.metrics
                   if (m := parse_name(n)).kind == "lm_eval" and m.measure == "acc" and m.shots is None})


def _accuracy_by_bits(plt: Any, c: _Cohort, out: Path) -> Figure | None:
    names = _task_accuracies(c.views)
    if not names:
        return None
    quantized = [v for v in c.views if swept_bits(v) is not None]
    panels = []
    for name in names:
        def point(v: RunView, n: str = name) -> tuple[float, float | None] | None:
            ch = v.change(n)
            return None if ch is None else (ch.delta, ch.stderr)
        lines = _series_lines(quantized, point)
        if lines:
            panels.append((name, lines))
    if not panels:
        return None
    cols = 2 if len(panels) == 4 else min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    names_all = sorted({series for _, lines in panels for series in lines})
    colors = {series: f"C{i % 10}" for i, series in enumerate(names_all)}
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 1.2), squeeze=False)
    shown: list[RunView] = []
    missing = 0
    for ax, (name, lines) in zip(axes.flat, panels, strict=False):
        s, m, _, _ = _draw_lines(ax, lines, colors)
        shown, missing = shown + s, missing + m
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_ylabel("Δ accuracy over FP")
        ax.set_title(str(parse_name(name).task))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    found = {t: h for ax in axes.flat for h, t in zip(*ax.get_legend_handles_labels(), strict=True)}
    texts = [t for t in names_all if t in found]
    handles = [found[t] for t in texts]
    fig.legend(handles, texts, loc="lower center", ncol=2, fontsize=6, title="scheme (b: the x axis)",
               title_fontsize=6)
    fig.suptitle(c.model, fontsize=9)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * math.ceil(len(texts) / 2), 1, 1))
    return c.figure(plt, fig, out, "accuracy-by-bits", "Task accuracy change against bits, per task",
                    c.caption("Each line is one scheme with its bit width b open, each point its accuracy change from "
                              "FP with the 95 % interval (paired over the items where the run stored its answers "
                              "against FP's, else the two Wilson intervals combined).", shown, ["lm_eval"], missing),
                    sorted({v.id for v in shown}))


def _shots_of(views: Sequence[RunView]) -> dict[str, list[int]]:
    """``{task: shot counts}`` of the few-shot curves the runs stored (``lm_eval.<task>.acc.fewshot<k>``)."""
    out: dict[str, set[int]] = {}
    for v in views:
        for n in v.metrics:
            m = parse_name(n)
            if m.kind == "lm_eval" and m.measure == "acc" and m.shots is not None and m.task:
                out.setdefault(m.task, set()).add(m.shots)
    return {t: sorted(s) for t, s in sorted(out.items()) if len(s) > 1}


def _ece_se(text: str | None) -> float | None:
    """The standard error of an ECE from its reliability curve: each bin's accuracy as binomial, confidences fixed."""
    if not text:
        return None
    curve = json.loads(text)
    n = curve.get("n") or 0
    if n <= 0:
        return None
    var = sum((b["count"] / n) ** 2 * b["accuracy"] * (1 - b["accuracy"]) / b["count"]
              for b in curve.get("bins", []) if b.get("count") and b.get("accuracy") is not None)
    return math.sqrt(var)


def _fewshot(plt: Any, c: _Cohort, out: Path, texts: Mapping[str, Mapping[str, str]]) -> Figure | None:
    curves = _shots_of(c.views)
    if not curves:
        return None
    fig, axes = plt.subplots(len(curves), 2, figsize=(9.0, 3.2 * len(curves) + 0.6), squeeze=False)
    shown: dict[str, RunView] = {}
    missing = 0
    for (task, shots), (ax_acc, ax_ece) in zip(curves.items(), axes, strict=True):
        runs = [v for v in c.views if any(task_name(task, f"acc.fewshot{k}") in v.metrics for k in shots)]
        for v in sorted(runs, key=lambda v: (swept_bits(v) is not None, -(swept_bits(v) or 16), run_label(v))):
            acc = [(k, v.metrics[n], v.stderr.get(n)) for k in shots if (n := task_name(task, f"acc.fewshot{k}"))
                   in v.metrics]
            err, miss = _yerr([se for _, _, se in acc])
            missing += miss
            line = ax_acc.errorbar([k for k, _, _ in acc], [a for _, a, _ in acc], yerr=err, fmt="o-", ms=4,
                                   capsize=2, label=run_label(v))
            ece = [(k, v.metrics[n], _ece_se(texts.get(v.id, {}).get(task_name(task, f"reliability.fewshot{k}"))))
                   for k in shots if (n := task_name(task, f"ece.fewshot{k}")) in v.metrics]
            if ece:
                err, miss = _yerr([se for _, _, se in ece])
                missing += miss
                ax_ece.errorbar([k for k, _, _ in ece], [e for _, e, _ in ece], yerr=err, fmt="o-", ms=4, capsize=2,
                                color=line[0].get_color())
            shown[v.id] = v
        ax_acc.set_title(f"{task}: accuracy")
        ax_ece.set_title(f"{task}: expected calibration error")
        for ax in (ax_acc, ax_ece):
            ax.set_xlabel("few-shot examples")
            ax.set_xticks(shots)
        ax_acc.legend(fontsize=6)
    fig.suptitle(c.model, fontsize=9)
    return c.figure(plt, fig, out, "fewshot",
                    "Few-shot curve: accuracy and calibration error against shots, per scheme",
                    c.caption("Each line is one run. Accuracy bars: 1.96 times lm-eval's standard error. Calibration "
                              "error bars: 1.96 times a binomial standard error of each confidence bin's accuracy, "
                              "combined over the bins with the confidences taken as fixed.",
                              list(shown.values()), ["lm_eval"], missing),
                    list(shown))


def _retrieval_length(name: str) -> int:
    return parse_name(name).length or 0


def _long_context(plt: Any, c: _Cohort, out: Path) -> Figure | None:
    chosen = [v for v in c.views if v.target in ("FP", "KV") and any(n.startswith("retrieval.") for n in v.metrics)]
    if not chosen:
        return None
    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    for v in sorted(chosen, key=lambda v: -(v.kv_bits or 16)):
        names = sorted((n for n in v.metrics if n.startswith("retrieval.")), key=_retrieval_length)
        ys = [v.metrics[n] for n in names]
        lo, hi = [], []
        for n, y in zip(names, ys, strict=True):
            a, b = wilson(y, parse_name(n).samples or 1)
            lo.append(max(y - a, 0.0))
            hi.append(max(b - y, 0.0))
        ax.errorbar([_retrieval_length(n) for n in names], ys, yerr=[lo, hi], fmt="o-", ms=4, capsize=2,
                    label=run_label(v))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("retrieval accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=6)
    ax.set_title(c.model, fontsize=9)
    return c.figure(plt, fig, out, "long-context",
                    "Long-context retrieval accuracy against length per KV-cache config",
                    c.caption("Pass-key retrieval accuracy of the FP and KV-quantized runs, with 95 % Wilson "
                              "intervals.", chosen, ["retrieval"]),
                    [v.id for v in chosen])


def _kl_vs_acc(plt: Any, c: _Cohort, out: Path) -> Figure | None:
    pts: list[tuple[float, float | None, float, float | None, RunView]] = []
    for v in c.views:
        kls = sorted(n for n in v.metrics if parse_name(n).kind == "kl")
        changes = [ch for n in _task_accuracies([v]) if (ch := v.change(n)) is not None]
        if kls and changes and v.target != "FP":
            ses = [ch.stderr for ch in changes]
            se = None if any(s is None for s in ses) else math.sqrt(sum(s * s for s in ses if s)) / len(ses)
            pts.append((v.metrics[kls[0]], v.stderr.get(kls[0]), sum(ch.delta for ch in changes) / len(changes),
                        se, v))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    missing = 0
    for target in sorted({p[4].target for p in pts}):
        sel = [p for p in pts if p[4].target == target]
        yerr, miss = _yerr([p[3] for p in sel])
        xerr, _ = _yerr([p[1] for p in sel])
        missing += miss
        ax.errorbar([p[0] for p in sel], [p[2] for p in sel], yerr=yerr, xerr=xerr, fmt="o", ms=4, capsize=2,
                    label=target)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("KL divergence from FP (nats per token)")
    ax.set_ylabel("mean accuracy change over the tasks")
    ax.legend(title="target", fontsize=7)
    ax.set_title(c.model, fontsize=9)
    kl_se = any(p[1] is not None for p in pts)
    return c.figure(plt, fig, out, "kl-vs-accuracy", "KL divergence against accuracy change",
                    c.caption("Each point is a run with both measurements: the mean accuracy change over the tasks "
                              "with its 95 % interval" + (" and the KL with its own." if kl_se else
                                                     "; the KL has no standard error stored (no horizontal bar)."),
                              [p[4] for p in pts], ["lm_eval", "kl"], missing),
                    [p[4].id for p in pts])


# ---- quality against cost ------------------------------------------------------------------------------------

LABEL_ALL = 12  # a cost panel with at most this many runs labels every point; a larger one labels its front


@dataclass(frozen=True)
class _Point:
    """A run on a cost panel: x (MiB or tokens/s) with its 95 % half-width, quality's change with its se."""

    x: float
    x_half: float | None
    y: float
    y_se: float | None
    view: RunView


@dataclass
class CostPanel:
    """One panel of the cost figure: quality against size (``size``) or generation speed (``speed``).

    ``axis`` is the x axis in words; :attr:`front` the points on the Pareto front (smaller size, or higher
    speed, and lower quality change).
    """

    name: str
    points: list[_Point]
    axis: str

    @property
    def front(self) -> list[int]:
        """The indices of the points on the Pareto front, by x (smaller size, or faster, first)."""
        return pareto_front([(-p.x if self.name == "speed" else p.x, p.y) for p in self.points])

    @property
    def front_runs(self) -> list[str]:
        """The run ids on the front, by x."""
        return [self.points[i].view.id for i in self.front]


def _size_panel(views: Sequence[RunView]) -> CostPanel:
    """The runs' quality against their file's MiB; the estimated size only when no run has a measured one."""
    measured = any(measured_size(v) is not None for v in views)
    pts = []
    for v in views:
        q, size = quality(v), run_size(v, measured_only=measured)
        if q is not None and size is not None:
            pts.append(_Point(size.mib, None, q.delta, q.stderr, v))
    return CostPanel("size", pts, "measured GGUF file size (MiB)" if measured else
                     "size estimated from effective bits (MiB)")


def _generation_metric(views: Sequence[RunView]) -> SpeedMetric | None:
    """The generation speed most runs have (llama.cpp's first among equals)."""
    found = speed_metrics(views, "tg")
    counts = {s: sum(1 for v in views if s.name in v.metrics) for s in found}
    return min(found, key=lambda s: (-counts[s], s.order)) if found else None


def _speed_panel(views: Sequence[RunView], metric: SpeedMetric | None) -> CostPanel:
    pts = []
    for v in views:
        q, found = quality(v), None if metric is None else speed(v, metric)
        if q is not None and found is not None:
            pts.append(_Point(found.value, found.half_width, q.delta, q.stderr, v))
    return CostPanel("speed", pts, f"generation speed, {metric.words if metric else ''} (tokens/s)")


def cost_panels(views: Sequence[RunView]) -> list[CostPanel]:
    """The panels of one cohort's cost figure: each with at least 2 runs; none unless a cost was measured.

    The size panel uses the measured GGUF files, or the estimates when no run of ``views`` has a measured
    file (then only beside a speed panel); the speed panel the generation speed most runs have.
    """
    size, fast = _size_panel(views), _speed_panel(views, _generation_metric(views))
    measured = any(measured_size(v) is not None for v in views)
    if len(fast.points) < 2 and not (measured and len(size.points) >= 2):
        return []
    return [p for p in (size, fast) if len(p.points) >= 2]


def _front_panel(ax: Any, panel: CostPanel) -> int:
    """Draw the runs with their 95 % bars and the Pareto front; how many have no standard error on quality."""
    pts, front = panel.points, panel.front
    yerr, missing = _yerr([p.y_se for p in pts])
    xerr = [p.x_half or 0.0 for p in pts]
    ax.errorbar([p.x for p in pts], [p.y for p in pts], yerr=yerr, xerr=xerr, fmt="o", ms=4, color="0.55",
                ecolor="0.7", capsize=2, label="runs")
    ax.errorbar([pts[i].x for i in front], [pts[i].y for i in front], yerr=[yerr[i] for i in front],
                xerr=[xerr[i] for i in front], fmt="o-", ms=5, color="C3", capsize=2, label="Pareto front")
    for i in range(len(pts)) if len(pts) <= LABEL_ALL else front:
        ax.annotate(run_label(pts[i].view), (pts[i].x, pts[i].y), fontsize=5, xytext=(3, 3),
                    textcoords="offset points")
    _symlog(ax, [p.y for p in pts], yerr)
    ax.set_xlabel(panel.axis)
    ax.set_ylabel("Δ perplexity over FP (quality)")
    ax.legend(fontsize=7)
    return missing


def _cost_caption(panels: list[CostPanel]) -> str:
    what = {"size": "smaller and better is down and to the left",
            "speed": "faster and better is down and to the right (tokens/s: the median of repeats)"}
    against = " and ".join(f"against {p.axis}: {what[p.name]}" for p in panels)
    estimated = any("estimated" in p.axis for p in panels)
    every = all(len(p.points) <= LABEL_ALL for p in panels)
    return (f"Quality (the mean perplexity over the protocol's corpora, as its increase over FP; lower is better) "
            f"{against}."
            + (" No run of this cohort has a measured file: sizes are estimated from the effective bits per weight."
               if estimated else "")
            + " Each point is a run with its 95 % intervals (1.96 standard errors of its quality, paired with FP "
            "over the windows, and of its speed); the red line joins the Pareto front, the runs no other run beats "
            "on both axes (point estimates). "
            + ("Every run is labelled. " if every else f"Panels of more than {LABEL_ALL} runs label their front. ")
            + SYMLOG_NOTE)


def _unmeasured(c: _Cohort, panel: CostPanel) -> str:
    lack = sum(1 for v in c.views if quality(v) is not None) - len(panel.points)
    runs = f"{lack} run{'s' if lack > 1 else ''}"
    return f"{runs} with a quality but no {panel.name} measurement not drawn in its panel." if lack > 0 else ""


def _cost(plt: Any, c: _Cohort, out: Path) -> Figure | None:
    """Quality against file size and against generation speed, with the Pareto fronts (>= 2 measured runs)."""
    panels = cost_panels(c.views)
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    missing = sum(_front_panel(ax, panel) for ax, panel in zip(axes[0], panels, strict=True))
    fig.suptitle(c.model, fontsize=9)
    shown = list({p.view.id: p.view for panel in panels for p in panel.points}.values())
    text = " ".join(x for x in (_cost_caption(panels), *(_unmeasured(c, p) for p in panels),
                                speed_settings(shown)) if x)
    return c.figure(plt, fig, out, "pareto-cost", "Quality against file size and generation speed, Pareto fronts",
                    c.caption(text, shown, ["ppl"], missing), [v.id for v in shown])


# ---- sensitivity heatmaps --------------------------------------------------------------------------------------


def heatmap_source(record: RunRecord) -> str:
    """Which per-module errors a run's heatmap draws: ``calibration`` or ``sensitivity``.

    ``calibration``: the run's layer records (each linear's error on its own inputs, as quantized), else
    ``sensitivity``: the ``evaluate.sensitivity`` records (outputs against FP on evaluation tokens, errors
    accumulated through the layers). Two different quantities: a colour scale is shared within one only.
    """
    return "calibration" if any(r.get("rel_error") is not None for r in record.layers) else "sensitivity"


def sensitivity_grid(record: RunRecord) -> tuple[list[int], list[str], list[list[float]]]:
    """Layers, linears (the last part of the module name) and ``grid[layer][linear]`` of relative errors.

    From the records :func:`heatmap_source` names (NaN where a linear has none). Layers are in order and
    linears in the order the run met them in a layer (q, k, v, o, up, gate, down...).
    """
    source = record.layers if heatmap_source(record) == "calibration" else \
        [r for r in record.sensitivity if r.get("kind", "linear") == "linear"]
    rows = [r for r in source if r.get("rel_error") is not None]
    layers = sorted({int(r["layer"]) for r in rows})
    modules: list[str] = []
    for r in sorted(rows, key=lambda r: int(r["layer"])):  # stable: the run's own order within a layer
        name = str(r["module"]).split(".")[-1]
        if name not in modules:
            modules.append(name)
    grid = [[math.nan] * len(modules) for _ in layers]
    for r in rows:
        grid[layers.index(int(r["layer"]))][modules.index(str(r["module"]).split(".")[-1])] = float(r["rel_error"])
    return layers, modules, grid


def _scale(grids: Sequence[list[list[float]]]) -> tuple[float, float]:
    values = [x for g in grids for row in g for x in row if not math.isnan(x)]
    return (min(values), max(values)) if values else (0.0, 1.0)


def _calibration(record: RunRecord) -> str:
    cal = record.config.get("calibration") or {}
    if not cal:
        return "its calibration data"
    return f"{cal.get('dataset')}, {cal.get('samples')} samples of {cal.get('seqlen')} tokens"


def _heatmap(plt: Any, record: RunRecord, grid: tuple[list[int], list[str], list[list[float]]], label: str,
             scale: tuple[float, float], out: Path, section: int) -> Figure | None:
    layers, modules, values = grid
    if not values:
        return None
    fig, ax = plt.subplots(figsize=(1.4 + 0.7 * len(modules), 1.2 + 0.22 * len(layers)))
    im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=scale[0], vmax=scale[1])
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_ylabel("layer")
    ax.set_title(label, fontsize=8)
    fig.colorbar(im, ax=ax, label="relative output error")
    key = f"sensitivity-{record.id}"
    png, svg = _save(plt, fig, out, key)
    if heatmap_source(record) == "calibration":
        what = (f"Relative error of each linear's output, ||X (Q - W)^T|| / ||X W^T||, on its own inputs X from the "
                f"run's calibration data ({_calibration(record)}) as the layer loop met them (RTN runs measure it "
                f"with calibration.layer_errors)")
    else:
        what = ("Relative error of each linear's output against FP on the evaluation tokens of "
                "evaluate.sensitivity (errors accumulated through the layers: not comparable with the calibration "
                "heatmaps)")
    return Figure(key, f"Per-module sensitivity: {label}",
                  f"{what}; layers top to bottom, linears in the order they run. The colour scale "
                  f"({scale[0]:.3g} to {scale[1]:.3g}) is shared by every heatmap of this report of the same kind.",
                  png, svg, [record.id], section)


# ---- all figures -----------------------------------------------------------------------------------------------


def draw_figures(views: list[RunView], heatmaps: Sequence[RunRecord], out: Path,
                 texts: Mapping[str, Mapping[str, str]] | None = None) -> list[Figure]:
    """Every figure the runs have data for, per cohort, written under ``out``; a heatmap per record in ``heatmaps``.

    Args:
        views: The runs.
        heatmaps: Runs to draw sensitivity heatmaps of (with their layer or sensitivity records).
        out: The folder to write into.
        texts: ``{run id: texts}`` of runs with few-shot curves (their reliability curves give the standard
            errors of the calibration error).

    """
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    labels, params = model_labels(views), model_params(views)
    figures: list[Figure] = []
    for sec in protocol_sections(views):
        models: dict[str, list[RunView]] = {}
        for v in sec.views:
            models.setdefault(v.record.model_fingerprint, []).append(v)
        for fp, members in sorted(models.items(), key=lambda kv: (params.get(kv[0], 0), labels.get(kv[0], ""))):
            c = _Cohort(sec, members, model_label(fp, labels, params), slug(labels.get(fp, fp)), len(models) > 1)
            found = [_pareto(plt, c, out), _loss_by_bits(plt, c, out), _accuracy_by_bits(plt, c, out),
                     _fewshot(plt, c, out, texts or {}), _long_context(plt, c, out), _kl_vs_acc(plt, c, out),
                     _cost(plt, c, out), *search_figures(plt, c, out, texts or {})]
            figures += [f for f in found if f is not None]
    by_id = {v.id: v for v in views}
    grids = [(r, sensitivity_grid(r)) for r in heatmaps]
    scales = {kind: _scale([g[2] for r, g in grids if heatmap_source(r) == kind])
              for kind in {heatmap_source(r) for r in heatmaps}}
    sections = {v.id: s.index for s in protocol_sections(views) for v in s.views}
    for record, grid in grids:
        view = by_id.get(record.id)
        label = f"{run_label(view)}, {record.model}" if view is not None else f"{record.id}, {record.model}"
        f = _heatmap(plt, record, grid, label, scales[heatmap_source(record)], out, sections.get(record.id, 1))
        if f is not None:
            figures.append(f)
    return figures
