"""Adaptive perplexity: the statistics against their definitions, the stop rule, and stories260K end to end."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

import ptqlab
from ptqlab.compile import compile_evaluate
from ptqlab.errors import ConfigError
from ptqlab.eval import adaptive as ad
from ptqlab.eval.perplexity import PerplexityResult
from ptqlab.eval.reference import Reference, build_reference
from ptqlab.eval.suite import Evaluation, evaluate
from ptqlab.metrics import adaptive_name, perplexity_name
from ptqlab.schema import AdaptiveConfig, Evaluate, coerce, parse_config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on several OpenMP threads stall badly when other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the statistics -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("df, value", [(4, 2.776), (9, 2.262), (30, 2.042), (1, 12.706), (3, 3.182)])
def test_t_quantile_matches_the_table(df, value):
    assert ad.t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)
    assert ad.t_quantile_bisect(0.975, df) == pytest.approx(value, abs=5e-4)
    assert ad.t_quantile_bisect(0.025, df) == pytest.approx(-value, abs=5e-4)


def test_t_quantile_without_scipy_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 17, 100, 1000):
        for p in (0.6, 0.9, 0.975, 0.995, 0.99995):
            assert ad.t_quantile_bisect(p, df) == pytest.approx(float(stats.t.ppf(p, df)), rel=1e-9), (p, df)


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ad.t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        ad.t_quantile(0.9, 0)


def test_incomplete_beta_closed_forms():
    assert ad.betainc(1.0, 1.0, 0.3) == pytest.approx(0.3, rel=1e-12)  # uniform
    assert ad.betainc(2.0, 1.0, 0.3) == pytest.approx(0.09, rel=1e-12)  # x^2
    assert ad.betainc(0.5, 0.5, 0.5) == pytest.approx(0.5, rel=1e-12)  # arcsine, symmetric
    assert ad.t_sf(0.0, 7) == pytest.approx(0.5)
    assert ad.t_sf(1.0, 1) == pytest.approx(0.25, rel=1e-12)  # Cauchy: 1/2 - atan(1)/pi


def test_interval_by_hand_and_zero_width_at_the_full_set():
    d = [0.1, 0.3, 0.2, 0.4]
    lo, hi = ad.interval(d, 10, 0.95)
    sd = math.sqrt((0.15**2 + 0.05**2 + 0.05**2 + 0.15**2) / 3)
    half = 3.182446305 * sd / 2 * math.sqrt(6 / 9)  # t_{0.975,3} * sd / sqrt(n) * fpc
    assert (lo, hi) == pytest.approx((0.25 - half, 0.25 + half), rel=1e-8)
    assert half == pytest.approx(0.16773, abs=1e-5)
    widths = [ad.interval(d * 3, total, 0.95) for total in (100, 40, 20, 13, 12)]
    assert all(b[1] - b[0] < a[1] - a[0] for a, b in zip(widths, widths[1:], strict=False))  # shrinks with N - n
    assert widths[-1] == pytest.approx((0.25, 0.25))  # n == N: zero width
    assert ad.interval([0.2], 5, 0.95) == (-math.inf, math.inf)


def test_corpus_band_is_the_full_perplexity_when_every_window_is_in():
    fp = [4.0, 4.2, 3.9, 4.1, 4.3]
    q = [4.1, 4.5, 4.0, 4.15, 4.6]
    exact = math.exp(sum(q) / len(q))  # perplexity()'s own formula
    assert ad.corpus_band(fp, q, 0.9) == (exact, exact, exact)
    partial: list[float | None] = [q[0], None, q[2], q[3], None]
    lo, est, hi = ad.corpus_band(fp, partial, 0.9)
    d = [q[0] - fp[0], q[2] - fp[2], q[3] - fp[3]]
    assert est == pytest.approx(math.exp(statistics.fmean(fp) + statistics.fmean(d)), rel=1e-12)
    x_lo, x_hi = ad.interval(d, 5, 0.9)
    assert (lo, hi) == pytest.approx((math.exp(statistics.fmean(fp) + x_lo), math.exp(statistics.fmean(fp) + x_hi)))
    assert ad.corpus_estimate(fp, partial) == est


def test_delta_interval_bonferroni_and_classes():
    assert ad.bonferroni(0.95, 3) == pytest.approx(1 - 0.05 / 3)
    lo, est, hi = ad.delta_interval([(10.0, 11.0, 12.0), (20.0, 21.0, 24.0)], [10.0, 20.0])
    assert (lo, est, hi) == pytest.approx((0.0, 1.0, 3.0))
    assert [ad.zq_class(x) for x in (-1.0, 0.1, 0.1000001, 0.5, 0.5000001, math.inf)] == [1, 1, 2, 2, 3, 3]
    assert ad.zq_class(math.nan) is None
    assert ad.settled(0.6, 5.0, "class") and not ad.settled(0.4, 0.6, "class")
    assert not ad.settled(math.nan, 1.0, "class") and not ad.settled(-math.inf, math.inf, "class")
    assert ad.settled(0.0, 0.05, "rank") and ad.settled(1.0, 2.0, "rank", [(2.5, 3.0), (0.0, 0.9)])
    assert not ad.settled(1.0, 2.0, "rank", [(2.5, 3.0), (1.9, 2.1)])


def test_window_order_is_a_deterministic_permutation():
    order = ad.window_order(40, 0)
    assert sorted(order) == list(range(40)) and order != list(range(40))
    assert order == ad.window_order(40, 0) and order != ad.window_order(40, 1)
    assert ad.window_order(1, 3) == [0] and ad.window_order(0, 3) == []


# --- the stop rule, on synthetic window NLLs --------------------------------------------------------------------

N = 40


def _fp(seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (math.log(100.0) + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).tolist()


def _fake_windows(monkeypatch, table: dict[int, float]) -> list[int]:
    """Window ``i`` holds token ``i`` first; the patched perplexity() returns ``table[i]`` for it."""
    seen: list[int] = []

    def fake(model, ids, batch_size=1, progress=True, desc="ppl", **kw):
        rows = [int(r) for r in ids[:, 0]]
        seen.extend(rows)
        nll = [table[r] for r in rows]
        return PerplexityResult(math.exp(sum(nll) / len(nll)), nll, ids.numel(), 1e-3, 1.0)

    monkeypatch.setattr(ad, "perplexity", fake)
    return seen


def _ids(offset: int = 0) -> torch.Tensor:
    return torch.arange(offset, offset + N).unsqueeze(1).repeat(1, 8)


def _run(monkeypatch, d: dict[str, list[float]], cfg: AdaptiveConfig, peers=()) -> tuple[ad.AdaptiveRun, list[int]]:
    windows, fp_nll, table = {}, {}, {}
    for k, (corpus, diffs) in enumerate(d.items()):
        fp = _fp(k)
        windows[corpus], fp_nll[corpus] = _ids(1000 * k), fp
        table.update({1000 * k + i: fp[i] + diffs[i] for i in range(N)})
    seen = _fake_windows(monkeypatch, table)
    return ad.adaptive_perplexity(None, windows, fp_nll, cfg, peers=peers, progress=False), seen  # type: ignore[arg-type]


def _noise(seed: int, sd: float) -> list[float]:
    """Gaussian noise of mean exactly 0 over the N windows."""
    e = sd * torch.randn(N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (e - e.mean()).tolist()


def test_far_inside_class_3_stops_at_min_windows(monkeypatch):
    d = {c: [0.5 + e for e in _noise(k + 10, 0.02)] for k, c in enumerate(("a", "b"))}
    run, seen = _run(monkeypatch, d, AdaptiveConfig(min_windows=8, step=4, seed=5))
    out = run.outcome
    assert out.windows_used == {"a": 8, "b": 8} and out.windows_total == {"a": N, "b": N}
    assert out.stopped_early and out.zq_class == 3 and 0.5 < out.lo <= out.estimate <= out.hi
    order = ad.window_order(N, 5)
    assert seen == order[:8] + [1000 + i for i in order[:8]]  # round-robin, in the fixed order
    a = run.corpora["a"]
    assert [i for i, v in enumerate(a.nll) if v is not None] == sorted(order[:8])
    assert sum(v is None for v in a.nll) == N - 8


def test_near_a_class_boundary_goes_on_to_the_full_set(monkeypatch):
    fp = [_fp(0), _fp(1)]
    fp_ppl = [math.exp(sum(f) / N) for f in fp]
    # a constant shift per corpus putting the full set's degradation at the class-1/2 boundary, plus noise
    shift = [math.log((p + 0.1) / p) for p in fp_ppl]
    d = {c: [shift[k] + e for e in _noise(k + 20, 0.01)] for k, c in enumerate(("a", "b"))}
    run, seen = _run(monkeypatch, d, AdaptiveConfig(min_windows=8, step=4))
    out = run.outcome
    assert out.windows_used == {"a": N, "b": N} and not out.stopped_early and len(seen) == 2 * N
    assert out.lo == out.hi == out.estimate  # zero width at the full set
    full = [math.exp(sum(f + x for f, x in zip(fp[k], d[c], strict=True)) / N) for k, c in enumerate(("a", "b"))]
    assert [run.corpora[c].estimate for c in ("a", "b")] == pytest.approx(full, rel=1e-12)


def test_rank_target_stops_when_no_peer_overlaps(monkeypatch):
    d = {"a": [0.05 + e for e in _noise(30, 0.03)]}
    alone, _ = _run(monkeypatch, d, AdaptiveConfig(target="rank", min_windows=6, step=2))
    assert alone.outcome.windows_used == {"a": 6} and alone.outcome.target == "rank"  # no peers: the floor
    far, _ = _run(monkeypatch, d, AdaptiveConfig(target="rank", min_windows=6, step=2), peers=[(50.0, 60.0)])
    assert far.outcome.windows_used == {"a": 6}
    est = alone.outcome.estimate
    near, _ = _run(monkeypatch, d, AdaptiveConfig(target="rank", min_windows=6, step=2), peers=[(est, est + 0.01)])
    assert near.outcome.windows_used["a"] > 6


def test_outcome_metrics_are_named_by_the_builders(monkeypatch):
    d = {"a": [0.5 + e for e in _noise(40, 0.02)]}
    run, _ = _run(monkeypatch, d, AdaptiveConfig())
    by_name = {m.name: m.value for m in ad.outcome_metrics(run.outcome)}
    assert by_name == {adaptive_name("delta_ppl"): run.outcome.estimate, adaptive_name("lo"): run.outcome.lo,
                       adaptive_name("hi"): run.outcome.hi, adaptive_name("windows"): 8.0,
                       adaptive_name("early"): 1.0, adaptive_name("class"): 3.0}
    assert "adaptive.windows" in by_name
    with pytest.raises(ValueError, match="unknown adaptive measure"):
        adaptive_name("width")


# --- stories260K end to end -----------------------------------------------------------------------------------

EV = {"perplexity": ["wikitext2", "ptb_new"], "seqlen": 128, "max_windows": 32, "sample": None, "sensitivity": None}


@pytest.fixture(scope="module")
def stories():
    """The FP reference and an RTN W3 per-channel copy of stories260K."""
    fp = ptqlab.load_model("stories260k")
    plan = compile_evaluate(EV, fp.tokenizer, fp.model)
    ref = build_reference(fp.model, fp.tokenizer, plan, progress=False)
    q = ptqlab.load_model("stories260k")
    ptqlab.quantize(q.model, {"weight": {"bits": 3, "granularity": "channel"}}, [], progress=False)
    full = evaluate(q.model, q.tokenizer, plan, ref, progress=False)
    return fp, q, ref, full


def _adaptive(q, ref: Reference, **adaptive) -> Evaluation:
    plan = compile_evaluate({**EV, "adaptive": adaptive}, q.tokenizer, q.model)
    return evaluate(q.model, q.tokenizer, plan, ref, progress=False)


def test_stories_w3_stops_early_in_class_3(stories):
    _, q, ref, full = stories
    res = _adaptive(q, ref, min_windows=8, step=4)
    out = res.adaptive
    assert out is not None and out.stopped_early and out.zq_class == 3
    assert out.windows_used == {"wikitext2": 8, "ptb_new": 8} and out.windows_total == {"wikitext2": 32, "ptb_new": 32}
    by_name = {m.name: m.value for m in res.metrics}
    full_ppl = {m.name: m.value for m in full.metrics}
    names = [perplexity_name(c, 128, 32) for c in ("wikitext2", "ptb_new")]
    fp_mean = sum(math.exp(sum(ref.nll[c]) / 32) for c in ("wikitext2", "ptb_new")) / 2
    full_delta = sum(full_ppl[n] for n in names) / 2 - fp_mean
    assert out.lo <= full_delta <= out.hi  # the interval holds the full evaluation's degradation
    assert by_name[adaptive_name("windows")] == 16 and by_name[adaptive_name("early")] == 1
    assert by_name[adaptive_name("delta_ppl")] == out.estimate
    for n in names:
        assert by_name[n] == pytest.approx(full_ppl[n], rel=0.2)
        w = res.windows[n]
        assert sum(v is not None for v in w.nll) == 8 and w.fp_nll is not None and len(w.fp_nll) == 32
        for v, f in zip(w.nll, full.windows[n].nll, strict=True):
            assert v is None or v == f  # the windows evaluated are the same numbers
    assert {"eval.wikitext2_s", "eval.ptb_new_s"} <= set(res.timings)


def test_stories_adaptive_over_every_window_is_the_full_evaluation(stories):
    _, q, ref, full = stories
    res = _adaptive(q, ref, min_windows=32)
    out = res.adaptive
    assert out is not None and not out.stopped_early and out.lo == out.hi == out.estimate
    assert out.windows_used == out.windows_total == {"wikitext2": 32, "ptb_new": 32}
    full_ppl = {m.name: m.value for m in full.metrics}
    for c in ("wikitext2", "ptb_new"):
        name = perplexity_name(c, 128, 32)
        assert next(m.value for m in res.metrics if m.name == name) == full_ppl[name]  # to the bit
        assert res.windows[name].nll == full.windows[name].nll


def test_adaptive_without_the_fp_reference_is_an_error_before_any_work(stories):
    fp, q, ref, _ = stories
    plan = compile_evaluate({**EV, "adaptive": {}}, q.tokenizer, q.model)

    class NoWork(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("evaluation started")

    with pytest.raises(ConfigError, match="adaptive compares against the FP reference.*'wikitext2'"):
        evaluate(NoWork(), q.tokenizer, plan, Reference(), progress=False)
    with pytest.raises(ConfigError, match="adaptive compares against the FP reference.*own FP model"):
        evaluate(NoWork(), q.tokenizer, plan, Reference(nll=dict(ref.nll), same_model=True), progress=False)
    with pytest.raises(ConfigError, match="adaptive compares against the FP reference"):
        ptqlab.evaluate(fp.model, fp.tokenizer, {**EV, "adaptive": {}}, progress=False)  # FP: its own reference
    with pytest.raises(ConfigError, match="31 window NLLs"):
        evaluate(NoWork(), q.tokenizer, plan, Reference(nll={c: v[:31] for c, v in ref.nll.items()}), progress=False)


# --- schema -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, where", [
    ({"confidence": 1.0}, "evaluate.adaptive.confidence"),
    ({"confidence": 0.5}, "evaluate.adaptive.confidence"),
    ({"target": "order"}, "evaluate.adaptive.target"),
    ({"min_windows": 1}, "evaluate.adaptive.min_windows"),
    ({"step": 0}, "evaluate.adaptive.step"),
    ({"windows": 3}, "evaluate.adaptive.windows: unknown key"),
])
def test_schema_rejects_bad_adaptive_settings_with_the_path(bad, where):
    with pytest.raises(ConfigError, match=where):
        coerce(Evaluate, {"adaptive": bad}, "evaluate")
    with pytest.raises(ConfigError, match=where):
        parse_config({"model": "stories260k", "evaluate": {"adaptive": bad}})


def test_schema_defaults():
    cfg = coerce(Evaluate, {"adaptive": {}}, "evaluate").adaptive
    assert cfg == AdaptiveConfig(confidence=0.95, target="class", min_windows=8, step=4, seed=0)
    assert coerce(Evaluate, {}, "evaluate").adaptive is None
