"""The seeds' findings, each checked against the store: holds, does not hold, or not enough data.

A finding compares pairs of stored runs that differ in the one respect the claim is about (bits, target,
granularity, method, LoRC) and states its verdict with the numbers behind it. A pair counts for or
against a claim only when the difference is larger than its noise (1.96 standard errors, at least 0.01);
a claim holds when some pair supports it and none contradicts it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..metrics import parse_name
from .runs import Change, RunView, quality

__all__ = ["HOLDS", "NOT_ENOUGH", "NOT_HOLDS", "PATTERN", "Finding", "check_findings", "loss_category"]

HOLDS, NOT_HOLDS, NOT_ENOUGH = "holds", "does not hold", "not enough data"
# qllm-eval's pattern, in the relative perplexity increase over FP: our operational bounds of its words.
CATEGORIES = ((0.015, "lossless"), (0.15, "small loss"), (1.0, "clear loss"), (math.inf, "collapse"))
PATTERN = {("W", 8): "lossless", ("W+A", 8): "lossless", ("KV", 8): "lossless", ("W", 4): "small loss",
           ("KV", 4): "small loss", ("W", 3): "clear loss", ("KV", 3): "clear loss", ("W", 2): "collapse",
           ("KV", 2): "collapse", ("W+A", 4): "collapse"}


@dataclass
class Finding:
    """A seed's claim, its verdict on the stored runs and the evidence."""

    key: str
    claim: str
    source: str
    verdict: str = NOT_ENOUGH
    evidence: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)


def loss_category(q: Change) -> str:
    """``lossless``, ``small loss``, ``clear loss`` or ``collapse`` by the relative perplexity increase."""
    rel = q.delta / q.fp
    return next(name for bound, name in CATEGORIES if rel < bound)


def _pct(x: float) -> str:
    return f"{round(100 * x, 1) + 0.0:.1f}%"  # + 0.0: no "-0.0%"


def _noise(a: Change, b: Change) -> float:
    se = math.sqrt((a.stderr or 0.0) ** 2 + (b.stderr or 0.0) ** 2)
    return max(1.96 * se, 0.01)


def _pairs_verdict(finding: Finding, pairs: Iterable[tuple[str, RunView, RunView]]) -> Finding:
    """Each (what, better-expected, worse-expected): the claim is that the first has the smaller increase."""
    support = against = 0
    for what, good, bad in pairs:
        qg, qb = quality(good), quality(bad)
        if qg is None or qb is None:
            continue
        diff, noise = qb.delta - qg.delta, _noise(qg, qb)
        side = "supports" if diff > noise else "contradicts" if diff < -noise else "within noise"
        support += side == "supports"
        against += side == "contradicts"
        finding.evidence.append(f"{what}: Δppl {qg.delta:.4g} vs {qb.delta:.4g} (noise ±{noise:.2g}): {side}")
        finding.runs += [good.id, bad.id]
    if finding.evidence:
        finding.verdict = NOT_HOLDS if against else HOLDS if support else NOT_ENOUGH
    return finding


Key = tuple[int | None, str, str, str, bool, int | None, int | None]


def _index(views: list[RunView], keep: Callable[[RunView], bool]) -> dict[Key, RunView]:
    """Runs by (W bits, granularity, symmetry, method, LoRC, A bits, KV bits): the first of each."""
    out: dict[Key, RunView] = {}
    for v in views:
        if keep(v) and quality(v) is not None:
            out.setdefault((v.w_bits, v.granularity, v.symmetric, v.method, v.lorc, v.a_bits, v.kv_bits), v)
    return out


def _activation_vs_weight(views: list[RunView]) -> Finding:
    f = Finding("activation-vs-weight", "Activation quantization hurts more than weight quantization at equal bits.",
                "ZeroQuant-V2")
    best: dict[tuple[str, int], RunView] = {}
    for v in views:
        q = quality(v)
        if v.target in ("W", "A") and q is not None and v.bits is not None and not v.lorc:
            key = (v.target, v.bits)
            if key not in best or q.delta < (quality(best[key]) or q).delta:
                best[key] = v
    bits = sorted({b for t, b in best if (("W", b) in best and ("A", b) in best)}, reverse=True)
    return _pairs_verdict(f, [(f"best W{b} against best A{b}", best[("W", b)], best[("A", b)]) for b in bits])


def _groups_beat_rows(views: list[RunView]) -> Finding:
    f = Finding("groups-beat-rows", "Fine-grained groups beat per-row quantization (same bits, method, symmetry).",
                "ZeroQuant-V2")
    index = _index(views, lambda v: v.target == "W")
    pairs = []
    for (bits, gran, sym, method, lorc, a, kv), v in sorted(index.items(), key=lambda kv: str(kv[0])):
        row = index.get((bits, "row", sym, method, lorc, a, kv))
        if gran.startswith("g") and row is not None:
            pairs.append((f"W{bits} {sym} {method}{' +LoRC' if lorc else ''}: {gran} against per row", v, row))
    return _pairs_verdict(f, pairs)


def _gptq_beats_rtn(views: list[RunView]) -> Finding:
    f = Finding("gptq-beats-rtn", "GPTQ beats RTN (same bits, granularity, symmetry).", "ZeroQuant-V2")
    index = _index(views, lambda v: v.w_bits is not None)
    pairs = []
    for (bits, gran, sym, method, lorc, a, kv), v in sorted(index.items(), key=lambda kv: str(kv[0])):
        rtn = index.get((bits, gran, sym, "rtn", lorc, a, kv))
        if method == "gptq" and rtn is not None:
            pairs.append((f"W{bits} {gran} {sym}{' +LoRC' if lorc else ''}: GPTQ against RTN", v, rtn))
    return _pairs_verdict(f, pairs)


def _coarse_beats_fine(views: list[RunView]) -> Finding:
    f = Finding("coarse-high-beats-fine-low",
                "Higher bits coarse-grained beat lower bits fine-grained at similar effective bits.",
                "ZeroQuant-V2 (5-bit per row beats 4-bit in fine groups)")
    index = _index(views, lambda v: v.target == "W" and v.weight_bits is not None)
    pairs = []
    for key, coarse in sorted(index.items(), key=lambda kv: str(kv[0])):
        bits, gran, sym, method, lorc, _, _ = key
        if gran != "row" or bits is None:
            continue
        for other in index.values():
            if (other.w_bits == bits - 1 and other.granularity.startswith("g") and other.symmetric == sym
                    and other.method == method and other.lorc == lorc
                    and abs((other.weight_bits or 0) - (coarse.weight_bits or 0)) <= 0.75):
                pairs.append((f"W{bits} per row ({coarse.weight_bits:.2f} b/w) against W{bits - 1} "
                              f"{other.granularity} ({other.weight_bits:.2f} b/w), {sym} {method}", coarse, other))
    return _pairs_verdict(f, pairs)


def _pattern(views: list[RunView]) -> Finding:
    f = Finding("qllm-pattern", "W8, W8A8, KV8 are lossless; W4, KV4 lose a little; W3, KV3 clearly; W2, KV2 and "
                "W4A4 collapse.", "qllm-eval")
    seen = 0
    wrong = []
    for (target, bits), expected in PATTERN.items():
        runs = [v for v in views if v.target == target and v.method in ("rtn", "-") and not v.lorc
                and (v.bits == bits if target != "W+A" else (v.w_bits, v.a_bits) == (bits, bits))]
        found = [(v, q) for v in runs if (q := quality(v)) is not None]
        if not found:
            continue
        v, q = min(found, key=lambda vq: vq[1].delta)  # the best run of the config
        got = loss_category(q)
        seen += 1
        name = f"W{bits}A{bits}" if target == "W+A" else f"{target}{bits}"
        f.evidence.append(f"{name}: ppl {q.fp:.4g} -> {q.value:.4g} ({100 * q.delta / q.fp:+.1f}%): {got}"
                          f" (expected {expected})")
        f.runs.append(v.id)
        if got != expected:
            wrong.append(name)
    if seen >= 3:
        f.verdict = NOT_HOLDS if wrong else HOLDS
    bounds = ", ".join(f"{name} < {100 * b:g}%" for b, name in CATEGORIES[:-1])
    f.evidence.append(f"categories by the relative perplexity increase of the best RTN run: {bounds}, else collapse")
    return f


def _lorc_lowest_bits(views: list[RunView]) -> Finding:
    f = Finding("lorc-lowest-bits", "LoRC helps most at the lowest bits.", "ZeroQuant-V2")
    index = _index(views, lambda v: v.target == "W")
    gains: dict[int, tuple[float, RunView, RunView]] = {}
    for (bits, gran, sym, method, lorc, a, kv), v in index.items():
        plain = index.get((bits, gran, sym, method, False, a, kv))
        qv, qp = quality(v), quality(plain) if plain else None
        if lorc and plain is not None and qv is not None and qp is not None and bits is not None:
            gain = qp.delta - qv.delta
            if bits not in gains or gain > gains[bits][0]:
                gains[bits] = (gain, plain, v)
    for bits in sorted(gains):
        gain, plain, v = gains[bits]
        f.evidence.append(f"W{bits} {v.granularity} {v.symmetric} {v.method}: LoRC lowers Δppl by {gain:.4g}")
        f.runs += [plain.id, v.id]
    if len(gains) >= 2:
        lowest = min(gains)
        f.verdict = HOLDS if all(gains[lowest][0] >= g for g, _, _ in gains.values()) else NOT_HOLDS
    return f


def _long_context_kv(views: list[RunView]) -> Finding:
    f = Finding("long-context-kv", "Long-context retrieval is more sensitive to KV quantization than perplexity is.",
                "qllm-eval")
    support = against = 0
    for v in views:
        if v.target != "KV":
            continue
        names = sorted((n for n in v.metrics if n.startswith("retrieval.") and v.change(n)),
                       key=lambda n: parse_name(n).length or 0)
        q = quality(v)
        if not names or q is None:
            continue
        r = v.change(names[-1])
        if r is None or r.fp <= 0:
            continue
        acc_loss, ppl_loss = -r.delta / r.fp, q.delta / q.fp
        # both on one scale: a loss of all FP's accuracy and a doubled perplexity are both collapse
        same = max(acc_loss, ppl_loss) < CATEGORIES[0][0] or min(acc_loss, ppl_loss) >= 1.0
        more = acc_loss > min(ppl_loss, 1.0)
        support += more and not same
        against += not more and not same
        f.evidence.append(f"KV{v.kv_bits}: retrieval at {names[-1].split('.')[1]} loses {_pct(acc_loss)} of FP's "
                          f"accuracy, perplexity rises {_pct(ppl_loss)}"
                          + (": both lossless or both collapsed, no evidence either way" if same else ""))
        f.runs.append(v.id)
    if support + against:
        f.verdict = NOT_HOLDS if against else HOLDS
    return f


CHECKS = (_activation_vs_weight, _groups_beat_rows, _gptq_beats_rtn, _coarse_beats_fine, _pattern, _lorc_lowest_bits,
          _long_context_kv)


def check_findings(views: list[RunView]) -> list[Finding]:
    """Every seed finding, checked on ``views``."""
    return [check(views) for check in CHECKS]
