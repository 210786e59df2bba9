"""Stored runs as the report sees them: what each quantizes, how, and its change from full precision.

A :class:`RunView` is one finished run with the labels every table groups by (target, bits, granularity,
symmetry, method, LoRC) and its measurements as changes from FP with standard errors.

Cohorts. A run's :class:`Protocol` (corpora, window length and count, tasks, item limit, few-shot counts,
divergence and long-context settings) and its model (fingerprint) make its *cohort*
(:attr:`RunView.cohort`). Numbers are compared, paired, ranked or drawn together only within one cohort:
:func:`cohorts` groups views, :func:`same_cohort` tests two, :func:`difference` refuses two of different
cohorts. FP values come from the run itself where it stored them (the FP window NLLs of its perplexity
windows, its paired task measures; both exact) and otherwise only from an FP run of the same cohort;
a run whose cohort has no FP run has no change for such a metric (never one against another protocol's
FP).

Quality. The quality of a run (:func:`quality`) is the mean perplexity over *its own protocol's* corpora
(ZeroQuant-V2's three corpora in its protocol, wikitext2 alone in qllm-eval's), as a :class:`Quality`
that says which corpora it is a mean of. It is comparable only within its cohort.

Uncertainty: one convention everywhere. A :class:`Change` carries the standard error ``se`` of its
difference; its 95 % interval is ``delta ± 1.96 se`` (:meth:`Change.interval`), and a change without a
standard error has no interval (None), never a zero-width one. The standard errors:

- perplexity: from the paired per-window NLL differences (delta method), combined over corpora as
  independent;
- an accuracy of ``n`` items (lm-eval tasks, pass-key retrieval): the Wilson score interval
  (:func:`wilson`), whose half-width / 1.96 is its standard error (:func:`proportion_se`); it is > 0 even
  at 0 or ``n`` correct, where the usual ``sqrt(p(1-p)/n)`` is 0;
- an accuracy change with the run's paired measures (items lost and gained against FP): the Wald SE of
  a paired difference, ``sqrt((gained + lost - delta²) / (n - 1))``, floored at ``1 / n`` (the SE of one
  discordant item), so a run that answered every item as FP did still has an interval. ``n`` (items) is
  read from lm-eval's standard error of any accuracy of the task in the cohort that is strictly between
  0 and 1 (``n = p(1-p)/se² + 1``), else from the protocol's ``limit``;
- an accuracy change without paired measures: the two Wilson standard errors combined as independent.

An FP run compared with itself is exact (standard error 0). Numbers are printed with :func:`fmt_number`
/ :func:`fmt_signed`, which never write ``-0``; JSON goes through :func:`json_ready` (no NaN/Infinity).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math
import statistics
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..metrics import BITS_WEIGHT, SIZE_MODEL_BYTES, MetricName, parse_name, task_name
from ..quant.spec import FIXED_BITS
from ..store import RunRecord, Store

__all__ = ["Z95", "Change", "Protocol", "Quality", "RunView", "by_cohort", "cohort_label", "cohorts",
           "describe_scheme", "describe_sizes", "difference", "fmt_number", "fmt_signed", "json_ready",
           "load_views", "paired_proportion_se", "paired_windows", "part_label", "proportion_se", "quality",
           "quality_difference", "same_cohort", "wilson", "zq_class"]

ZQ_CORPORA = ("wikitext2", "ptb_new", "c4local_new")
Z95 = 1.96  # the one multiplier: every interval of the report is delta ± 1.96 se (95 %)
ACCURACY_MEASURES = ("acc", "acc_norm", "exact_match")
COST_KINDS = ("speed", "size", "memory")  # metric kinds a run measures on itself, with no FP counterpart


def is_task_accuracy(name: str | MetricName) -> bool:
    """Whether a metric is an lm-eval task's plain accuracy (``lm_eval.<task>.acc``, no few-shot count)."""
    m = parse_name(name) if isinstance(name, str) else name
    return m.kind == "lm_eval" and m.measure == "acc" and m.shots is None


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``p`` observed on ``n`` items (95 % by default).

    Unlike ``p ± z sqrt(p(1-p)/n)`` it has width > 0 at ``p`` = 0 or 1 and stays inside [0, 1].
    """
    if n <= 0:
        raise ValueError(f"a proportion needs at least one item, got n={n}")
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion_se(p: float, n: int) -> float:
    """The standard error of a proportion from its Wilson interval: half its 95 % width over 1.96 (> 0)."""
    lo, hi = wilson(p, n)
    return (hi - lo) / (2 * Z95)


def paired_proportion_se(gained: float, lost: float, n: int) -> float:
    """The SE of a paired accuracy change ``gained - lost`` over ``n`` items (fractions of ``n``).

    The Wald SE of the mean of the per-item differences (-1, 0, +1), floored at ``1 / n``, the SE with
    one discordant item, so that it is never 0 for a finite sample.
    """
    diff = gained - lost
    wald = math.sqrt(max(gained + lost - diff * diff, 0.0) / (n - 1)) if n > 1 else math.inf
    return max(wald, 1.0 / n)


def _zero(text: str) -> bool:
    return not any(ch in "123456789" for ch in text.split("e")[0])


def fmt_number(x: float | None, spec: str = ".4g", missing: str = "–") -> str:
    """``x`` formatted with ``spec``, never ``-0`` (a value that rounds to zero is written unsigned)."""
    if x is None:
        return missing
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    text = format(x, spec)
    return text.lstrip("-+") if _zero(text) else text


def fmt_signed(x: float | None, spec: str = ".4g", missing: str = "–") -> str:
    """``x`` with an explicit sign (``+0.05``, ``-0.3667``); a value that rounds to zero is ``0`` unsigned."""
    text = fmt_number(x, spec, missing)
    if x is None or math.isnan(x) or text.startswith("-") or (math.isfinite(x) and _zero(text)):
        return text
    return "+" + text


def json_ready(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, so ``json.dumps(allow_nan=False)`` passes.

    Mappings, lists and tuples are copied; other values are returned as they are.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    return obj


@dataclass(frozen=True)
class Change:
    """A measurement of a quantized run against FP: both values, their difference and its standard error.

    ``stderr`` is the standard error of :attr:`delta` (None: unknown; 0: exact, e.g. a run against itself).
    """

    value: float
    fp: float
    stderr: float | None = None

    @property
    def delta(self) -> float:
        """The quantized value minus the FP value."""
        return self.value - self.fp

    def interval(self, z: float = Z95) -> tuple[float, float] | None:
        """``delta ± z se``: the 95 % interval by default; None when there is no standard error."""
        if self.stderr is None:
            return None
        half = z * self.stderr
        return self.delta - half, self.delta + half

    def describe(self, spec: str = ".4g") -> str:
        """``-0.05 [95% -0.08, -0.02]`` (``-0.05 [no interval]`` without a standard error)."""
        iv = self.interval()
        if iv is None:
            return f"{fmt_signed(self.delta, spec)} [no interval]"
        return f"{fmt_signed(self.delta, spec)} [95% {fmt_signed(iv[0], spec)}, {fmt_signed(iv[1], spec)}]"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready mapping (strict: no NaN or infinity)."""
        iv = self.interval()
        return json_ready({"value": self.value, "fp": self.fp, "delta": self.delta, "stderr": self.stderr,
                           "interval": list(iv) if iv else None})


@dataclass(frozen=True)
class Quality(Change):
    """A run's quality against FP: the mean perplexity over ``corpora`` (its protocol's), FP's the same way."""

    corpora: tuple[str, ...] = ()

    @property
    def of(self) -> str:
        """What the value is a mean of, in words: ``mean ppl over wikitext2, ptb_new`` / ``ppl on wikitext2``."""
        if len(self.corpora) == 1:
            return f"ppl on {self.corpora[0]}"
        return f"mean ppl over {', '.join(self.corpora)}"


def part_label(prefix: str, section: Mapping[str, Any] | None) -> str | None:
    """``W4 group64`` / ``Anf4`` / ``KV4 head`` / ``KV4 head (K channel)``, or None for a full-precision part."""
    if section is None or section_bits(section) is None:
        return None
    fmt = section.get("format") or "int"
    size = str(section.get("bits")) if fmt == "int" else fmt
    gran = section.get("granularity") or ""
    return f"{prefix}{size} {gran}{section.get('group_size') or ''}".strip() + kv_sides(section)


_SIDES = (("key", "K"), ("value", "V"))


def kv_sides(section: Mapping[str, Any]) -> str:
    """What a KV-cache section's ``key`` / ``value`` entries set apart from the section, `` (K channel)``; ``""``."""
    parts = []
    for side, letter in _SIDES:
        own = section.get(side) or {}
        words = []
        if own.get("bits") is not None and own["bits"] != section.get("bits"):
            words.append(f"{own['bits']}b")
        gran, size = own.get("granularity"), own.get("group_size")
        if (gran is not None and gran != section.get("granularity")) or (size is not None
                                                                      and size != section.get("group_size")):
            words.append(f"{gran or section.get('granularity')}{size or ''}")
        if own.get("symmetric") is not None and own["symmetric"] != section.get("symmetric"):
            words.append("sym" if own["symmetric"] else "asym")
        if words:
            parts.append(f"{letter} {' '.join(words)}")
    return f" ({'; '.join(parts)})" if parts else ""


def describe_scheme(scheme: Mapping[str, Any]) -> str:
    """A short description of a scheme, e.g. ``W4 group64 + A8 token + KV4 head`` (``FP`` if none).

    A scheme whose ``overrides`` give some linears another weight spec (a searched mixed-precision run, a GGUF
    mix) says so after its base weight part: ``Wgguf_q4_0 mixed (12 overrides)``; a quantized input embedding
    ends it: ``+ Egguf_q8_0``.
    """
    keys = (("W", "weight"), ("A", "activation"), ("KV", "kv_cache"), ("E", "embedding"))
    parts = [part_label(prefix, scheme.get(key)) for prefix, key in keys]
    mixed = weight_overrides(scheme)
    if mixed:
        parts[0] = f"{parts[0] or 'WFP'} mixed ({mixed} override{'s' if mixed > 1 else ''})"
    return " + ".join(p for p in parts if p) or "FP"


def weight_overrides(scheme: Mapping[str, Any]) -> int:
    """How many of a scheme's ``overrides`` give some linears another weight spec (0: uniform weights)."""
    return sum(1 for o in scheme.get("overrides") or () if isinstance(o, Mapping) and "weight" in o)


def section_bits(section: Mapping[str, Any] | None) -> int | None:
    """The bits a scheme section quantizes to (a format's own bits), or None when it stays in full precision."""
    if not section:
        return None
    fmt = section.get("format") or "int"
    bits = section.get("bits") if fmt == "int" else FIXED_BITS.get(fmt, section.get("bits"))
    return None if bits is None or bits >= 16 else int(bits)


def _json_or_none(section: Any) -> str | None:
    return None if section in (None, False, {}) else json.dumps(section, sort_keys=True)


@dataclass(frozen=True)
class Protocol:
    """What a run's measurements were taken on; runs of different protocols are never compared.

    Attributes:
        corpora: The perplexity corpora, in the order the run named them.
        seqlen: Tokens per perplexity window.
        windows: The most windows per corpus (``evaluate.max_windows``; None: every window).
        tasks: The lm-eval tasks.
        limit: Items per task (None: all).
        fewshot: The few-shot count(s) (``evaluate.num_fewshot``).
        divergence: The divergence section (corpus, windows, seqlen, k), as JSON (None: none).
        long_context: The long-context retrieval section (lengths, pairs, samples, seed), as JSON (None: none).

    """

    corpora: tuple[str, ...] = ()
    seqlen: int | None = None
    windows: int | None = None
    tasks: tuple[str, ...] = ()
    limit: float | None = None
    fewshot: tuple[int, ...] | int | None = None
    divergence: str | None = None
    long_context: str | None = None

    @classmethod
    def of(cls, record: RunRecord) -> Protocol:
        """The protocol of a stored run, from its ``evaluate`` section."""
        ev = dict(record.config.get("evaluate") or {})
        shots = ev.get("num_fewshot")
        return cls(tuple(ev.get("perplexity") or ()), ev.get("seqlen"), ev.get("max_windows"),
                   tuple(ev.get("tasks") or ()), ev.get("limit"),
                   tuple(shots) if isinstance(shots, list) else shots,
                   _json_or_none(ev.get("divergence")), _json_or_none(ev.get("long_context")))

    @property
    def key(self) -> str:
        """A string that is equal exactly when two protocols are."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @property
    def id(self) -> str:
        """A short stable id of the protocol (8 hex digits), for ``--where protocol=ID``."""
        return hashlib.sha256(self.key.encode()).hexdigest()[:8]

    def describe(self) -> str:
        """``wikitext2, ptb_new: windows of 2048, at most 8 per corpus; tasks piqa (100 items, 0-shot)``."""
        parts = []
        if self.corpora:
            most = "all windows" if self.windows is None else f"at most {self.windows} per corpus"
            parts.append(f"{', '.join(self.corpora)}: windows of {self.seqlen}, {most}")
        if self.tasks:
            items = "all items" if self.limit is None else f"{self.limit:g} items"
            shots = self.fewshot if self.fewshot is not None else 0
            parts.append(f"tasks {', '.join(self.tasks)} ({items}, {shots}-shot)")
        if self.divergence is not None:
            parts.append(_describe_section("divergence", self.divergence))
        if self.long_context is not None:
            parts.append(_describe_section("retrieval", self.long_context))
        return "; ".join(parts) or "no evaluation"


def _describe_section(what: str, text: str) -> str:
    """``divergence on wikitext2 (4 windows of 512, top-32)`` / ``retrieval at 512, 1024 (5 samples, 4 pairs)``."""
    sec = json.loads(text)
    if not isinstance(sec, dict):
        return f"{what} {text}"
    try:
        if what == "divergence":
            return (f"divergence on {sec['corpus']} ({sec.get('windows', 'all')} windows of {sec['seqlen']}"
                    + (f", top-{sec['top_k']})" if sec.get("top_k") else ")"))
        lengths = ", ".join(str(n) for n in sec["lengths"])
        return (f"retrieval at {lengths} tokens ({sec['samples']} samples, {sec['pairs']} pairs, "
                f"seed {sec.get('seed', 0)})")
    except (KeyError, TypeError):
        return f"{what} {text}"


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
    windows: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The run id."""
        return self.record.id

    @functools.cached_property
    def protocol(self) -> Protocol:
        """What the run was measured on."""
        return Protocol.of(self.record)

    @functools.cached_property
    def cohort(self) -> tuple[str, str]:
        """The model (fingerprint) and protocol: only runs of one cohort are compared, ranked or drawn together."""
        return self.record.model_fingerprint, self.protocol.key

    @functools.cached_property
    def cohort_id(self) -> str:
        """A short stable id of the cohort (8 hex digits), for ``--where cohort=ID``."""
        return hashlib.sha256("\n".join(self.cohort).encode()).hexdigest()[:8]

    @property
    def is_fp(self) -> bool:
        """The run quantizes nothing and applies no method: an FP baseline."""
        return self.target == "FP" and not self.steps

    @property
    def scheme(self) -> dict[str, Any]:
        """The run's scheme section."""
        return dict(self.record.config.get("scheme") or {})

    @property
    def mixed_weights(self) -> bool:
        """Some weights take another spec than the scheme's linears: the run sits at no one bit width.

        Overrides giving some linears another weight spec (a searched mixed-precision run), or a quantized
        input embedding (``scheme.embedding``).
        """
        return weight_overrides(self.scheme) > 0 or section_bits(self.scheme.get("embedding")) is not None

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

    def sample_size(self, name: str) -> int | None:
        """How many samples a metric is measured on; None when unknown.

        Windows (perplexity, divergence), items (an lm-eval accuracy) or samples (retrieval).
        """
        m = parse_name(name)
        if m.kind == "retrieval":
            return m.samples
        if m.windows is not None:
            stored = self.windows.get(name, {}).get("nll")
            return len(stored) if stored else m.windows
        if m.kind == "lm_eval" and m.task is not None and m.measure in ACCURACY_MEASURES:
            return self.items.get(m.task)
        return None

    def change(self, name: str) -> Change | None:
        """The run's ``name`` against FP of its own cohort, or None when either side is missing.

        The standard error: 0 for an FP run against itself; the paired one where the run stored paired data
        (windows, items lost and gained); else, for an accuracy of known size, the two Wilson standard
        errors combined; else the two stored standard errors combined (None unless both exist).
        """
        if name not in self.metrics or name not in self.fp:
            return None
        value, fp = self.metrics[name], self.fp[name]
        se: float | None
        if self.is_fp and value == fp:
            se = 0.0
        elif name in self.paired_se:
            se = self.paired_se[name]
        elif (n := self.sample_size(name)) and _is_proportion(name):
            se = math.hypot(proportion_se(value, n), proportion_se(fp, n))
        else:
            a, b = self.stderr.get(name), self.fp_stderr.get(name)
            se = None if a is None or b is None else math.hypot(a, b)
        return Change(value, fp, se)

    def perplexities(self, corpora: Iterable[str] | None = None) -> dict[str, str]:
        """``{corpus: metric name}`` of the run's perplexities (only ``corpora`` when given)."""
        wanted = None if corpora is None else set(corpora)
        out: dict[str, str] = {}
        for name in sorted(self.metrics):
            m = parse_name(name)
            if m.kind == "ppl" and m.corpus is not None and (wanted is None or m.corpus in wanted):
                out.setdefault(m.corpus, name)
        return out

    @property
    def quality_corpora(self) -> tuple[str, ...]:
        """The corpora the run's quality is a mean over: its protocol's.

        When its config names none (an older or hand-made record), the corpora of its stored perplexities.
        """
        return self.protocol.corpora or tuple(self.perplexities())

    def quality(self, corpora: Iterable[str] | None = None) -> Quality | None:
        """The mean perplexity over ``corpora`` (default: the run's own protocol's) against FP's.

        None if any corpus or its FP value is missing.
        """
        corpora = self.quality_corpora if corpora is None else tuple(corpora)
        names = self.perplexities(corpora)
        if not corpora or len(names) != len(corpora):
            return None
        return _mean_over(corpora, [self.change(names[c]) for c in corpora])


def _is_proportion(name: str) -> bool:
    m = parse_name(name)
    return m.kind == "retrieval" or (m.kind == "lm_eval" and m.measure in ACCURACY_MEASURES)


def quality(v: RunView) -> Quality | None:
    """The run's quality: the mean perplexity over its own protocol's corpora against FP's.

    One definition for every run; a quality is comparable only with those of the same cohort
    (:func:`same_cohort`), and :attr:`Quality.corpora` says what it is a mean of.
    """
    return v.quality()


def zq_class(delta: float) -> int:
    """ZeroQuant-V2's sensitivity class of a perplexity increase: 1 (<= 0.1), 2 (<= 0.5) or 3."""
    return 1 if delta <= 0.1 else 2 if delta <= 0.5 else 3


def cohorts(views: Iterable[RunView]) -> dict[tuple[str, str], list[RunView]]:
    """The views grouped by cohort (model fingerprint, protocol key), in the order cohorts first appear."""
    out: dict[tuple[str, str], list[RunView]] = {}
    for v in views:
        out.setdefault(v.cohort, []).append(v)
    return out


def by_cohort(views: Iterable[RunView]) -> Iterator[list[RunView]]:
    """The views of each cohort in turn (see :func:`cohorts`)."""
    yield from cohorts(views).values()


def same_cohort(a: RunView, b: RunView) -> bool:
    """Whether two runs may be compared: the same model and the same evaluation protocol."""
    return a.cohort == b.cohort


def cohort_label(v: RunView) -> str:
    """The cohort of a run in words: ``smollm2-135m, <protocol> [cohort 1a2b3c4d]``."""
    return f"{v.record.model}, {v.protocol.describe()} [cohort {v.cohort_id}]"


def describe_sizes(views: Iterable[RunView]) -> str:
    """The sample sizes behind a cohort's numbers, for a caption.

    E.g. ``windows: wikitext2 (512 tokens) 4; items: piqa 30; samples: retrieval len512 5``; a size that
    differs between runs is given as a range.
    """
    sizes: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
    for v in views:
        for name in v.metrics:
            n, m = v.sample_size(name), parse_name(name)
            if n is None:
                continue
            if m.kind == "ppl" and m.corpus:
                sizes["windows", f"{m.corpus} ({m.seqlen} tokens)"].add(n)
            elif m.windows is not None and m.corpus:
                sizes["windows", f"divergence on {m.corpus} ({m.seqlen} tokens)"].add(n)
            elif m.kind == "lm_eval" and m.task:
                sizes["items", m.task].add(n)
            elif m.kind == "retrieval":
                sizes["samples", f"retrieval len{m.length}"].add(n)
    parts: dict[str, list[str]] = collections.defaultdict(list)
    for (kind, what), ns in sizes.items():
        count = str(min(ns)) if len(ns) == 1 else f"{min(ns)}-{max(ns)}"
        parts[kind].append(f"{what} {count}")
    return "; ".join(f"{kind}: {', '.join(sorted(set(p)))}" for kind, p in parts.items())


def paired_windows(a: RunView, b: RunView, name: str) -> bool:
    """Whether two runs of one cohort stored the same number (>= 2) of windows of ``name``, to pair them."""
    na = (a.windows.get(name) or {}).get("nll") or []
    nb = (b.windows.get(name) or {}).get("nll") or []
    return same_cohort(a, b) and len(na) == len(nb) >= 2


def difference(a: RunView, b: RunView, name: str) -> Change | None:
    """Run ``b``'s ``name`` against run ``a``'s (``value`` = b's, ``fp`` = a's), or None.

    None when either lacks the metric or the runs are of different cohorts (never paired across
    protocols). The standard error is paired over the windows both stored (the per-window NLL
    differences); for a cost (speed, file size, memory: measured on each run alone) the two runs' own
    standard errors combined; else the two runs' standard errors against FP combined; else None.
    """
    if not same_cohort(a, b) or name not in a.metrics or name not in b.metrics:
        return None
    va, vb = a.metrics[name], b.metrics[name]
    se: float | None = None
    if paired_windows(a, b, name):
        diffs = [y - x for x, y in zip(a.windows[name]["nll"], b.windows[name]["nll"], strict=True)]
        se = vb * statistics.stdev(diffs) / math.sqrt(len(diffs))
    elif parse_name(name).kind in COST_KINDS:  # measured on each run alone, with no FP side
        sa, sb = a.stderr.get(name), b.stderr.get(name)
        se = None if sa is None or sb is None else math.hypot(sa, sb)
    else:
        ca, cb = a.change(name), b.change(name)
        if ca is not None and cb is not None and ca.stderr is not None and cb.stderr is not None:
            se = math.hypot(ca.stderr, cb.stderr)
        elif _is_proportion(name) and (n := a.sample_size(name)):
            se = math.hypot(proportion_se(va, n), proportion_se(vb, n))
    return Change(vb, va, se)


def quality_difference(a: RunView, b: RunView) -> Quality | None:
    """Run ``b``'s quality against run ``a``'s (``value`` = b's mean ppl, ``fp`` = a's); None across cohorts.

    The standard error combines the per-corpus :func:`difference` (paired over shared windows) as
    independent corpora.
    """
    if not same_cohort(a, b):
        return None
    corpora = a.quality_corpora
    if corpora != b.quality_corpora or not corpora:
        return None
    names_a, names_b = a.perplexities(corpora), b.perplexities(corpora)
    if len(names_a) != len(corpora) or names_a != names_b:
        return None
    return _mean_over(corpora, [difference(a, b, names_a[c]) for c in corpora])


def _mean_over(corpora: tuple[str, ...], changes: list[Change | None]) -> Quality | None:
    """The mean of one change per corpus (None if any is missing); the corpora's errors taken as independent."""
    found = [c for c in changes if c is not None]
    if len(found) != len(corpora):
        return None
    n = len(found)
    errs = [c.stderr for c in found]
    se = None if any(e is None for e in errs) else math.sqrt(sum(e * e for e in errs if e is not None)) / n
    return Quality(sum(c.value for c in found) / n, sum(c.fp for c in found) / n, se, corpora)


def load_views(store: Store, runs: list[RunRecord] | None = None) -> list[RunView]:
    """Views of the store's finished runs (or of ``runs``) with FP baselines attached, oldest first.

    Baselines and item counts come only from runs of the same cohort (FP runs outside ``runs`` included).
    """
    records = runs if runs is not None else store.list_runs(status="done")
    membership = store.memberships()
    missing = [r.id for r in records if not r.windows]  # records from ``get`` carry theirs already
    windows = store.windows(missing) if missing else {}
    views = [_view(r, membership.get(r.id, []), r.windows or windows.get(r.id, {})) for r in records]
    # FP runs outside ``runs`` can be the baseline too (every finished run is in ``records`` already when None)
    ids = {v.id for v in views}
    outside = [] if runs is None else [_view(r, [], {}) for r in store.list_runs(status="done") if r.id not in ids]
    for members in by_cohort([*views, *outside]):
        items = _task_items(members)
        fps = [f for f in members if f.is_fp]
        for v in members:
            if v.id not in ids:
                continue
            v.items = {**items, **_own_items(v)}
            _attach_fp(v, fps)
            _attach_task_se(v)
    return views


def _view(record: RunRecord, sweeps: list[str], windows: Mapping[str, Mapping[str, Any]]) -> RunView:
    view = RunView(record, sweeps=sweeps)
    view.metrics = {m.name: m.value for m in record.metrics}
    view.stderr = {m.name: m.stderr for m in record.metrics}
    view.windows = dict(windows)
    for name, w in windows.items():
        nll, fp_nll = w.get("nll") or [], w.get("fp_nll")
        if not fp_nll or len(fp_nll) != len(nll) or not nll or name not in view.metrics:
            continue
        view.fp[name] = math.exp(statistics.fmean(fp_nll))
        diffs = [a - b for a, b in zip(nll, fp_nll, strict=True)]
        if len(diffs) > 1:
            view.paired_se[name] = view.metrics[name] * statistics.stdev(diffs) / math.sqrt(len(diffs))
    for name in list(view.metrics):
        fp = _task_fp(view, name)
        if fp is not None:
            view.fp.setdefault(name, fp)
    return view


def _paired(view: RunView, name: str) -> tuple[float, float] | None:
    """``(gained, lost)`` of a task accuracy from the run's own paired measures, or None."""
    m = parse_name(name)
    if m.kind != "lm_eval" or m.task is None or not is_task_accuracy(m):
        return None
    lost, gained = view.metrics.get(task_name(m.task, "lost")), view.metrics.get(task_name(m.task, "gained"))
    return None if lost is None or gained is None else (gained, lost)


def _task_fp(view: RunView, name: str) -> float | None:
    """FP's accuracy from the run's own paired measures (exact): ``acc - gained + lost``."""
    paired = _paired(view, name)
    return None if paired is None else view.metrics[name] - paired[0] + paired[1]


def _attach_task_se(view: RunView) -> None:
    """The paired standard error of each task accuracy change with paired measures (needs the item count)."""
    for name in view.metrics:
        paired = _paired(view, name)
        n = view.sample_size(name)
        if paired is not None and n is not None and n >= 1:
            view.paired_se[name] = paired_proportion_se(*paired, n)


def _items_from_se(p: float, se: float | None) -> int | None:
    """lm-eval's sample standard error ``sqrt(p(1-p)/(n-1))`` read back into ``n`` (None at p = 0 or 1)."""
    if se is None or not se > 0 or not 0 < p < 1:
        return None
    return round(p * (1 - p) / (se * se) + 1)


def _own_items(v: RunView) -> dict[str, int]:
    """``{task: items}`` from the run's own standard errors of its accuracies."""
    found: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for name, value in v.metrics.items():
        m = parse_name(name)
        if m.kind == "lm_eval" and m.task and m.measure in ACCURACY_MEASURES:
            n = _items_from_se(value, v.stderr.get(name))
            if n is not None:
                found[m.task][n] += 1
    return {task: counts.most_common(1)[0][0] for task, counts in found.items()}


def _task_items(members: list[RunView]) -> dict[str, int]:
    """``{task: items}`` of a cohort: the most common count its runs' standard errors give, else ``limit``."""
    found: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for v in members:
        for task, n in _own_items(v).items():
            found[task][n] += 1
    items = {task: counts.most_common(1)[0][0] for task, counts in found.items()}
    if members:
        proto = members[0].protocol
        if proto.limit is not None and proto.limit >= 1 and float(proto.limit).is_integer():
            for task in proto.tasks:
                items.setdefault(task, int(proto.limit))
    return items


def _dtype(v: RunView) -> Any:
    return v.record.config.get("dtype")


def _attach_fp(view: RunView, fps: list[RunView]) -> None:
    """FP values for the metrics the run has no own FP value of, from the FP runs of its cohort only.

    Among several, one of the run's dtype first, then the oldest.
    """
    same = sorted((f for f in fps if f.id != view.id and same_cohort(f, view)),
                  key=lambda f: (_dtype(f) != _dtype(view), f.record.created_at))
    for name in view.metrics:
        if name in view.fp:
            continue
        for f in same:
            if name in f.metrics:
                view.fp[name] = f.metrics[name]
                view.fp_stderr[name] = f.stderr.get(name)
                break
    if view.is_fp:
        for name, value in view.metrics.items():
            view.fp.setdefault(name, value)
