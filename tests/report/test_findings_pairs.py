"""Findings as structured pairs: every verdict follows from its pairs by the one rule, never across cohorts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from report_testutil import FP_PPL, RUNS, build_store, make_run, weight

from ptqlab.metrics import Metric
from ptqlab.report import load_views
from ptqlab.report.findings import (
    CONTRADICTS,
    HOLDS,
    MIXED,
    NOT_ENOUGH,
    NOT_HOLDS,
    SIMILAR_BITS,
    SUPPORTS,
    WITHIN_NOISE,
    Finding,
    Pair,
    check_findings,
    class_flag,
    outcome_of,
    verdict_of,
)
from ptqlab.report.runs import Change, RunView
from ptqlab.store import Store

FP = dict(rid="fp")


def _findings(tmp_path: Path, name: str, specs: list[dict[str, Any]]) -> tuple[dict[str, Finding], list[RunView]]:
    views = load_views(build_store(tmp_path / f"{name}.db", specs))
    return {f.key: f for f in check_findings(views)}, views


def _rule(pairs: list[Pair]) -> str:
    """The rule as the README states it, written out again."""
    s = sum(p.outcome == SUPPORTS for p in pairs)
    c = sum(p.outcome == CONTRADICTS for p in pairs)
    return MIXED if s and c else HOLDS if s else NOT_HOLDS if c else NOT_ENOUGH


def _check(findings: dict[str, Finding], views: list[RunView]) -> None:
    """Every pair's outcome from its interval, every verdict and count from the pairs; one cohort per pair."""
    by_id = {v.id: v for v in views}
    for f in findings.values():
        for p in f.pairs:
            a, b = (by_id[r] for r in p.runs)
            assert a.cohort == b.cohort, (f.key, p.runs)
            assert p.protocol == a.protocol.describe()
            lo, hi = p.interval
            assert lo <= p.diff <= hi
            e_lo, e_hi = p.expected
            inside = (e_lo is None or lo > e_lo) and (e_hi is None or hi < e_hi)
            outside = (e_lo is not None and hi < e_lo) or (e_hi is not None and lo > e_hi)
            assert p.outcome == (SUPPORTS if inside else CONTRADICTS if outside else WITHIN_NOISE), (f.key, p)
            if p.measure == "Δppl":  # the README's noise rule: diff ± max(1.96 se, 0.01)
                half = max(1.96 * (p.se or 0.0), 0.01)
                assert (lo, hi) == pytest.approx((p.diff - half, p.diff + half))
                assert p.diff == pytest.approx(p.delta[1] - p.delta[0], abs=1e-9)
            assert set(p.runs) <= set(f.runs)
        assert f.verdict == _rule(f.pairs) == verdict_of(f.pairs), f.key
        assert f.counts == {o: sum(p.outcome == o for p in f.pairs) for o in (SUPPORTS, CONTRADICTS, WITHIN_NOISE)}
        assert f.evidence[0] == f.summary
        data = json.loads(json.dumps(f.to_json(), allow_nan=False))
        assert data["verdict"] == f.verdict and data["counts"] == f.counts and len(data["pairs"]) == len(f.pairs)
        for pj in data["pairs"]:
            assert {"runs", "protocol", "bits", "delta", "se", "outcome"} <= set(pj)
            assert len(pj["runs"]) == 2 and len(pj["bits"]) == 2 and len(pj["delta"]) == 2


def _pair(outcome: str) -> Pair:
    return Pair("x", ("a", "b"), "p", "m", (4.0, 4.0), (0.0, 1.0), "Δppl", 1.0, 0.1, (0.8, 1.2), (0.0, None),
                outcome)


@pytest.mark.parametrize(("outcomes", "verdict"), [
    ((), NOT_ENOUGH), ((WITHIN_NOISE, WITHIN_NOISE), NOT_ENOUGH), ((SUPPORTS, WITHIN_NOISE), HOLDS),
    ((CONTRADICTS, WITHIN_NOISE), NOT_HOLDS), ((SUPPORTS, CONTRADICTS, WITHIN_NOISE), MIXED)])
def test_the_rule(outcomes: tuple[str, ...], verdict: str) -> None:
    assert verdict_of([_pair(o) for o in outcomes]) == verdict


def test_outcome_of_intervals() -> None:
    assert outcome_of((0.02, 0.5), (0.0, None)) == SUPPORTS
    assert outcome_of((-0.5, -0.02), (0.0, None)) == CONTRADICTS
    assert outcome_of((-0.01, 0.01), (0.0, None)) == WITHIN_NOISE
    assert outcome_of((0.0, 0.02), (0.0, None)) == WITHIN_NOISE  # exactly at the noise: does not count
    assert outcome_of((0.02, 0.1), (0.015, 0.15)) == SUPPORTS  # a band (the pattern's categories)
    assert outcome_of((0.01, 0.02), (0.015, 0.15)) == WITHIN_NOISE
    assert outcome_of((0.2, 0.3), (0.015, 0.15)) == CONTRADICTS


def test_class_flag_when_the_interval_crosses_a_boundary() -> None:
    assert class_flag(Change(10.12, 10.0, 0.02)) == "near 0.1"  # 0.12 ± 0.039
    assert class_flag(Change(10.2, 10.0, 0.02)) is None  # 0.2 ± 0.039: class 2 for sure
    assert class_flag(Change(10.45, 10.0, 0.05)) == "near 0.5"
    assert class_flag(Change(10.3, 10.0, 0.2)) == "near 0.1 and 0.5"
    assert class_flag(Change(10.12, 10.0, None)) is None  # no interval, no flag


def test_known_store_verdicts_follow_from_pairs(store: Store) -> None:
    views = load_views(store)
    findings = {f.key: f for f in check_findings(views)}
    _check(findings, views)
    assert findings["gptq-beats-rtn"].counts == {SUPPORTS: 1, CONTRADICTS: 0, WITHIN_NOISE: 0}


def _coarse_store(d: float) -> list[dict[str, Any]]:
    """W4 per row (4.03 b/w) and W3 g32 (4.0 b/w: similar), plus W3 g64 (3.5 b/w: too far to pair)."""
    return [FP, dict(rid="w4row", w=weight(4), recipe=("rtn",), d=0.1, bits_weight=4.03),
            dict(rid="w3g64", w=weight(3, "group", group=64), recipe=("rtn",), d=0.3, bits_weight=3.5),
            dict(rid="w3g32", w=weight(3, "group", group=32), recipe=("rtn",), d=d, bits_weight=4.0)]


@pytest.mark.parametrize(("d", "verdict", "outcome"), [
    (0.3, HOLDS, SUPPORTS), (0.02, NOT_HOLDS, CONTRADICTS), (0.1, NOT_ENOUGH, WITHIN_NOISE)])
def test_coarse_beats_fine_pairs_only_similar_bits(tmp_path: Path, d: float, verdict: str, outcome: str) -> None:
    findings, views = _findings(tmp_path, f"coarse{d}", _coarse_store(d))
    _check(findings, views)
    f = findings["coarse-high-beats-fine-low"]
    assert [(p.runs, p.outcome) for p in f.pairs] == [(("w4row", "w3g32"), outcome)]
    assert f.verdict == verdict
    assert all(abs(p.bits[0] - p.bits[1]) <= SIMILAR_BITS + 1e-9 for p in f.pairs)  # type: ignore[operator]


def test_coarse_beats_fine_not_enough_data_when_bits_are_far_apart(tmp_path: Path) -> None:
    findings, _ = _findings(tmp_path, "far", _coarse_store(0.3)[:3])
    f = findings["coarse-high-beats-fine-low"]
    assert f.verdict == NOT_ENOUGH and not f.pairs
    assert any("0.53 bits apart" in e for e in f.evidence)


def test_gptq_counts_pairs_within_noise(tmp_path: Path) -> None:
    """Both W4 pairs within noise, one W3 pair for: holds, and says it rests on one pair of three."""
    specs = [FP, dict(rid="w4row", w=weight(4), recipe=("rtn",), d=0.1, bits_weight=4.03),
             dict(rid="w4gptq", w=weight(4), recipe=("gptq",), d=0.1, bits_weight=4.03),
             dict(rid="w4g64", w=weight(4, "group", group=64), recipe=("rtn",), d=0.05, bits_weight=4.5),
             dict(rid="w4g64gptq", w=weight(4, "group", group=64), recipe=("gptq",), d=0.0502, bits_weight=4.5),
             dict(rid="w3row", w=weight(3), recipe=("rtn",), d=0.5, bits_weight=3.03),
             dict(rid="w3gptq", w=weight(3), recipe=("gptq",), d=0.3, bits_weight=3.03)]
    findings, views = _findings(tmp_path, "gptq", specs)
    _check(findings, views)
    f = findings["gptq-beats-rtn"]
    assert f.verdict == HOLDS
    assert f.counts == {SUPPORTS: 1, CONTRADICTS: 0, WITHIN_NOISE: 2}
    assert f.evidence[0] == "3 pairs: 1 for, 0 against, 2 within noise"


def test_mixed_when_pairs_disagree(tmp_path: Path) -> None:
    specs = [FP, dict(rid="w4row", w=weight(4), recipe=("rtn",), d=0.1, bits_weight=4.03),
             dict(rid="w4gptq", w=weight(4), recipe=("gptq",), d=0.2, bits_weight=4.03),
             dict(rid="w3row", w=weight(3), recipe=("rtn",), d=0.5, bits_weight=3.03),
             dict(rid="w3gptq", w=weight(3), recipe=("gptq",), d=0.3, bits_weight=3.03)]
    findings, views = _findings(tmp_path, "mixed", specs)
    _check(findings, views)
    assert findings["gptq-beats-rtn"].verdict == MIXED
    assert findings["gptq-beats-rtn"].counts == {SUPPORTS: 1, CONTRADICTS: 1, WITHIN_NOISE: 0}


@pytest.mark.parametrize(("low", "high", "verdict"), [
    ((0.5, 0.1), (0.1, 0.08), HOLDS),  # W3 recovers 66%, W4 21%
    ((1.0, 0.9), (0.1, 0.01), NOT_HOLDS)])  # W3 gains more ppl in absolute terms (6.5 vs 2.4) but recovers 15% vs 90%
def test_lorc_compares_the_share_recovered(tmp_path: Path, low: tuple[float, float], high: tuple[float, float],
                                           verdict: str) -> None:
    specs = [FP, dict(rid="w3row", w=weight(3), recipe=("rtn",), d=low[0], bits_weight=3.03),
             dict(rid="w3lorc", w=weight(3), recipe=("rtn", "lorc"), d=low[1], bits_weight=3.3),
             dict(rid="w4row", w=weight(4), recipe=("rtn",), d=high[0], bits_weight=4.03),
             dict(rid="w4lorc", w=weight(4), recipe=("rtn", "lorc"), d=high[1], bits_weight=4.3)]
    findings, views = _findings(tmp_path, f"lorc{low}", specs)
    _check(findings, views)
    f = findings["lorc-lowest-bits"]
    assert f.verdict == verdict
    (p,) = f.pairs
    assert p.runs == ("w3lorc", "w4lorc")
    share = [(math.exp(dp) - math.exp(dl)) / (math.exp(dp) - 1) for dp, dl in (low, high)]  # ppl = FP * e^d
    assert p.delta == pytest.approx(tuple(share), rel=1e-6)
    assert p.se is not None and p.se > 0
    assert {"w3row", "w4row"} <= set(f.runs)


def _retrieval(acc: float, n: int) -> list[Metric]:
    return [Metric(f"retrieval.len{length}.p4.n{n}", acc) for length in (512, 2048)]


@pytest.mark.parametrize(("d", "acc", "n", "verdict"), [
    (0.002, 0.5, 200, HOLDS),  # perplexity +0.2%, retrieval loses half: at every length, beyond the intervals
    (0.5, 0.95, 200, NOT_HOLDS),  # perplexity +65%, retrieval intact
    (0.002, 0.6, 5, NOT_ENOUGH)])  # 5 samples: the intervals overlap
def test_long_context_uses_every_length_and_binomial_intervals(tmp_path: Path, d: float, acc: float, n: int,
                                                               verdict: str) -> None:
    specs = [dict(rid="fp", extra=_retrieval(0.95 if n > 5 else 1.0, n)),
             dict(rid="kv4", k={"bits": 4, "granularity": "head"}, d=d, extra=_retrieval(acc, n))]
    findings, views = _findings(tmp_path, f"lc{d}{n}", specs)
    _check(findings, views)
    f = findings["long-context-kv"]
    assert f.verdict == verdict
    assert len(f.pairs) == 2 and all(p.runs == ("fp", "kv4") for p in f.pairs)  # one pair per length
    assert {o for o in f.counts if f.counts[o]} == {
        HOLDS: {SUPPORTS}, NOT_HOLDS: {CONTRADICTS}, NOT_ENOUGH: {WITHIN_NOISE}}[verdict]


def test_two_protocols_are_never_paired(tmp_path: Path) -> None:
    """The same configs under two protocols: every pair stays in one; the findings are those of each apart."""
    store = Store(tmp_path / "two.db")
    b_ids = set()
    for n, spec in enumerate(RUNS):
        store.save(make_run(n=n, **spec))
        if spec["rid"] in ("w4row", "w3row"):  # protocol B lacks them: GPTQ-b and W3 LoRC-b have no partner in B
            continue
        other = dict(spec, rid=spec["rid"] + "-b", d=spec.get("d", 0.0) * 1.5)
        record = make_run(n=n + len(RUNS), **other)
        record.config["evaluate"] = {"perplexity": list(FP_PPL), "seqlen": 512, "max_windows": 8}
        store.save(record)
        b_ids.add(record.id)
    views = load_views(store)
    assert len({v.cohort for v in views}) == 2
    findings = {f.key: f for f in check_findings(views)}
    _check(findings, views)
    protocols = {p.protocol for f in findings.values() for p in f.pairs}
    assert len(protocols) == 2
    for f in findings.values():
        for p in f.pairs:
            assert (p.runs[0] in b_ids) == (p.runs[1] in b_ids), (f.key, p.runs)
    apart = [check_findings([v for v in views if (v.id in b_ids) == side]) for side in (False, True)]
    for key, f in findings.items():
        alone = [p.runs for found in apart for g in found if g.key == key for p in g.pairs]
        assert sorted(p.runs for p in f.pairs) == sorted(alone), key
    assert any("[tiny;" in e for e in findings["activation-vs-weight"].evidence)  # pairs of several cohorts say theirs
