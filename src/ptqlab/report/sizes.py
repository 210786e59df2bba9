"""Model size as an axis: the models of one protocol by parameter count, their losses side by side.

Every other part of the report compares runs of one cohort (one model, one protocol). A size series compares
*models* under one protocol, and it does so only through numbers that are each within their own cohort: a
run's relative perplexity increase over its own model's FP, ``Δppl / FP ppl`` (:func:`relative_loss`), with
its paired standard error over ``FP ppl``. The models' tokenizers may differ (their windows then cover
different text), so absolute perplexities are never set side by side; relative losses are.

- :func:`model_sizes`: per model (fingerprint) its name, parameter count (from a run that keeps every weight in
  FP, as the tables count it), family (from the run's architecture: ``Qwen2ForCausalLM`` is ``Qwen2``) and the
  bits per weight of the file it was read from (``bits.source``: a GGUF's decoder linears), if recorded.
- :func:`size_series`: per protocol, the models of known size in order, when there are at least two sizes.
- :func:`matched_runs`: a series' runs by scheme and recipe (:func:`~ptqlab.report.tables.run_label`): the same
  configuration on each model.
- :func:`size_figures`: the loss against parameter count, one line per scheme, one panel per target.
- :func:`reference_notes`: the tables' captions say what "FP" is for a model read from a GGUF file (its
  dequantized file at the file's bits per weight, not FP16).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..metrics import BITS_SOURCE
from .runs import Z95, RunView, quality
from .table import Table
from .tables import Section, model_labels, model_params, protocol_sections, run_label, sample_sizes

__all__ = ["ModelSize", "SizeSeries", "family_of", "matched_runs", "model_sizes", "params_text", "parse_params",
           "reference_notes", "reference_text", "relative_loss", "size_figures", "size_series"]

LINTHRESH = 1.0  # the loss axis (percent) is linear within ±1 %


@dataclass(frozen=True)
class ModelSize:
    """A model of the store: name, parameter count (None: no run says), family and its source's bits per weight."""

    fingerprint: str
    name: str
    params: int | None
    family: str
    source_bits: float | None = None

    @property
    def label(self) -> str:
        """``qwen2.5-coder-0.5b (630M parameters, Qwen2)``."""
        n = "unknown size" if self.params is None else f"{params_text(self.params)} parameters"
        return f"{self.name} ({n}, {self.family})"

    @property
    def reference(self) -> str:
        """What the model's FP reference is, in words."""
        if self.source_bits is None:
            return f"{self.name}: the model as stored (floating point, or unknown)"
        return f"{self.name}: the dequantized GGUF at {self.source_bits:.2f} bits per weight"


@dataclass
class SizeSeries:
    """The models of one protocol section with a known size, smallest first (at least two sizes)."""

    section: Section
    models: list[ModelSize]
    views: list[RunView] = field(default_factory=list)

    def families(self) -> dict[str, list[ModelSize]]:
        """``{family: its models}``, in size order."""
        out: dict[str, list[ModelSize]] = {}
        for m in self.models:
            out.setdefault(m.family, []).append(m)
        return out


def params_text(n: float) -> str:
    """``135M``, ``1.54B``, ``260K`` (three significant digits)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


_PARAMS = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgG]?)\s*$")


def parse_params(text: str) -> float:
    """A parameter count written ``1.5e9``, ``1.5B``, ``500M``, ``135m`` or ``260K``.

    Raises:
        ValueError: Anything else, or a count that is not positive.

    """
    match = _PARAMS.match(text)
    if match is None:
        raise ValueError(f"not a parameter count: {text!r} (e.g. 1.5e9, 1.5B, 500M)")
    scale = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[match.group(2).lower()]
    value = float(match.group(1)) * scale
    if not value > 0:
        raise ValueError(f"a parameter count must be positive, got {text!r}")
    return value


def family_of(architecture: str | None) -> str:
    """The model family of a run's architecture: ``Qwen2ForCausalLM`` -> ``Qwen2`` (``unknown`` when None)."""
    if not architecture:
        return "unknown"
    return re.sub(r"(For(CausalLM|ConditionalGeneration)|LMHeadModel|Model)$", "", architecture) or architecture


def model_sizes(views: Iterable[RunView]) -> dict[str, ModelSize]:
    """Every model of ``views`` by fingerprint: name, parameter count, family, source bits per weight."""
    views = list(views)
    params, labels = model_params(views), model_labels(views)
    arch: dict[str, str | None] = {}
    bits: dict[str, float] = {}
    for v in views:
        fp = v.record.model_fingerprint
        if arch.get(fp) is None:
            arch[fp] = v.record.architecture
        if BITS_SOURCE in v.metrics:
            bits.setdefault(fp, v.metrics[BITS_SOURCE])
    return {fp: ModelSize(fp, labels[fp], params.get(fp), family_of(arch.get(fp)), bits.get(fp)) for fp in labels}


def size_series(views: Sequence[RunView]) -> list[SizeSeries]:
    """Per protocol section, its models of known size in size order: only sections with two sizes or more."""
    sizes = model_sizes(views)
    out = []
    for sec in protocol_sections(views):
        found = {v.record.model_fingerprint for v in sec.views}
        models = sorted((sizes[fp] for fp in found if sizes[fp].params is not None),
                        key=lambda m: (m.params or 0, m.name))
        if len({m.params for m in models}) >= 2:
            known = {m.fingerprint for m in models}
            out.append(SizeSeries(sec, models, [v for v in sec.views if v.record.model_fingerprint in known]))
    return out


def relative_loss(v: RunView) -> tuple[float, float | None] | None:
    """The run's relative perplexity increase over its own model's FP, ``Δppl / FP ppl``, and its standard error.

    The standard error is the paired one of ``Δppl`` (over the windows) divided by FP's perplexity. None when
    the run has no quality (no FP value, a missing corpus).
    """
    q = quality(v)
    if q is None or not q.fp > 0:
        return None
    return q.delta / q.fp, None if q.stderr is None else q.stderr / q.fp


def matched_runs(series: SizeSeries, keep: Callable[[RunView], bool]) -> dict[str, dict[str, RunView]]:
    """``{scheme [recipe]: {fingerprint: run}}`` of the runs ``keep`` accepts that have a relative loss.

    Of two runs of one model and label the older is kept. Only labels measured on two models or more.
    """
    out: dict[str, dict[str, RunView]] = {}
    for v in series.views:
        if keep(v) and relative_loss(v) is not None:
            out.setdefault(run_label(v), {}).setdefault(v.record.model_fingerprint, v)
    return {label: runs for label, runs in sorted(out.items()) if len(runs) >= 2}


# ---- the reference each model is measured against ------------------------------------------------------------


def reference_text(models: Iterable[ModelSize]) -> str:
    """``Reference: ... not FP16.`` for the models read from a GGUF file; empty when none was."""
    from_gguf = [m for m in models if m.source_bits is not None]
    if not from_gguf:
        return ""
    each = "; ".join(f"{m.name} at {m.source_bits:.2f}" for m in from_gguf)
    return (f"Reference (FP): the dequantized GGUF file, not FP16 ({each} bits per weight over the decoder "
            "linears): errors are measured against that model.")


def reference_notes(tables: Iterable[Table], views: Sequence[RunView]) -> None:
    """Add to each table's note what its models' FP reference is (a GGUF's dequantized file and its bits)."""
    sizes = model_sizes(views)
    by_section = {sec.index: {v.record.model_fingerprint for v in sec.views} for sec in protocol_sections(views)}
    for t in tables:
        text = reference_text(sizes[fp] for fp in sorted(by_section.get(t.section, set())))
        if text and text not in t.note:
            t.note = " ".join(x for x in (t.note, text) if x)


# ---- the figure: loss against parameter count -----------------------------------------------------------------

_TARGETS = ("W", "A", "KV", "W+A", "W+KV", "A+KV", "W+A+KV")


def _series_caption(s: SizeSeries, shown: list[RunView], missing: int) -> str:
    models = ", ".join(m.label for m in s.models)
    families = s.families()
    if len(families) == 1:
        fam = f"All models are of one family ({next(iter(families))})."
    else:
        fam = "Families: " + "; ".join(f"{f}: {', '.join(m.name for m in ms)}" for f, ms in families.items()) + (
            ". A step between families changes more than the size (data, tokenizer, architecture).")
    parts = ["Each point: a run's perplexity increase over its own model's FP as a share of FP's perplexity "
             "(Δppl / FP ppl, in %), with its 95 % interval (the paired standard error over the windows); each line "
             "one scheme and recipe measured on two models or more. Relative losses, because the models' tokenizers "
             "differ (their windows cover different text).", f"Models: {models}.", fam,
             reference_text(s.models), f"Protocol: {s.section.protocol.describe()}."]
    sizes = sample_sizes(shown, ["ppl"])
    if sizes:
        parts.append(f"Sample sizes: {sizes}.")
    if missing:
        parts.append(f"{missing} point{'s have' if missing > 1 else ' has'} no standard error, hence no bar.")
    parts.append(f"The y axis is symmetric-logarithmic, linear within ±{LINTHRESH:g} %.")
    return " ".join(p for p in parts if p)


def _is_target(target: str, v: RunView) -> bool:
    return v.target == target


def _draw_series(plt: Any, s: SizeSeries, out: Path) -> tuple[Any, list[RunView], int] | None:
    by_target: dict[str, dict[str, dict[str, RunView]]] = {}
    for target in _TARGETS:
        found = matched_runs(s, functools.partial(_is_target, target))
        if found:
            by_target[target] = found
    if not by_target:
        return None
    params = {m.fingerprint: float(m.params or 0) for m in s.models}
    fig, axes = plt.subplots(1, len(by_target), figsize=(4.6 * len(by_target), 4.0), squeeze=False)
    shown: list[RunView] = []
    missing = 0
    for ax, (target, lines) in zip(axes[0], by_target.items(), strict=True):
        lo, hi = 0.0, LINTHRESH
        for label, runs in lines.items():
            pts = sorted(runs.items(), key=lambda kv: params[kv[0]])
            xs = [params[fp] for fp, _ in pts]
            losses = [relative_loss(v) for _, v in pts]
            ys = [100 * loss[0] for loss in losses if loss is not None]
            errs = [Z95 * 100 * loss[1] if loss is not None and loss[1] is not None else 0.0 for loss in losses]
            missing += sum(1 for loss in losses if loss is None or loss[1] is None)
            ax.errorbar(xs, ys, yerr=errs, fmt="o-", ms=4, capsize=2, label=label)
            shown += [v for _, v in pts]
            lo = min([lo, *(y - e for y, e in zip(ys, errs, strict=True))])
            hi = max([hi, *(y + e for y, e in zip(ys, errs, strict=True))])
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=LINTHRESH)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_ylim(lo * 2 if lo < 0 else -LINTHRESH / 2, hi * 2)
        ticks = sorted(set(params.values()))
        ax.set_xticks(ticks, [params_text(x) for x in ticks])
        ax.minorticks_off()
        ax.set_xlabel("parameters")
        ax.set_ylabel("Δ perplexity / FP perplexity (%)")
        ax.set_title(f"target {target}")
        ax.legend(fontsize=6, title="scheme [recipe]", title_fontsize=6)
    return fig, shown, missing


def size_figures(views: Sequence[RunView], out: Path) -> list[Any]:
    """The loss-against-parameter-count figure of each protocol with two model sizes or more, under ``out``.

    Returns the :class:`~ptqlab.report.plots.Figure` of each (key ``loss-by-size``, ``-p<n>`` per protocol
    when the report has several).
    """
    from .plots import Figure, _pyplot, _save  # the report's one figure style

    series = size_series(views)
    if not series:
        return []
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for s in series:
        drawn = _draw_series(plt, s, out)
        if drawn is None:
            continue
        fig, shown, missing = drawn
        fig.suptitle("Loss against model size" + s.section.title_suffix, fontsize=9)
        key = "loss-by-size" + s.section.suffix
        png, svg = _save(plt, fig, out, key)
        title = f"Perplexity increase against parameter count, one line per scheme{s.section.title_suffix}"
        figures.append(Figure(key, title, _series_caption(s, shown, missing), png, svg,
                              list(dict.fromkeys(v.id for v in shown)), s.section.index))
    return figures

