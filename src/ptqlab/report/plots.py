"""The report's figures (matplotlib, Agg).

Quality against bits with the Pareto front, loss against bits per target, long-context accuracy against
length, per-module sensitivity heatmaps, KL against accuracy change.

Each figure is written as PNG and SVG (text as paths, no date: the same runs give the same files).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..metrics import BITS_ACTIVATION, BITS_KV, BITS_WEIGHT, parse_name
from ..store import RunRecord
from .runs import RunView, is_task_accuracy, quality

__all__ = ["Figure", "draw_figures", "pareto_front", "sensitivity_grid"]


@dataclass
class Figure:
    """A written figure: its files, title, caption and the runs it shows."""

    key: str
    title: str
    caption: str
    png: Path
    svg: Path
    runs: list[str] = field(default_factory=list)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (smaller is better on both), by x.

    A point is dominated when another is at most as large on both axes and smaller on one.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best = math.inf
    for i in order:
        if points[i][1] < best:
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


TARGET_BITS = {"W": BITS_WEIGHT, "W+A": BITS_WEIGHT, "W+KV": BITS_WEIGHT, "W+A+KV": BITS_WEIGHT,
               "A": BITS_ACTIVATION, "KV": BITS_KV, "A+KV": BITS_ACTIVATION}


def _pareto(plt: Any, views: list[RunView], out: Path) -> Figure | None:
    by_target: dict[str, list[tuple[float, float, RunView]]] = {}
    for v in views:
        q, name = quality(v), TARGET_BITS.get(v.target)
        if q is not None and name is not None and name in v.metrics:
            by_target.setdefault(v.target, []).append((v.metrics[name], max(q.delta, 1e-3), v))
    if not by_target:
        return None
    fig, axes = plt.subplots(1, len(by_target), figsize=(4.2 * len(by_target), 3.4), squeeze=False)
    runs = []
    for ax, (target, pts) in zip(axes[0], sorted(by_target.items()), strict=True):
        front = pareto_front([(x, y) for x, y, _ in pts])
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color="0.55", label="runs")
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "o-", color="C3", ms=5, label="Pareto front")
        ax.set_yscale("log")
        ax.set_xlabel(f"effective bits ({TARGET_BITS[target].split('.')[1]})")
        ax.set_ylabel("Δ mean perplexity over FP")
        ax.set_title(f"target {target}")
        ax.legend(fontsize=7)
        runs += [p[2].id for p in pts]
    png, svg = _save(plt, fig, out, "pareto")
    return Figure("pareto", "Quality against effective bits, Pareto front per target",
                  "Each point is a run; the red line joins the runs no other run beats on both bits and quality "
                  "(increases below 0.001 are drawn at 0.001).", png, svg, runs)


def _loss_by_bits(plt: Any, views: list[RunView], out: Path) -> Figure | None:
    lines: dict[str, dict[int, tuple[float, RunView]]] = {}
    for v in views:
        q = quality(v)
        if q is None or v.bits is None or v.lorc or v.method not in ("rtn", "-"):
            continue
        best = lines.setdefault(v.target, {})
        if v.bits not in best or q.delta < best[v.bits][0]:
            best[v.bits] = (q.delta, v)
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    runs = []
    for target, pts in sorted(lines.items()):
        bits = sorted(pts, reverse=True)
        ax.plot(bits, [max(pts[b][0], 1e-3) for b in bits], "o-", label=target)
        runs += [pts[b][1].id for b in bits]
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("bits")
    ax.set_ylabel("Δ mean perplexity over FP (best RTN run)")
    ax.legend(title="target", fontsize=7)
    png, svg = _save(plt, fig, out, "loss-by-bits")
    return Figure("loss-by-bits", "Perplexity increase against bits, one line per target",
                  "The best RTN run (no LoRC) of each target and bit width.", png, svg, runs)


def _retrieval_length(name: str) -> int:
    return parse_name(name).length or 0


def _long_context(plt: Any, views: list[RunView], out: Path) -> Figure | None:
    chosen = [v for v in views if v.target in ("FP", "KV") and any(n.startswith("retrieval.") for n in v.metrics)]
    if not chosen:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for v in sorted(chosen, key=lambda v: -(v.kv_bits or 16)):
        names = sorted((n for n in v.metrics if n.startswith("retrieval.")), key=_retrieval_length)
        ax.plot([_retrieval_length(n) for n in names], [v.metrics[n] for n in names], "o-",
                label="FP" if v.target == "FP" else f"KV{v.kv_bits}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("retrieval accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    png, svg = _save(plt, fig, out, "long-context")
    return Figure("long-context", "Long-context retrieval accuracy against length per KV-cache config",
                  "Pass-key retrieval accuracy of the FP and KV-quantized runs.", png, svg, [v.id for v in chosen])


def sensitivity_grid(record: RunRecord) -> tuple[list[int], list[str], list[list[float]]]:
    """Layers, linears (the last part of the module name) and ``grid[layer][linear]`` of relative errors.

    From the run's sensitivity records, else its layer records (NaN where a linear has none).
    """
    rows = [r for r in record.sensitivity if r.get("rel_error") is not None] or \
           [r for r in record.layers if r.get("rel_error") is not None]
    layers = sorted({int(r["layer"]) for r in rows})
    modules = sorted({str(r["module"]).split(".")[-1] for r in rows})
    grid = [[math.nan] * len(modules) for _ in layers]
    for r in rows:
        grid[layers.index(int(r["layer"]))][modules.index(str(r["module"]).split(".")[-1])] = float(r["rel_error"])
    return layers, modules, grid


def _heatmap(plt: Any, record: RunRecord, label: str, out: Path) -> Figure | None:
    layers, modules, grid = sensitivity_grid(record)
    if not grid:
        return None
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(modules), 1.0 + 0.22 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_ylabel("layer")
    ax.set_title(label, fontsize=8)
    fig.colorbar(im, ax=ax, label="relative output error")
    key = f"sensitivity-{record.id}"
    png, svg = _save(plt, fig, out, key)
    return Figure(key, f"Per-module sensitivity: {label}",
                  "Relative error of each linear's output against FP (layers x linears).", png, svg, [record.id])


def _kl_vs_acc(plt: Any, views: list[RunView], out: Path) -> Figure | None:
    pts = []
    for v in views:
        kls = sorted(n for n in v.metrics if parse_name(n).kind == "kl")
        changes = [c.delta for n in v.metrics if is_task_accuracy(n)
                   if (c := v.change(n)) is not None]
        if kls and changes and v.target != "FP":
            pts.append((v.metrics[kls[0]], sum(changes) / len(changes), v))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for target in sorted({p[2].target for p in pts}):
        sel = [p for p in pts if p[2].target == target]
        ax.scatter([p[0] for p in sel], [p[1] for p in sel], s=18, label=target)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("KL divergence from FP")
    ax.set_ylabel("mean accuracy change over the tasks")
    ax.legend(title="target", fontsize=7)
    png, svg = _save(plt, fig, out, "kl-vs-accuracy")
    return Figure("kl-vs-accuracy", "KL divergence against accuracy change",
                  "Each point is a run with both measurements.", png, svg, [p[2].id for p in pts])


def draw_figures(views: list[RunView], heatmaps: Sequence[RunRecord], out: Path) -> list[Figure]:
    """Every figure the runs have data for, written under ``out``; one heatmap per record in ``heatmaps``."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    labels = {v.id: v.label for v in views}
    makers: list[Callable[[], Figure | None]] = [
        lambda: _pareto(plt, views, out), lambda: _loss_by_bits(plt, views, out),
        lambda: _long_context(plt, views, out), lambda: _kl_vs_acc(plt, views, out),
        *[(lambda r=r: _heatmap(plt, r, labels.get(r.id, r.id), out)) for r in heatmaps],
    ]
    return [f for f in (make() for make in makers) if f is not None]
