"""The report's tables, built from run views: ZeroQuant-V2's quality tables and qllm-eval's degradation tables.

Tables are split by evaluation protocol (:class:`Section`): no row, column or cell holds runs of two
protocols, and each table's caption gives its protocol and sample sizes (windows, items, samples).

- ZeroQuant-V2's layout: rows are schemes (bits, granularity, symmetry, method), columns are models (one
  column set when the store holds one model), cells ``Δ ppl ± se (class)``.
- Costs: the ZeroQuant-V2 tables gain a ``file MiB`` column (the measured GGUF file) and a column per
  speed (``llama.cpp tg128 t/s``: tokens per second ± its standard error) where a run of the table has
  them, and each protocol with measured costs has a table of its runs' quality, size and speed.
- qllm-eval's layout: rows are a model's schemes with the bit width left open (``Wb g64 asym [rtn]``: the
  ``b`` is the column) and a measure; columns are bit widths, cells ``Δ ± se`` against FP. W4A8 and W4A4
  are different rows (``Wb g64 asym + A8 token asym`` and ``Wb ... + Ab ...``).

Labels always say the symmetry of an integer grid and name the weight rounding (``[rtn]`` when the recipe
names no quantizer). Cells hold raw values (numbers stay numbers for CSV and sorting); a :class:`.table.Merge`
tells :mod:`.render` which columns it shows as one ``x ± se (class)`` cell.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..metrics import parse_name, task_name
from .cost import MIB, SpeedMetric, has_cost, measured_size, run_size, speed, speed_metrics, speed_settings
from .fidelity import fidelity_tables
from .runs import (
    ZQ_CORPORA,
    Change,
    Protocol,
    RunView,
    describe_sizes,
    kv_sides,
    quality,
    quality_difference,
    section_bits,
    zq_class,
)
from .table import Cell, Merge, Table

__all__ = ["Section", "build_tables", "model_label", "model_labels", "model_params",
           "protocol_sections", "recipe_steps", "run_label", "sample_sizes", "series_label", "swept_bits"]

# Recipe steps that choose the quantized weights themselves (AWQ: its clipping search); any other recipe
# rounds the weights with RTN after its transforms (ptqlab.methods.recipe.build_recipe; a test checks both
# agree), so the label says ``rtn`` there too.
QUANTIZING_STEPS = ("rtn", "gptq", "awq", "squeezellm")
TRANSFORM_STEPS = ("rotation", "smoothquant")  # steps that run before the quantizer
DIVERGENCE_ORDER = ("kl", "top1", "top5")
TARGET_ORDER = ("FP", "W", "A", "KV", "W+A", "W+KV", "A+KV", "W+A+KV")


# ---- protocol sections and models --------------------------------------------------------------------------


@dataclass
class Section:
    """The runs of one evaluation protocol; ``only`` when the report has no other."""

    index: int
    protocol: Protocol
    views: list[RunView]
    only: bool = True

    @property
    def suffix(self) -> str:
        """What table and figure keys of the section end with: ``""`` for the only one, else ``-p<index>``."""
        return "" if self.only else f"-p{self.index}"

    @property
    def name(self) -> str:
        """``protocol 1``."""
        return f"protocol {self.index}"

    @property
    def title_suffix(self) -> str:
        """What titles of the section end with (nothing for the only one)."""
        return "" if self.only else f", {self.name}"


def protocol_sections(views: Sequence[RunView]) -> list[Section]:
    """The views split by evaluation protocol, in the order protocols first appear (views oldest first)."""
    groups: dict[str, list[RunView]] = {}
    protocols: dict[str, Protocol] = {}
    for v in views:
        key = v.protocol.key
        groups.setdefault(key, []).append(v)
        protocols.setdefault(key, v.protocol)
    only = len(groups) == 1
    return [Section(i, protocols[k], g, only) for i, (k, g) in enumerate(groups.items(), start=1)]


def model_params(views: Iterable[RunView]) -> dict[str, int]:
    """``{model fingerprint: parameter count}`` from the runs that keep every weight in FP.

    Such a run's ``size.model_bytes`` counts every parameter at 16 bits, so the count is its size / 2.
    A model with no such run in ``views`` is left out.
    """
    out: dict[str, int] = {}
    for v in views:
        if v.w_bits is None and not v.lorc and v.size_bytes:
            out.setdefault(v.record.model_fingerprint, round(v.size_bytes / 2))
    return out


def _params_text(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def model_labels(views: Iterable[RunView]) -> dict[str, str]:
    """``{fingerprint: name}``: the model's name, with its fingerprint where two models share a name."""
    names: dict[str, str] = {}
    for v in views:
        names.setdefault(v.record.model_fingerprint, v.record.model)
    count: dict[str, int] = {}
    for name in names.values():
        count[name] = count.get(name, 0) + 1
    return {fp: name if count[name] == 1 else f"{name} [{fp[:8]}]" for fp, name in names.items()}


def model_label(fingerprint: str, labels: Mapping[str, str], params: Mapping[str, int]) -> str:
    """``smollm2-135m (135M parameters)``, or the name alone when the count is unknown."""
    name = labels.get(fingerprint, fingerprint[:8])
    n = params.get(fingerprint)
    return name if n is None else f"{name} ({_params_text(n)} parameters)"


def _by_model(views: Iterable[RunView]) -> dict[str, list[RunView]]:
    out: dict[str, list[RunView]] = {}
    for v in views:
        out.setdefault(v.record.model_fingerprint, []).append(v)
    return out


def _model_order(models: Iterable[str], params: Mapping[str, int], labels: Mapping[str, str]) -> list[str]:
    return sorted(models, key=lambda fp: (params.get(fp, 0), labels.get(fp, fp)))


# ---- labels --------------------------------------------------------------------------------------------------


def recipe_steps(steps: Sequence[str], weights_quantized: bool) -> list[str]:
    """The recipe's steps with ``rtn`` where the pipeline rounds the weights without naming it.

    A recipe that names no quantizer (:data:`QUANTIZING_STEPS`) rounds quantized weights with RTN after
    its transforms, as :func:`ptqlab.methods.recipe.build_recipe` does.
    """
    out = list(steps)
    if weights_quantized and not any(s in QUANTIZING_STEPS for s in out):
        out.insert(sum(1 for s in out if s in TRANSFORM_STEPS), "rtn")
    return out


def _granularity(prefix: str, section: Mapping[str, Any]) -> str:
    default = {"W": "channel", "A": "token", "KV": "head"}[prefix]
    if str(section.get("format") or "").startswith("gguf_"):
        return ""  # llama.cpp's block types carry their own blocks
    gran = section.get("granularity") or default
    if gran == "group":
        return f"g{section.get('group_size')}"
    return "row" if prefix == "W" and gran == "channel" else str(gran)


def _part(prefix: str, section: Mapping[str, Any] | None, open_bits: int | None = None) -> str | None:
    """``W4 g64 asym`` (``Wb g64 asym`` when the part's bits are ``open_bits``); None for a part in FP."""
    bits = section_bits(section)
    if section is None or bits is None:
        return None
    fmt = section.get("format") or "int"
    size = ("b" if bits == open_bits else str(bits)) if fmt == "int" else fmt
    words = [w for w in (f"{prefix}{size}", _granularity(prefix, section)) if w]
    if fmt == "int":
        words.append("sym" if section.get("symmetric") else "asym")
    clipping = section.get("clipping") or "minmax"
    if clipping != "minmax":
        words.append(f"clip {clipping}")
    if (section.get("clip_ratio") or 1.0) != 1.0:
        words.append(f"clip ×{section['clip_ratio']:g}")
    if prefix == "A" and section.get("dynamic") is False:
        words.append("static")
    return " ".join(words) + (kv_sides(section) if prefix == "KV" else "")


def _label(v: RunView, open_bits: int | None = None) -> str:
    scheme = v.scheme
    parts = [_part(p, scheme.get(k), open_bits) for p, k in (("W", "weight"), ("A", "activation"), ("KV", "kv_cache"))]
    parts.append(_part("E", scheme.get("embedding"), None))
    text = " + ".join(p for p in parts if p) or "FP"
    if scheme.get("overrides"):
        n = len(scheme["overrides"])
        text += f" {'mixed ' if v.mixed_weights else ''}({n} override{'s' if n > 1 else ''})"
    if scheme.get("outliers"):
        text += " + FP16 outliers"
    steps = recipe_steps(v.steps, v.w_bits is not None)
    return text + (f" [{'+'.join(steps)}]" if steps else "")


def run_label(v: RunView) -> str:
    """A run's scheme and recipe: ``W4 row sym [rtn]``, ``W4 g64 asym + A8 token asym [smoothquant+rtn]``."""
    return _label(v)


def swept_bits(v: RunView) -> int | None:
    """The bits a run sits at on a bit-width axis: the weights', else the activations', else the KV cache's.

    A run with mixed weights (overrides giving some linears another weight spec) sits at none: its weights are
    not at its scheme's bits (the cost table and a search's figure give its effective bits).
    """
    if v.mixed_weights:
        return None
    return next((b for b in (v.w_bits, v.a_bits, v.kv_bits) if b is not None), None)


def series_label(v: RunView) -> str:
    """The run's scheme with its swept bit width open, ``b``: ``Wb g64 asym + A8 token asym [rtn]``.

    Runs of one series differ only in ``b``: W8A8 and W4A4 are one series (``Wb ... + Ab ...``), W4A8 another.
    """
    return _label(v, swept_bits(v))


def _target_rank(v: RunView) -> int:
    return TARGET_ORDER.index(v.target) if v.target in TARGET_ORDER else len(TARGET_ORDER)


def sample_sizes(views: Iterable[RunView], kinds: Iterable[str] | None = None) -> str:
    """The sample sizes behind ``views``' numbers (windows, items, samples), for a caption.

    ``kinds``: only measurements of these metric kinds (``ppl``, ``lm_eval``, ``kl``, ``retrieval``...).
    """
    wanted = None if kinds is None else set(kinds)
    views = list(views)

    def keep(name: str) -> bool:
        return wanted is None or parse_name(name).kind in wanted

    text = describe_sizes(_only_metrics(views, keep))
    div = sorted({(m.corpus, m.seqlen, m.windows) for v in views for n in v.metrics
                  if (m := parse_name(n)).kind in ("kl", "top1", "top5") and keep(n)})
    if div:
        text = "; ".join(x for x in (text, "divergence windows: " + ", ".join(
            f"{c} {w} of {s} tokens" for c, s, w in div)) if x)
    return text


def _only_metrics(views: list[RunView], keep: Callable[[str], bool]) -> list[RunView]:
    """Shallow copies of ``views`` with only the metrics ``keep`` accepts (for :func:`describe_sizes`)."""
    return [dataclasses.replace(v, metrics={n: x for n, x in v.metrics.items() if keep(n)}) for v in views]


# ---- ZeroQuant-V2: schemes by models --------------------------------------------------------------------------


@dataclass
class _Pivot:
    """Rows keyed by scheme, a set of columns per model (one set, unsuffixed, when there is one model)."""

    key_columns: list[str]
    names: list[str]
    merges: list[Merge]
    cells: Callable[[RunView | None, bool], list[Cell]]
    runs_of: Callable[[RunView], list[str]] | None = None


def _pivot(t: Table, views: list[RunView], row_key: Callable[[RunView], tuple[Any, ...]],
           order: Callable[[tuple[Any, ...]], Any], spec: _Pivot, labels: Mapping[str, str],
           params: Mapping[str, int], models: list[str]) -> Table:
    multi = len(models) > 1
    names = [*spec.key_columns]
    for fp in models:
        suffix = f" · {model_label(fp, labels, params)}" if multi else ""
        names += [n + suffix for n in spec.names]
        t.merges += [Merge(m.value + suffix, m.se and m.se + suffix, m.tag and m.tag + suffix, m.signed)
                     for m in spec.merges]
    t.columns = names
    groups: dict[tuple[Any, ...], dict[str, list[RunView]]] = {}
    for v in views:
        groups.setdefault(row_key(v), {}).setdefault(v.record.model_fingerprint, []).append(v)
    for key in sorted(groups, key=order):
        by_model = groups[key]
        for i in range(max(len(rs) for rs in by_model.values())):
            cells: list[Cell] = list(key)
            runs: list[str] = []
            for fp in models:
                found = by_model.get(fp, [])
                run = found[i] if i < len(found) else None
                cells += spec.cells(run, multi)
                if run is not None:
                    runs += spec.runs_of(run) if spec.runs_of is not None else [run.id]
            t.add(cells, runs)
    return t


def _quality_cells(bits: bool) -> Callable[[RunView | None, bool], list[Cell]]:
    """(bits/weight and) mean ppl for one model, then the increase over FP, its standard error and the class."""
    def cells(v: RunView | None, multi: bool) -> list[Cell]:
        q = quality(v) if v is not None else None
        head: list[Cell] = [] if multi else [None if q is None else q.value]
        if bits and not multi:
            head.insert(0, None if v is None else v.weight_bits)
        if q is None:
            return [*head, None, None, None]
        return [*head, q.delta, q.stderr, zq_class(q.delta)]
    return cells


QUALITY_NAMES = ["bits/weight", "mean ppl", "Δ ppl", "± (se)", "class"]
QUALITY_MERGE = Merge("Δ ppl", "± (se)", "class", signed=True)


def _quality_spec(key_columns: list[str], multi: bool, bits: bool = True) -> _Pivot:
    names = QUALITY_NAMES[2:] if multi else QUALITY_NAMES if bits else QUALITY_NAMES[1:]
    return _Pivot(key_columns, names, [QUALITY_MERGE], _quality_cells(bits))


def _w_order(k: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(-(x or 16) if isinstance(x, int) or x is None else x for x in k)


def _act_part(v: RunView) -> tuple[str, str]:
    act = v.scheme.get("activation") or {}
    return _granularity("A", act), "sym" if act.get("symmetric") else "asym"


def _zq_tables(sec: Section, views: list[RunView], labels: Mapping[str, str], params: Mapping[str, int],
               models: list[str]) -> list[Table]:
    multi = len(models) > 1

    def table(key: str, title: str, chosen: list[RunView], row_key: Callable[[RunView], tuple[Any, ...]],
              columns: list[str], bits: bool = True) -> Table:
        spec, note = _with_cost(_quality_spec(columns, multi, bits), chosen)
        return _pivot(Table(key + sec.suffix, title + sec.title_suffix, [], note=note), chosen, row_key, _w_order,
                      spec, labels, params, models)

    weight = table("zq-weight", "ZeroQuant-V2: weight-only (RTN)",
                   [v for v in views if v.target == "W" and v.method == "rtn" and not v.lorc],
                   lambda v: (v.w_bits, v.granularity, v.symmetric), ["W bits", "granularity", "symmetry"])
    act = table("zq-activation", "ZeroQuant-V2: activation-only", [v for v in views if v.target == "A"],
                lambda v: (v.a_bits, *_act_part(v), "+".join(v.steps) or "-"),
                ["A bits", "granularity", "symmetry", "method"], bits=False)
    wa = table("zq-weight-activation", "ZeroQuant-V2: weights and activations", [v for v in views if v.target == "W+A"],
               lambda v: (v.w_bits, v.a_bits, v.granularity, v.symmetric, _act_part(v)[1],
                          "+".join(recipe_steps(v.steps, True))),
               ["W bits", "A bits", "granularity", "symmetry", "A symmetry", "method"])
    return [weight, act, wa, _methods(sec, views, labels, params, models)]


# ---- costs: the measured file size and speeds beside the quality ---------------------------------------------

COST_NOTE = ("file MiB: the measured GGUF file; t/s: tokens per second in the runtime named (the median of "
             "repeats) ± its standard error, as every cell of the tables.")


@dataclass(frozen=True)
class _CostColumns:
    """A table's cost columns: the file size where a run has one measured, and each speed a run has."""

    file: bool
    speeds: list[SpeedMetric]

    @classmethod
    def of(cls, views: Iterable[RunView]) -> _CostColumns:
        views = list(views)
        return cls(any(measured_size(v) is not None for v in views), speed_metrics(views))

    @property
    def names(self) -> list[str]:
        head = ["file MiB"] if self.file else []
        return head + [n for s in self.speeds for n in (s.header, f"± se {s.words}")]

    @property
    def merges(self) -> list[Merge]:
        return [Merge(s.header, f"± se {s.words}") for s in self.speeds]

    def cells(self, v: RunView | None) -> list[Cell]:
        if v is None:
            return [None] * len(self.names)
        size = run_size(v, measured_only=True)
        head: list[Cell] = [None if size is None else size.mib] if self.file else []
        for s in self.speeds:
            found = speed(v, s)
            head += [None, None] if found is None else [found.value, found.stderr]
        return head

    def note(self, views: Iterable[RunView]) -> str:
        return " ".join(x for x in (COST_NOTE, speed_settings(views)) if x) if self.names else ""


def _with_cost(spec: _Pivot, views: list[RunView]) -> tuple[_Pivot, str]:
    """``spec`` with the cost columns ``views`` have (none: ``spec`` itself) and the note that explains them."""
    cols = _CostColumns.of(views)
    if not cols.names:
        return spec, ""

    def cells(v: RunView | None, multi: bool) -> list[Cell]:
        return [*spec.cells(v, multi), *cols.cells(v)]

    return (_Pivot(spec.key_columns, [*spec.names, *cols.names], [*spec.merges, *cols.merges], cells, spec.runs_of),
            cols.note(views))


def _cost_table(sec: Section, labels: Mapping[str, str], params: Mapping[str, int], models: list[str]) -> Table:
    """One row per run of the protocol with a measured cost: its quality, estimated and measured size, speeds."""
    rank = {fp: i for i, fp in enumerate(models)}
    chosen = sorted((v for v in sec.views if has_cost(v)),
                    key=lambda v: (rank.get(v.record.model_fingerprint, 0), _bytes(v), run_label(v)))
    multi = len(models) > 1
    cols = _CostColumns.of(chosen)
    corpora = ", ".join(sec.protocol.corpora) or "the runs' corpora"
    t = Table(f"cost{sec.suffix}", f"Quality, size and speed of each run{sec.title_suffix}",
              [*(["model"] if multi else []), "scheme [recipe]", "bits/weight", "Δ ppl", "± (se)", "est. MiB",
               *cols.names], merges=[Merge("Δ ppl", "± (se)", None, True), *cols.merges],
              note=(f"One row per run with a measured cost. Δ ppl: the mean perplexity over {corpora} against FP "
                    f"± its standard error; est. MiB: the size estimated from the effective bits per weight; "
                    + cols.note(chosen)))
    for v in chosen:
        q = quality(v)
        lead: list[Cell] = [model_label(v.record.model_fingerprint, labels, params)] if multi else []
        t.add([*lead, run_label(v), v.weight_bits, None if q is None else q.delta, None if q is None else q.stderr,
               None if v.size_bytes is None else v.size_bytes / MIB, *cols.cells(v)], [v.id])
    t.sizes = sample_sizes(chosen, ["ppl"])
    return t


def _bytes(v: RunView) -> float:
    size = run_size(v)
    return size.bytes if size is not None else float("inf")


def _methods(sec: Section, views: list[RunView], labels: Mapping[str, str], params: Mapping[str, int],
             models: list[str]) -> Table:
    """Per weight scheme and method: quality without and with LoRC, and what LoRC gains."""
    t = Table(f"zq-methods{sec.suffix}", f"ZeroQuant-V2: methods, without and with LoRC{sec.title_suffix}", [])
    t.note = ("LoRC gain: the increase over FP without LoRC minus the increase with it (positive: LoRC helps), "
              "its standard error paired over the windows both runs share.")
    pairs: dict[tuple[Any, ...], dict[bool, RunView]] = {}
    for v in views:
        if v.target == "W" and quality(v) is not None:
            key = (v.w_bits, v.granularity, v.symmetric, v.method, v.record.model_fingerprint)
            pairs.setdefault(key, {}).setdefault(v.lorc, v)
    plain_views = [p.get(False) or p[True] for p in pairs.values()]
    partner = {id(p.get(False) or p[True]): p for p in pairs.values()}

    def cells(v: RunView | None, multi: bool) -> list[Cell]:
        if v is None:
            return [None] * 8
        pair = partner[id(v)]
        plain, lorc = pair.get(False), pair.get(True)
        qp = quality(plain) if plain else None
        ql = quality(lorc) if lorc else None
        gain: Cell = None
        gain_se: Cell = None
        if qp is not None and ql is not None and plain is not None and lorc is not None:
            gain = qp.delta - ql.delta
            diff = quality_difference(plain, lorc)
            gain_se = None if diff is None else diff.stderr
        return [*_dcs(qp), *_dcs(ql), gain, gain_se]

    def runs_of(v: RunView) -> list[str]:
        return [x.id for x in (partner[id(v)].get(False), partner[id(v)].get(True)) if x is not None]

    spec = _Pivot(["W bits", "granularity", "symmetry", "method"],
                  ["Δ ppl", "± (se)", "class", "Δ ppl +LoRC", "± +LoRC", "class +LoRC", "LoRC gain", "± gain"],
                  [Merge("Δ ppl", "± (se)", "class", True), Merge("Δ ppl +LoRC", "± +LoRC", "class +LoRC", True),
                   Merge("LoRC gain", "± gain", None, True)], cells, runs_of)
    return _pivot(t, plain_views, lambda v: (v.w_bits, v.granularity, v.symmetric, v.method), _w_order, spec,
                  labels, params, models)


def _dcs(q: Change | None) -> list[Cell]:
    return [None, None, None] if q is None else [q.delta, q.stderr, zq_class(q.delta)]


# ---- qllm-eval: bit widths as columns -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Measure:
    """A row measure: its words, its metric, and whether cells are changes from FP (else the values)."""

    words: str
    metric: str
    change: bool = True


def _metric_names(views: list[RunView], keep: Callable[[str], bool]) -> list[str]:
    return sorted({n for v in views for n in v.metrics if keep(n)})


def _bits_pivot(t: Table, views: list[RunView], measures: list[_Measure], labels: Mapping[str, str],
                params: Mapping[str, int], models: list[str]) -> Table:
    """Rows: (measure, model, series); columns: the series' open bit width ``b``; cells ``Δ ± se``."""
    multi = len(models) > 1
    quantized = [v for v in views if swept_bits(v) is not None]
    widths = sorted({b for v in quantized if (b := swept_bits(v)) is not None}, reverse=True)
    head = ["measure", *(["model"] if multi else []), "scheme (b: the column's bits)", "FP"]
    t.columns = head.copy()
    signed = any(m.change for m in measures)
    for b in widths:
        t.columns += [f"b={b}", f"± b={b}"]
        t.merges.append(Merge(f"b={b}", f"± b={b}", None, signed=signed))
    rows: dict[tuple[str, str, str], dict[int, list[RunView]]] = {}
    for m in measures:
        for v in quantized:
            if m.metric in v.metrics:
                rows.setdefault((m.metric, v.record.model_fingerprint, series_label(v)), {}) \
                    .setdefault(swept_bits(v) or 0, []).append(v)
    order = {m.metric: i for i, m in enumerate(measures)}
    words = {m.metric: m for m in measures}
    rank = {fp: i for i, fp in enumerate(models)}
    first: dict[str, tuple[int, str]] = {}
    for v in quantized:
        first.setdefault(series_label(v), (_target_rank(v), v.target))

    def sort_key(k: tuple[str, str, str]) -> tuple[Any, ...]:
        return order[k[0]], rank.get(k[1], 0), first[k[2]], k[2]

    for key in sorted(rows, key=sort_key):
        metric, fp, series = key
        m = words[metric]
        cols = rows[key]
        for i in range(max(len(rs) for rs in cols.values())):
            base = None
            cells: list[Cell] = []
            runs: list[str] = []
            for b in widths:
                found = cols.get(b, [])
                if i >= len(found):
                    cells += [None, None]
                    continue
                run = found[i]
                c = run.change(metric)
                base = base or c
                if m.change:
                    cells += [None, None] if c is None else [c.delta, c.stderr]
                else:
                    cells += [run.metrics[metric], run.stderr.get(metric)]
                runs.append(run.id)
            label = series if i == 0 else f"{series} #{i + 1}"
            lead: list[Cell] = [m.words, *([model_label(fp, labels, params)] if multi else []), label,
                                None if base is None else base.fp]
            t.add([*lead, *cells], runs)
    mixed = sum(1 for v in views if v.mixed_weights and any(m.metric in v.metrics for m in measures))
    if mixed:
        t.note = (f"{t.note} {mixed} run{'s' if mixed > 1 else ''} with mixed weights (per-linear overrides) "
                  "sit at no bit width and are left out here (their effective bits: a search's figure, "
                  "`ptqlab show RUN`).").strip()
    return t


def _qllm_tables(sec: Section, views: list[RunView], labels: Mapping[str, str], params: Mapping[str, int],
                 models: list[str]) -> list[Table]:
    sfx, tsfx = sec.suffix, sec.title_suffix
    corpus_rank = {c: i for i, c in enumerate(sec.protocol.corpora)}
    ppl = sorted(_metric_names(views, lambda n: parse_name(n).kind == "ppl" and parse_name(n).corpus is not None),
                 key=lambda n: (corpus_rank.get(str(parse_name(n).corpus), 99), n))
    accs = _metric_names(views, lambda n: _is_accuracy(n))
    agree = [task_name(str(parse_name(n).task), "agree_fp") for n in accs]
    div = sorted(_metric_names(views, lambda n: parse_name(n).kind in DIVERGENCE_ORDER),
                 key=lambda n: (DIVERGENCE_ORDER.index(parse_name(n).kind), n))
    ret = sorted(_metric_names(views, lambda n: parse_name(n).kind == "retrieval"),
                 key=lambda n: parse_name(n).length or 0)
    note = ("Each row is one scheme with its bit width open (b); each column gives b. Cells: the change from "
            "FP ± its standard error; FP: the full-precision value.")
    specs: list[tuple[str, str, list[_Measure], str]] = [
        ("qllm-perplexity", "qllm-eval: perplexity change by bit width",
         [_Measure(f"Δ ppl {parse_name(n).corpus}", n) for n in ppl], note),
        ("qllm-tasks", "qllm-eval: basic tasks, accuracy change by bit width",
         [_Measure(f"Δ acc {parse_name(n).task}", n) for n in accs],
         note + " The standard error is paired over the items where the run stored its answers against FP's."),
        ("qllm-agreement", "qllm-eval: basic tasks, agreement with FP's answers",
         [_Measure(f"agreement {parse_name(n).task}", n, change=False) for n in agree if _any(views, n)],
         "Cells: the share of items answered as FP answered them."),
        ("qllm-divergence", "qllm-eval: divergence from FP by bit width",
         [_Measure(_div_words(n), n, change=False) for n in div],
         "Cells: the divergence of the quantized model's next-token distribution from FP's (KL: nats per "
         "token; top-k: the share of tokens whose FP top-1 is among the quantized top-k)."),
        ("qllm-long-context", "qllm-eval: long-context retrieval, accuracy change by bit width",
         [_Measure(f"Δ retrieval acc, {parse_name(n).length} tokens", n) for n in ret],
         note + " Standard errors from Wilson intervals of each accuracy, combined as independent."),
    ]
    out = []
    for key, title, measures, text in specs:
        if not measures:
            continue
        t = _bits_pivot(Table(key + sfx, title + tsfx, [], note=text), views, measures, labels, params, models)
        kinds = {parse_name(m.metric).kind for m in measures}
        t.sizes = sample_sizes([v for v in views if any(m.metric in v.metrics for m in measures)], kinds)
        out.append(t)
    return out


def _is_accuracy(name: str) -> bool:
    m = parse_name(name)
    return m.kind == "lm_eval" and m.measure == "acc" and m.shots is None


def _any(views: list[RunView], name: str) -> bool:
    return any(name in v.metrics for v in views)


def _div_words(name: str) -> str:
    m = parse_name(name)
    kind = {"kl": "KL", "top1": "top-1 agreement", "top5": "top-5 agreement"}.get(m.kind, m.kind)
    return f"{kind} {m.corpus}"


# ---- all tables -----------------------------------------------------------------------------------------------


def build_tables(views: list[RunView]) -> list[Table]:
    """Every table the runs have data for, per evaluation protocol (a table with no row is left out).

    ZeroQuant-V2's tables are built for the protocols with its three corpora when there are any, else for
    every protocol with perplexities (their quality is then the mean over the protocol's own corpora, as
    the tables' note says).
    """
    sections = protocol_sections(views)
    labels, params = model_labels(views), model_params(views)
    zq_sections = [s for s in sections if set(ZQ_CORPORA) <= set(s.protocol.corpora)] or sections
    tables: list[Table] = []
    for sec in sections:
        models = _model_order(_by_model(sec.views), params, labels)
        found: list[Table] = []
        if sec in zq_sections:
            zq = [v for v in sec.views if quality(v) is not None and not v.mixed_weights]
            corpora = ", ".join(sec.protocol.corpora) or "the runs' corpora"
            note = (f"Quality: mean perplexity over {corpora}; class by the increase over FP (<= 0.1: 1, "
                    f"<= 0.5: 2, else 3). Cells: Δ ppl ± its standard error (class).")
            for t in _zq_tables(sec, zq, labels, params, models):
                t.note = " ".join(x for x in (note, t.note) if x)
                t.sizes = sample_sizes(zq, ["ppl"])
                found.append(t)
        found += _qllm_tables(sec, sec.views, labels, params, models)
        found += [_cost_table(sec, labels, params, models), *_fidelity_tables(sec)]
        for t in found:
            t.section, t.protocol = sec.index, sec.protocol.describe()
        tables += [t for t in found if t.rows]
    return tables


def _fidelity_tables(sec: Section) -> list[Table]:
    """The fidelity statistics of :mod:`.fidelity` for one protocol section, labelled as every other table."""
    by_id = {v.id: v for v in sec.views}
    out = []
    for t in fidelity_tables(sec.views):
        t.key, t.title = t.key + sec.suffix, t.title + sec.title_suffix
        if t.columns and t.columns[0] == "run":  # the run's label with its symmetry and rounding
            t.columns[0] = "scheme [recipe]"
            for cells, runs in zip(t.rows, t.runs, strict=True):
                if runs and runs[0] in by_id:
                    cells[0] = run_label(by_id[runs[0]])
        t.merges += [Merge(v, e) for v, e in (("KL", "± se"), ("ppl ratio", "± ratio"))
                     if v in t.columns and e in t.columns]
        t.sizes = sample_sizes(sec.views, ["ppl", "kl", "lm_eval"])
        out.append(t)
    return out


def slug(text: str) -> str:
    """``smollm2-135m``: lower case, runs of other characters as one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
