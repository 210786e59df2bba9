"""The seeds' findings, each checked against the store from structured pairs of runs.

A finding compares pairs of stored runs that differ in the one respect the claim is about (bits, target,
granularity, method, LoRC). Both runs of a pair belong to one cohort (the same model and evaluation
protocol, :attr:`RunView.cohort`): runs of different protocols are never paired.

Every :class:`Pair` carries the difference the claim is about (``diff``), its 95 % interval and the range
the claim predicts for it (``expected``). Its outcome (:func:`outcome_of`) is ``supports`` when the whole
interval lies inside the predicted range, ``contradicts`` when the whole interval lies outside it, and
``within_noise`` otherwise. For a difference with a standard error (perplexity increases, shares of the
loss LoRC recovers) the interval is ``diff ± max(1.96 se, 0.01)`` (:func:`noise`): a pair counts only when
its difference is larger than 1.96 standard errors and at least 0.01. Retrieval accuracies use Wilson
intervals per length (combined by Newcombe's method for a difference of two accuracies).

The verdict follows from the pairs' outcomes by one rule (:func:`verdict_of`): *holds* when at least one
pair supports the claim and none contradicts it, *does not hold* when at least one contradicts it and none
supports it, *mixed* when some pairs support it and others contradict it, and *not enough data* when no
pair lies outside the noise (or there is no pair).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..metrics import parse_name
from .runs import (
    Z95,
    Change,
    RunView,
    cohorts,
    fmt_number,
    fmt_signed,
    json_ready,
    quality,
    quality_difference,
    wilson,
)
from .sizes import ModelSize, SizeSeries, matched_runs, params_text, relative_loss, size_series

__all__ = ["CONTRADICTS", "FLOOR", "HOLDS", "MIXED", "NOT_ENOUGH", "NOT_HOLDS", "PATTERN", "SIMILAR_BITS",
           "SUPPORTS", "WITHIN_NOISE", "Finding", "Pair", "check_findings", "class_flag", "loss_category", "noise",
           "outcome_of", "tally", "verdict_of"]

HOLDS, NOT_HOLDS, MIXED, NOT_ENOUGH = "holds", "does not hold", "mixed", "not enough data"
SUPPORTS, CONTRADICTS, WITHIN_NOISE = "supports", "contradicts", "within_noise"
Z = Z95  # 95 % intervals
FLOOR = 0.01  # the smallest difference a pair counts with, whatever its standard error
SIMILAR_BITS = 0.1  # "similar effective bits": at most this far apart, in bits per weight
ZQ_BOUNDARIES = (0.1, 0.5)  # ZeroQuant-V2's class boundaries on the perplexity increase
# qllm-eval's pattern, in the relative perplexity increase over FP: our operational bounds of its words.
CATEGORIES = ((0.015, "lossless"), (0.15, "small loss"), (1.0, "clear loss"), (math.inf, "collapse"))
PATTERN = {("W", 8): "lossless", ("W+A", 8): "lossless", ("KV", 8): "lossless", ("W", 4): "small loss",
           ("KV", 4): "small loss", ("W", 3): "clear loss", ("KV", 3): "clear loss", ("W", 2): "collapse",
           ("KV", 2): "collapse", ("W+A", 4): "collapse"}

PATTERN_MEASURE = "ppl (FP, quantized; the difference is the relative increase)"
Range = tuple[float | None, float | None]  # (low, high), None: unbounded
ABOVE_ZERO: Range = (0.0, None)  # what a claim "the first run of the pair is better" predicts for the difference


@dataclass(frozen=True)
class Pair:
    """Two runs of one cohort compared for a claim, and what the comparison says.

    Attributes:
        what: Which configurations, in words.
        runs: The two run ids: the one the claim expects to be better (or the FP reference) first.
        protocol: The evaluation protocol both were measured with (:meth:`Protocol.describe`).
        model: The model both quantize (as the configs name it; both have one fingerprint).
        bits: Per run, the bits it is compared at (effective bits per weight for weight-only pairs, else the
            nominal bits; 16 for FP).
        delta: Per run, the measurement compared (``measure``), in the order of ``runs``.
        measure: What ``delta`` measures.
        diff: The difference the claim is about; the claim predicts it lies in ``expected``.
        se: The standard error of ``diff`` (None where the interval is not a normal one, or no run has one).
        interval: The 95 % interval of ``diff`` (at least ``diff ± 0.01``).
        expected: The range of ``diff`` the claim predicts (None: unbounded).
        outcome: ``supports``, ``contradicts`` or ``within_noise`` (:func:`outcome_of`).
        scope: For a pair of two models (the size findings): ``within <family>`` or ``across <family> and
            <family>``; None for a pair of one model.

    """

    what: str
    runs: tuple[str, str]
    protocol: str
    model: str
    bits: tuple[float | None, float | None]
    delta: tuple[float, float]
    measure: str
    diff: float
    se: float | None
    interval: tuple[float, float]
    expected: Range
    outcome: str
    scope: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The pair as JSON-ready values (lists for tuples, None for an unbounded end; ``scope`` where set)."""
        return json_ready({"what": self.what, "runs": list(self.runs), "protocol": self.protocol,
                           "model": self.model, "bits": list(self.bits), "delta": list(self.delta),
                           "measure": self.measure, "diff": self.diff, "se": self.se, "interval": list(self.interval),
                           "expected": list(self.expected), "outcome": self.outcome,
                           **({"scope": self.scope} if self.scope is not None else {})})

    def text(self, cohort: bool = False) -> str:
        """One line of evidence (naming the model and protocol when ``cohort``)."""
        lo, hi = self.interval
        words = self.outcome.replace("_", " ")
        where = f" [{self.model}; {self.protocol}]" if cohort else ""
        return (f"{self.what}{where}: {self.measure} {_plain(self.delta[0])} vs {_plain(self.delta[1])} (difference "
                f"{_plain(self.diff, signed=True)}, 95% {_plain(lo, 3)} to {_plain(hi, 3)}, "
                f"claim {_range_text(self.expected)}): {words}")


@dataclass
class Finding:
    """A seed's claim, its verdict on the stored runs and the pairs behind it.

    ``verdict`` is :func:`verdict_of` of ``pairs`` and ``counts`` their outcomes counted; ``evidence``
    holds the same in words (a summary line first), ``runs`` every run the pairs name.
    """

    key: str
    claim: str
    source: str
    verdict: str = NOT_ENOUGH
    evidence: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: tally([]))

    @property
    def summary(self) -> str:
        """``3 pairs: 2 for, 0 against, 1 within noise``: to print beside the verdict."""
        c = self.counts
        return (f"{len(self.pairs)} pairs: {c[SUPPORTS]} for, {c[CONTRADICTS]} against, "
                f"{c[WITHIN_NOISE]} within noise")

    def to_json(self) -> dict[str, Any]:
        """The finding as ``findings.json`` holds it: claim, verdict, counts, evidence, runs and pairs."""
        return {"key": self.key, "claim": self.claim, "source": self.source, "verdict": self.verdict,
                "counts": dict(self.counts), "evidence": list(self.evidence), "runs": list(self.runs),
                "pairs": [p.to_json() for p in self.pairs]}


# ---- the rule ---------------------------------------------------------------------------------------------


def noise(se: float | None) -> float:
    """Half the width of a pair's interval: ``max(1.96 se, 0.01)`` (0.01 when there is no standard error)."""
    return max(Z * (se or 0.0), FLOOR)


def outcome_of(interval: tuple[float, float], expected: Range) -> str:
    """``supports`` (interval inside ``expected``), ``contradicts`` (wholly outside) or ``within_noise``."""
    lo, hi = interval
    e_lo, e_hi = expected
    if (e_lo is None or lo > e_lo) and (e_hi is None or hi < e_hi):
        return SUPPORTS
    if (e_lo is not None and hi < e_lo) or (e_hi is not None and lo > e_hi):
        return CONTRADICTS
    return WITHIN_NOISE


def tally(pairs: Iterable[Pair]) -> dict[str, int]:
    """The pairs' outcomes counted: ``{"supports": n, "contradicts": n, "within_noise": n}``."""
    out = {SUPPORTS: 0, CONTRADICTS: 0, WITHIN_NOISE: 0}
    for p in pairs:
        out[p.outcome] += 1
    return out


def verdict_of(pairs: Iterable[Pair]) -> str:
    """The verdict by the rule: holds / does not hold / mixed / not enough data (see the module docstring)."""
    c = tally(pairs)
    if c[SUPPORTS] and c[CONTRADICTS]:
        return MIXED
    if c[SUPPORTS]:
        return HOLDS
    if c[CONTRADICTS]:
        return NOT_HOLDS
    return NOT_ENOUGH


def class_flag(change: Change) -> str | None:
    """``near 0.1`` / ``near 0.5`` when the 95 % interval of a Δppl crosses a ZeroQuant-V2 class boundary.

    The class of such a change is not settled by the measurement. None when the interval crosses no boundary,
    and when there is no standard error.
    """
    if change.stderr is None:
        return None
    half = Z * change.stderr
    lo, hi = change.delta - half, change.delta + half
    crossed = [b for b in ZQ_BOUNDARIES if lo <= b < hi]
    return "near " + " and ".join(f"{b:g}" for b in crossed) if crossed else None


def loss_category(q: Change) -> str:
    """``lossless``, ``small loss``, ``clear loss`` or ``collapse`` by the relative perplexity increase."""
    rel = q.delta / q.fp
    return next(name for bound, name in CATEGORIES if rel < bound)


# ---- building pairs ---------------------------------------------------------------------------------------


def _plain(x: float, digits: int = 4, signed: bool = False) -> str:
    """``x`` to ``digits`` significant digits in plain decimals (``99410``, ``0.000123``; never ``-0``)."""
    if not math.isfinite(x) or x == 0:
        return fmt_signed(x) if signed else fmt_number(x)
    decimals = max(digits - 1 - math.floor(math.log10(abs(x))), 0)
    return (fmt_signed if signed else fmt_number)(x, f".{decimals}f")


def _range_text(r: Range) -> str:
    lo, hi = r
    if lo is not None and hi is not None:
        return f"in ({lo:g}, {hi:g})"
    return f"> {lo:g}" if lo is not None else f"< {hi:g}" if hi is not None else "anything"


def _pct(x: float) -> str:
    return f"{round(100 * x, 1) + 0.0:.1f}%"  # + 0.0: no "-0.0%"


def _combined(*errors: float | None) -> float | None:
    """The standard error of a sum or difference of independent terms (None when no term has one)."""
    found = [e for e in errors if e is not None]
    return math.sqrt(sum(e * e for e in found)) if found else None


def _pair(what: str, a: RunView, b: RunView, bits: tuple[float | None, float | None], delta: tuple[float, float],
          measure: str, diff: float, se: float | None, interval: tuple[float, float] | None = None,
          expected: Range = ABOVE_ZERO, floor: float = FLOOR) -> Pair:
    """A pair of ``a`` and ``b``; the interval is ``diff ± noise(se)`` unless given (then at least ``diff ± floor``)."""
    if a.cohort != b.cohort:  # the callers pair within a cohort; this guards the rule itself
        raise ValueError(f"runs {a.id} and {b.id} are of different cohorts (model or protocol) and cannot be paired")
    if interval is None:
        interval = (diff - noise(se), diff + noise(se))
    else:
        interval = (min(interval[0], diff - floor), max(interval[1], diff + floor))
    return Pair(what, (a.id, b.id), a.protocol.describe(), a.record.model, bits, delta, measure, diff, se, interval,
                expected, outcome_of(interval, expected))


def _quality_pair(what: str, good: RunView, bad: RunView, bits: Callable[[RunView], float | None]) -> Pair | None:
    """The claim that ``good`` has the smaller perplexity increase than ``bad``.

    The difference is ``bad``'s mean perplexity minus ``good``'s, with the paired standard error of
    :func:`quality_difference` (over the windows both stored; else their errors against FP combined).
    """
    qg, qb, d = quality(good), quality(bad), quality_difference(good, bad)
    if qg is None or qb is None or d is None:
        return None
    return _pair(what, good, bad, (bits(good), bits(bad)), (qg.delta, qb.delta), "Δppl", d.delta, d.stderr)


def _effective(v: RunView) -> float | None:
    """Effective bits per weight where stored, else the nominal bits (16 for FP)."""
    return v.weight_bits if v.weight_bits is not None else _nominal(v)


def _nominal(v: RunView) -> float | None:
    return float(v.bits) if v.bits is not None else 16.0


def _finish(f: Finding, pairs: Iterable[Pair | None], notes: Iterable[str] = ()) -> Finding:
    """Attach the pairs, their verdict, counts and evidence (a summary line first, then each pair)."""
    f.pairs = [p for p in pairs if p is not None]
    f.verdict, f.counts = verdict_of(f.pairs), tally(f.pairs)
    several = len({(p.model, p.protocol) for p in f.pairs}) > 1
    f.evidence = [f.summary, *notes, *(p.text(several) for p in f.pairs)]
    seen: dict[str, None] = dict.fromkeys(f.runs)
    for p in f.pairs:
        seen.update(dict.fromkeys(p.runs))
    f.runs = list(seen)
    return f


def _fp_run(group: list[RunView]) -> RunView | None:
    """The cohort's FP run (the first), if it has one."""
    return next((v for v in group if v.is_fp), None)


Key = tuple[int | None, str, str, str, bool, int | None, int | None]


def _index(group: list[RunView], keep: Callable[[RunView], bool]) -> dict[Key, RunView]:
    """A cohort's runs by (W bits, granularity, symmetry, method, LoRC, A bits, KV bits): the first of each."""
    out: dict[Key, RunView] = {}
    for v in group:
        if keep(v) and quality(v) is not None:
            out.setdefault((v.w_bits, v.granularity, v.symmetric, v.method, v.lorc, v.a_bits, v.kv_bits), v)
    return out


def _sorted(index: dict[Key, RunView]) -> list[tuple[Key, RunView]]:
    return sorted(index.items(), key=lambda kv: str(kv[0]))


# ---- the findings -----------------------------------------------------------------------------------------


def _activation_vs_weight(views: list[RunView]) -> Finding:
    f = Finding("activation-vs-weight", "Activation quantization hurts more than weight quantization at equal bits.",
                "ZeroQuant-V2")
    pairs = []
    for group in cohorts(views).values():
        best: dict[tuple[str, int], tuple[float, RunView]] = {}
        for v in group:
            q = quality(v)
            if v.target in ("W", "A") and q is not None and v.bits is not None and not v.lorc:
                key = (v.target, v.bits)
                if key not in best or q.delta < best[key][0]:
                    best[key] = (q.delta, v)
        for b in sorted({b for _, b in best if ("W", b) in best and ("A", b) in best}, reverse=True):
            pairs.append(_quality_pair(f"best W{b} against best A{b}", best[("W", b)][1], best[("A", b)][1], _nominal))
    return _finish(f, pairs)


def _groups_beat_rows(views: list[RunView]) -> Finding:
    f = Finding("groups-beat-rows", "Fine-grained groups beat per-row quantization (same bits, method, symmetry).",
                "ZeroQuant-V2")
    pairs = []
    for group in cohorts(views).values():
        index = _index(group, lambda v: v.target == "W")
        for (bits, gran, sym, method, lorc, a, kv), v in _sorted(index):
            row = index.get((bits, "row", sym, method, lorc, a, kv))
            if gran.startswith("g") and row is not None:
                what = f"W{bits} {sym} {method}{' +LoRC' if lorc else ''}: {gran} against per row"
                pairs.append(_quality_pair(what, v, row, _effective))
    return _finish(f, pairs)


def _gptq_beats_rtn(views: list[RunView]) -> Finding:
    f = Finding("gptq-beats-rtn", "GPTQ beats RTN (same bits, granularity, symmetry).", "ZeroQuant-V2")
    pairs = []
    for group in cohorts(views).values():
        index = _index(group, lambda v: v.w_bits is not None)
        for (bits, gran, sym, method, lorc, a, kv), v in _sorted(index):
            rtn = index.get((bits, gran, sym, "rtn", lorc, a, kv))
            if method == "gptq" and rtn is not None:
                what = f"W{bits} {gran} {sym}{' +LoRC' if lorc else ''}: GPTQ against RTN"
                pairs.append(_quality_pair(what, v, rtn, _effective))
    return _finish(f, pairs)


def _coarse_beats_fine(views: list[RunView]) -> Finding:
    f = Finding("coarse-high-beats-fine-low",
                "Higher bits coarse-grained beat lower bits fine-grained at similar effective bits.",
                "ZeroQuant-V2 (5-bit per row beats 4-bit in fine groups)")
    pairs = []
    nearest: tuple[float, RunView, RunView] | None = None
    for group in cohorts(views).values():
        index = _index(group, lambda v: v.target == "W" and v.weight_bits is not None)
        for (bits, gran, sym, method, lorc, _, _), coarse in _sorted(index):
            if gran != "row" or bits is None:
                continue
            for _, fine in _sorted(index):
                if not (fine.w_bits is not None and fine.w_bits < bits and fine.granularity.startswith("g")
                        and fine.symmetric == sym and fine.method == method and fine.lorc == lorc):
                    continue
                cb, fb = coarse.weight_bits or 0.0, fine.weight_bits or 0.0
                gap = abs(cb - fb)
                if gap > SIMILAR_BITS + 1e-9:
                    if nearest is None or gap < nearest[0]:
                        nearest = (gap, coarse, fine)
                    continue
                what = (f"W{bits} per row ({cb:.2f} b/w) against W{fine.w_bits} {fine.granularity} ({fb:.2f} b/w),"
                        f" {sym} {method}{' +LoRC' if lorc else ''}")
                pairs.append(_quality_pair(what, coarse, fine, _effective))
    notes = [f"pairs only runs at most {SIMILAR_BITS:g} effective bits per weight apart"]
    if not pairs and nearest is not None:
        gap, c, g = nearest
        notes.append(f"no pair that close: the nearest are W{c.w_bits} per row ({c.weight_bits:.2f} b/w) and "
                     f"W{g.w_bits} {g.granularity} ({g.weight_bits:.2f} b/w), {gap:.2f} bits apart")
    return _finish(f, pairs, notes)


def _bands() -> dict[str, Range]:
    """Each of the pattern's words as the range of the relative perplexity increase it allows."""
    bands: dict[str, Range] = {}
    low: float | None = None
    for bound, name in CATEGORIES:
        bands[name] = (low, None if math.isinf(bound) else bound)
        low = bound
    return bands


def _pattern_pairs(group: list[RunView]) -> list[Pair]:
    """The pattern's pairs of one cohort: per config of :data:`PATTERN`, its best RTN run against FP."""
    bands = _bands()
    fp = _fp_run(group)
    pairs = []
    for (target, bits), expected in PATTERN.items():
        runs = [v for v in group if v.target == target and v.method in ("rtn", "-") and not v.lorc
                and (v.bits == bits if target != "W+A" else (v.w_bits, v.a_bits) == (bits, bits))]
        found = [(v, q) for v in runs if (q := quality(v)) is not None and q.fp > 0]
        if not found:
            continue
        v, q = min(found, key=lambda vq: vq[1].delta)  # the best run of the config
        ref = fp or v  # no FP run in the cohort: the run's FP values are its own (its FP window NLLs)
        name = f"W{bits}A{bits}" if target == "W+A" else f"{target}{bits}"
        rel, half = q.delta / q.fp, noise(q.stderr) / q.fp
        zq = class_flag(q)
        what = (f"{name} (best RTN run): {loss_category(q)}, expected {expected}; ZeroQuant-V2 class "
                f"{1 if q.delta <= 0.1 else 2 if q.delta <= 0.5 else 3}{f' ({zq})' if zq else ''}")
        pairs.append(_pair(what, ref, v, (16.0, float(bits)), (q.fp, q.value), PATTERN_MEASURE, rel,
                           None if q.stderr is None else q.stderr / q.fp, (rel - half, rel + half),
                           bands[expected], floor=0.0))  # the floor is in the interval already, in ppl
    return pairs


def _pattern_note() -> str:
    bounds = ", ".join(f"{name} < {100 * b:g}%" for b, name in CATEGORIES[:-1])
    return (f"the difference is the relative perplexity increase of the best RTN run, (Δppl ± max(1.96 se, 0.01))"
            f" / FP ppl; categories: {bounds}, else collapse; a config supports the pattern when its whole interval"
            " lies in its category and contradicts it when the whole interval lies outside")


def _pattern(views: list[RunView]) -> Finding:
    f = Finding("qllm-pattern", "W8, W8A8, KV8 are lossless; W4, KV4 lose a little; W3, KV3 clearly; W2, KV2 and "
                "W4A4 collapse.", "qllm-eval")
    pairs = [p for group in cohorts(views).values() for p in _pattern_pairs(group)]
    return _finish(f, pairs, [_pattern_note()])


@dataclass(frozen=True)
class _Share:
    plain: RunView
    lorc: RunView
    share: float
    se: float | None


def _share(plain: RunView, lorc: RunView) -> _Share | None:
    """The share of the perplexity increase LoRC recovers, ``D / P``, with its delta-method error.

    ``P`` is the plain run's Δppl against FP and ``D`` what LoRC removes of it (the plain run's mean
    perplexity minus the LoRC run's, paired over their windows): ``se² = (se_D / P)² + (D se_P / P²)²``.
    """
    qp, d = quality(plain), quality_difference(lorc, plain)
    if qp is None or d is None or qp.delta <= noise(qp.stderr):
        return None  # no loss to recover (or none measurable)
    p, gain = qp.delta, d.delta
    se = _combined(None if d.stderr is None else d.stderr / p,
                   None if qp.stderr is None else gain * qp.stderr / (p * p))
    return _Share(plain, lorc, gain / p, se)


def _lorc_lowest_bits(views: list[RunView]) -> Finding:
    f = Finding("lorc-lowest-bits", "LoRC helps most at the lowest bits.", "ZeroQuant-V2")
    pairs, notes = [], ["LoRC's help is the share of the perplexity increase it recovers, (Δppl without - Δppl with)"
                        " / Δppl without, with its delta-method error; pairs compare it across bits"]
    for group in cohorts(views).values():
        index = _index(group, lambda v: v.target == "W")
        shares: dict[tuple[str, str, str, int | None, int | None], dict[int, _Share]] = {}
        for (bits, gran, sym, method, lorc, a, kv), v in _sorted(index):
            plain = index.get((bits, gran, sym, method, False, a, kv))
            if not lorc or plain is None or bits is None:
                continue
            s = _share(plain, v)
            if s is None:
                notes.append(f"W{bits} {gran} {sym} {method}: no measurable loss to recover")
                continue
            shares.setdefault((gran, sym, method, a, kv), {})[bits] = s
            notes.append(f"W{bits} {gran} {sym} {method}: LoRC recovers {_pct(s.share)}"
                         f"{f' ± {_pct(s.se)}' if s.se is not None else ''} of the Δppl")
        for (gran, sym, method, _, _), by_bits in sorted(shares.items(), key=lambda kv: str(kv[0])):
            for low in sorted(by_bits):
                for high in sorted(b for b in by_bits if b > low):
                    sl, sh = by_bits[low], by_bits[high]
                    what = f"{gran} {sym} {method}: W{low} against W{high}"
                    pairs.append(_pair(what, sl.lorc, sh.lorc, (_effective(sl.lorc), _effective(sh.lorc)),
                                       (sl.share, sh.share), "share of Δppl recovered", sl.share - sh.share,
                                       _combined(sl.se, sh.se)))
                    f.runs += [sl.plain.id, sh.plain.id]
    return _finish(f, pairs, notes)


def _long_context_kv(views: list[RunView]) -> Finding:
    f = Finding("long-context-kv", "Long-context retrieval is more sensitive to KV quantization than perplexity is.",
                "qllm-eval")
    pairs = []
    for group in cohorts(views).values():
        fp = _fp_run(group)
        if fp is None:
            continue
        for v in group:
            q = quality(v)
            if v.target != "KV" or q is None or q.fp <= 0:
                continue
            # perplexity's relative rise, capped at 1: losing all FP's accuracy and a doubled perplexity both collapse
            rise, half = q.delta / q.fp, noise(q.stderr) / q.fp
            rise_lo, rise_hi = min(rise - half, 1.0), min(rise + half, 1.0)
            names = sorted((n for n in v.metrics if n.startswith("retrieval.") and n in fp.metrics),
                           key=lambda n: parse_name(n).length or 0)
            for name in names:
                samples = parse_name(name).samples or 0
                acc, fp_acc = v.metrics[name], fp.metrics[name]
                if samples < 1 or fp_acc <= 0:
                    continue
                (q_lo, q_hi), (f_lo, f_hi) = wilson(acc, samples), wilson(fp_acc, samples)
                # Newcombe's interval of fp_acc - acc from the two Wilson intervals, then relative to FP
                drop = fp_acc - acc
                d_lo = drop - math.hypot(fp_acc - f_lo, q_hi - acc)
                d_hi = drop + math.hypot(f_hi - fp_acc, acc - q_lo)
                loss, loss_lo, loss_hi = drop / fp_acc, d_lo / fp_acc, min(d_hi / fp_acc, 1.0)
                length = parse_name(name).length
                what = f"KV{v.kv_bits} at length {length} ({samples} samples): retrieval loss against perplexity rise"
                pairs.append(_pair(what, fp, v, (16.0, float(v.kv_bits or 16)), (min(rise, 1.0), loss),
                                   "relative loss (perplexity, retrieval)", loss - min(rise, 1.0), None,
                                   (loss_lo - rise_hi, loss_hi - rise_lo)))
    notes = ["retrieval's loss is the share of FP's accuracy lost (Wilson intervals per length, Newcombe's for the "
             "difference); perplexity's is its relative rise, capped at 1 (collapse)"]
    return _finish(f, pairs, notes)


# ---- size findings: one protocol, models of several sizes ---------------------------------------------------

SIZE_MEASURE = "Δppl / FP ppl (relative perplexity increase, each run against its own model's FP)"


def _scope(a: ModelSize, b: ModelSize) -> str:
    return f"within {a.family}" if a.family == b.family else f"across {a.family} and {b.family}"


def _size_pair(what: str, good: RunView, bad: RunView, scope: str, bits: Callable[[RunView], float | None]) -> Pair:
    """The claim that ``good`` loses a smaller share of its own model's FP perplexity than ``bad`` does.

    The two runs are of one protocol and of two models; each side is a run against its own model's FP (within
    its cohort), so the difference of the relative increases is ``Δppl_bad / FP_bad - Δppl_good / FP_good``
    with the two paired standard errors combined as independent; the interval is ``diff ± max(1.96 se, 0.01)``.
    """
    if good.protocol.key != bad.protocol.key:  # the callers pair within a protocol; this guards the rule itself
        raise ValueError(f"runs {good.id} and {bad.id} are of different protocols and cannot be paired")
    lg, lb = relative_loss(good), relative_loss(bad)
    if lg is None or lb is None:
        raise ValueError(f"runs {good.id} and {bad.id} need a relative loss each")
    diff, se = lb[0] - lg[0], _combined(lg[1], lb[1])
    interval = (diff - noise(se), diff + noise(se))
    return Pair(what, (good.id, bad.id), good.protocol.describe(), f"{good.record.model} vs {bad.record.model}",
                (bits(good), bits(bad)), (lg[0], lb[0]), SIZE_MEASURE, diff, se, interval, ABOVE_ZERO,
                outcome_of(interval, ABOVE_ZERO), scope)


def _size_notes(series: list[SizeSeries], pairs: list[Pair], what: str) -> list[str]:
    """Which models were compared, which pairs lie within a family, and the verdict within and across families."""
    if not series:
        return ["needs one protocol measured on two model sizes or more (with an FP run or a run that keeps the "
                "weights in FP, for the parameter count): the store has none"]
    notes = [f"{what}; the models' tokenizers may differ, so relative losses are compared, never perplexities"]
    for s in series:
        fams = "; ".join(f"{fam}: {', '.join(m.name for m in ms)}" for fam, ms in s.families().items())
        notes.append(f"models of {s.section.name}: {', '.join(m.label for m in s.models)} (families: {fams})")
    for scope in sorted({p.scope for p in pairs if p.scope}):
        mine = [p for p in pairs if p.scope == scope]
        c = tally(mine)
        notes.append(f"{scope}: {verdict_of(mine)} ({len(mine)} pairs: {c[SUPPORTS]} for, {c[CONTRADICTS]} against, "
                     f"{c[WITHIN_NOISE]} within noise)")
    return notes


def _by_size(views: list[RunView], keep: Callable[[RunView], bool], larger_better: bool,
             bits: Callable[[RunView], float | None]) -> tuple[list[SizeSeries], list[Pair]]:
    """Pairs of one scheme and recipe on two models of different sizes, the better expected one first."""
    series = size_series(views)
    pairs = []
    for s in series:
        for label, runs in matched_runs(s, keep).items():
            models = [m for m in s.models if m.fingerprint in runs]
            for i, small in enumerate(models):
                for large in models[i + 1:]:
                    if small.params == large.params:
                        continue
                    good, bad = (large, small) if larger_better else (small, large)
                    what = (f"{label}: {good.name} ({params_text(good.params or 0)}) against {bad.name} "
                            f"({params_text(bad.params or 0)}), {_scope(small, large)}")
                    pairs.append(_size_pair(what, runs[good.fingerprint], runs[bad.fingerprint],
                                            _scope(small, large), bits))
    return series, pairs


def _larger_lose_less(views: list[RunView]) -> Finding:
    f = Finding("size-weights", "Larger models lose less under weight quantization.", "ZeroQuant-V2")
    series, pairs = _by_size(views, lambda v: v.target == "W", True, _effective)
    return _finish(f, pairs, _size_notes(series, pairs, "pairs: the same weight-only scheme and recipe on a larger "
                                         "and a smaller model; the difference is the smaller model's relative "
                                         "perplexity increase minus the larger's"))


def _activation_only(v: RunView) -> bool:
    """Activation quantization alone, or with weights at 8 bits or more (lossless: W8A8 is an activation test)."""
    return v.target == "A" or (v.target == "W+A" and (v.w_bits or 16) >= 8)


def _smaller_tolerate_activations(views: list[RunView]) -> Finding:
    f = Finding("size-activations", "Smaller models tolerate activation quantization better than larger ones.",
                "ZeroQuant-V2")
    series, pairs = _by_size(views, _activation_only, False, _nominal)
    return _finish(f, pairs, _size_notes(series, pairs, "pairs: the same activation-only (or W8+A) scheme and "
                                         "recipe on a smaller and a larger model; the difference is the larger "
                                         "model's relative perplexity increase minus the smaller's"))


def _pattern_across_sizes(views: list[RunView]) -> Finding:
    f = Finding("size-pattern", "The qllm-eval pattern (W8 ≈ lossless; W4, KV4 small; W3, KV3 clear; W2, KV2, W4A4 "
                "collapse) holds across sizes.", "qllm-eval")
    series = size_series(views)
    pairs: list[Pair] = []
    notes = [_pattern_note(), "the pattern's pairs of each model size of a protocol measured on two sizes or more; "
             "it holds across sizes when some config supports it and none contradicts it, on every size"]
    for s in series:
        per_model = []
        for m in s.models:
            mine = _pattern_pairs([v for v in s.views if v.record.model_fingerprint == m.fingerprint])
            if mine:
                per_model.append((m, mine))
        if len(per_model) < 2:
            notes.append(f"{s.section.name}: the pattern's configs were measured on "
                         f"{len(per_model)} model size{'s' if len(per_model) != 1 else ''}: two are needed")
            continue
        for m, mine in per_model:
            c = tally(mine)
            notes.append(f"{m.label}: {verdict_of(mine)} ({c[SUPPORTS]} for, {c[CONTRADICTS]} against, "
                         f"{c[WITHIN_NOISE]} within noise)")
            pairs += mine
        fams = s.families()
        notes.append("within a family: " + ("; ".join(f"{fam} ({', '.join(x.name for x in ms)})"
                                                      for fam, ms in fams.items() if len(ms) > 1) or "none")
                     + f"; {len(fams)} famil{'ies' if len(fams) > 1 else 'y'} in all")
    if not series:
        notes.append("needs one protocol measured on two model sizes or more: the store has none")
    return _finish(f, pairs, notes)


SIZE_CHECKS = (_larger_lose_less, _smaller_tolerate_activations, _pattern_across_sizes)
CHECKS = (_activation_vs_weight, _groups_beat_rows, _gptq_beats_rtn, _coarse_beats_fine, _pattern, _lorc_lowest_bits,
          _long_context_kv, *SIZE_CHECKS)


def check_findings(views: list[RunView]) -> list[Finding]:
    """Every seed finding, checked on ``views``; the size findings only when ``views`` hold two models or more.

    With one model a size claim does not apply (it is not an unsettled measurement), so it is not listed. Runs
    with mixed weights (a search's allocations) are left out: every finding compares schemes at their bits.
    """
    views = [v for v in views if not v.mixed_weights]
    several = len({v.record.model_fingerprint for v in views}) > 1
    return [check(views) for check in CHECKS if several or check not in SIZE_CHECKS]
