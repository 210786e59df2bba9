"""Fidelity statistics (llama.cpp's KL-divergence set) against their definitions, and the report's side."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ptqlab.api import quantize
from ptqlab.eval import divergence as dv
from ptqlab.metrics import DIVERGENCE_KINDS, FIDELITY_KINDS, Metric, divergence_name, parse_name
from ptqlab.report import fidelity as fd
from ptqlab.store import RunRecord, Store
from ptqlab.testing import tiny_model

IDS = torch.randint(3, 128, (3, 20), generator=torch.Generator().manual_seed(1))


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    fp = tiny_model("llama", seed=0).eval()
    q = tiny_model("llama", seed=0).eval()
    quantize(q, {"weight": {"bits": 3, "granularity": "channel"}}, progress=False)
    return fp, q


def _logp(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=IDS, use_cache=False).logits.float(), -1)  # (W, T, V)


@pytest.fixture(scope="module")
def measured() -> tuple[dv.Divergence, torch.Tensor, torch.Tensor, dv.TopKReference]:
    fp, q = _pair()
    ref = dv.compute_reference(fp, IDS, k=8)
    return dv.divergence(q, ref), _logp(fp), _logp(q), ref


def test_per_token_values_follow_their_definitions(measured) -> None:
    d, p, q, ref = measured
    # KL: FP's top-8 plus the tail bucket, per position, in window order
    top = p.topk(8, -1)
    q_top = q.gather(-1, top.indices)
    p_tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-7))
    q_tail = torch.log1p(-q_top.exp().sum(-1).clamp(max=1 - 1e-7))
    kl = ((top.values.exp() * (top.values - q_top)).sum(-1) + p_tail.exp() * (p_tail - q_tail)).clamp_min(0)
    torch.testing.assert_close(d.kl_values, kl.flatten(), rtol=1e-4, atol=1e-6)
    assert d.tokens == IDS.numel() and d.kl == pytest.approx(float(kl.double().mean()), rel=1e-5)
    # Δp: Q's probability of the next token minus FP's, at every position but each window's last
    nxt = IDS[:, 1:, None]
    dp = q[:, :-1].gather(-1, nxt).exp() - p[:, :-1].gather(-1, nxt).exp()
    torch.testing.assert_close(d.dp_values, dp.flatten(), rtol=1e-4, atol=1e-6)
    assert torch.isnan(ref.target_logp[:, -1]).all()
    torch.testing.assert_close(ref.target_logp[:, :-1], p[:, :-1].gather(-1, nxt).squeeze(-1), rtol=1e-5, atol=1e-6)
    top1 = (q.argmax(-1) == p.argmax(-1)).double().mean()
    assert d.top1 == pytest.approx(float(top1))


def test_statistics_against_torch(measured) -> None:
    d, *_ = measured
    got = d.by_kind()
    assert tuple(got) == DIVERGENCE_KINDS and set(FIDELITY_KINDS) <= set(got)
    kl, dp = d.kl_values.double(), d.dp_values.double()
    for kind, q in dv.KL_PERCENTILES.items():
        assert got[kind] == pytest.approx(float(torch.quantile(kl, q)), rel=1e-12, abs=1e-15), kind
    for kind, q in dv.DP_PERCENTILES.items():
        assert got[kind] == pytest.approx(float(torch.quantile(dp, q)), rel=1e-12, abs=1e-15), kind
    assert got["kl_se"] == pytest.approx(float(kl.std() / math.sqrt(kl.numel())), rel=1e-12)
    assert got["kl_max"] == float(d.kl_values.max())
    assert got["dp_mean"] == pytest.approx(float(dp.mean()), rel=1e-12)
    assert got["dp_rms"] == pytest.approx(float(dp.square().mean().sqrt()), rel=1e-12)
    assert (got["dp_min"], got["dp_max"]) == (float(dp.min()), float(dp.max()))
    assert got["kl"] > 0 and got["kl_p50"] <= got["kl_p90"] <= got["kl_p99"] <= got["kl_p999"] <= got["kl_max"]
    for kind in DIVERGENCE_KINDS:  # every kind names a metric that reads back
        name = divergence_name(kind, "wikitext2", 20, 3)
        assert parse_name(name).kind == kind and str(parse_name(name)) == name


def test_percentile_is_llama_cpps_and_torchs() -> None:
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 10, 1001):
        v = torch.rand(n, generator=gen)
        for q in (0.0, 0.001, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
            assert dv.percentile(v, q) == pytest.approx(float(torch.quantile(v.double(), q)), rel=1e-12), (n, q)
        s = sorted(v.tolist())  # llama-perplexity's median: the mean of the two middle values
        median = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
        assert dv.percentile(v, 0.5) == pytest.approx(median, rel=1e-12)


def test_mean_se_by_hand() -> None:
    v = torch.tensor([1.0, 2.0, 4.0, 7.0])
    mean, se = dv.mean_se(v)
    sd = math.sqrt(sum((x - 3.5) ** 2 for x in (1, 2, 4, 7)) / 3)
    assert mean == 3.5 and se == pytest.approx(sd / 2)
    assert dv.mean_se(torch.tensor([5.0])) == (5.0, 0.0)


def test_full_divergence_equals_topk_with_the_whole_vocabulary() -> None:
    fp, q = _pair()
    full_ref = dv.compute_reference(fp, IDS, k=128)  # tiny vocabulary: k = V, the tail is empty
    resident = dv.divergence(q, full_ref)
    full = dv.full_divergence(fp, q, IDS, chunk=7)
    # full_divergence scores positions with a next token only: drop each window's last from the top-k run
    keep = torch.ones(IDS.shape, dtype=torch.bool)
    keep[:, -1] = False
    torch.testing.assert_close(full.kl_values, resident.kl_values[keep.flatten()], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(full.dp_values, resident.dp_values, rtol=1e-5, atol=1e-7)
    half = dv.full_divergence(fp, q, IDS, start=10)  # llama-perplexity's positions: n_ctx/2 .. n_ctx-2
    assert half.tokens == 3 * (20 - 1 - 10)
    torch.testing.assert_close(half.kl_values, full.kl_values.view(3, 19)[:, 10:].flatten())
    same = dv.full_divergence(fp, fp, IDS)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.top1 == 1.0 and float(same.dp_values.abs().max()) == 0


def test_reference_without_next_token_log_probs_is_recomputed(tmp_path: Path) -> None:
    model = tiny_model("llama").eval()
    cache = dv.ReferenceCache(tmp_path)
    ref = cache.get(model, "fp-1", "float32", IDS, 8)
    (path,) = tmp_path.glob("*.safetensors")
    save_file({"ids": ref.ids, "top_ids": ref.top_ids, "top_logp": ref.top_logp}, str(path))  # format 1
    again = dv.ReferenceCache(tmp_path)
    back = again.get(model, "fp-1", "float32", IDS, 8)
    assert again.computed == 1 and torch.equal(back.target_logp.nan_to_num(), ref.target_logp.nan_to_num())


# --- report: perplexity ratio, McNemar, detectability ------------------------------------------------------


def test_mcnemar_exact_by_hand() -> None:
    # 2 right->wrong, 8 wrong->right: P(X <= 2 | n=10, 1/2) = (1 + 10 + 45) / 1024, doubled
    assert fd.mcnemar_exact(2, 8) == pytest.approx(112 / 1024, rel=1e-15)
    assert fd.mcnemar_exact(8, 2) == fd.mcnemar_exact(2, 8)
    assert fd.mcnemar_exact(0, 0) == 1.0 and fd.mcnemar_exact(5, 5) == 1.0
    assert fd.mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    scipy_stats = pytest.importorskip("scipy.stats")
    for lost, gained in ((3, 17), (40, 25), (0, 1), (12, 12), (1, 60)):
        want = scipy_stats.binomtest(min(lost, gained), lost + gained, 0.5).pvalue
        assert fd.mcnemar_exact(lost, gained) == pytest.approx(want, rel=1e-9), (lost, gained)


def test_flips_from_stored_fractions() -> None:
    f = fd.flips(0.02, 0.08, 100)
    assert (f.lost, f.gained, f.items) == (2, 8, 100) and f.p_value == pytest.approx(112 / 1024)
    assert f.change == pytest.approx(0.06)
    with pytest.raises(ValueError, match="whole number"):
        fd.flips(0.015, 0.08, 100)


def test_ppl_ratio_paired_over_windows() -> None:
    fp_nll = [3.0, 3.2, 2.9, 3.1]
    nll = [3.05, 3.22, 2.99, 3.12]
    r = fd.ppl_ratio(nll, fp_nll)
    diffs = [0.05, 0.02, 0.09, 0.02]
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    ppl, ppl_fp = math.exp(sum(nll) / 4), math.exp(sum(fp_nll) / 4)
    assert r.value == pytest.approx(ppl / ppl_fp, rel=1e-12) and r.log == pytest.approx(mean)
    assert r.log_se == pytest.approx(sd / 2) and r.se == pytest.approx(r.value * sd / 2) and r.windows == 4
    with pytest.raises(ValueError):
        fd.ppl_ratio([1.0], [1.0, 2.0])


def test_minimum_detectable_effect_and_the_flag() -> None:
    assert fd.minimum_detectable_effect(1.0) == pytest.approx(1.959964 + 0.841621, rel=1e-6)  # 5 %, 80 %
    fp = fd.Effect(0.0, 0.0)
    assert not fd.cannot_tell_apart(fd.Effect(0.10, 0.01), fp)  # 10 se away: clear
    assert fd.cannot_tell_apart(fd.Effect(0.02, 0.01), fp)  # 2 se: below 2.80 se
    assert not fd.cannot_tell_apart(fd.Effect(0.02, 0.01), fp, alpha=0.5, power=0.5)  # a lax test: 0.67 se
    a, b = fd.Effect(0.30, 0.02), fd.Effect(0.25, 0.02)  # 0.05 apart, se of the difference 0.028
    assert fd.cannot_tell_apart(a, b) and not fd.cannot_tell_apart(a, fd.Effect(0.15, 0.02))
    # tasks: a 1-point change on 300 items cannot be told from FP; a 18-point one can
    small = fd.Effect.of_flips(fd.flips(5 / 300, 2 / 300, 300))
    large = fd.Effect.of_flips(fd.flips(60 / 300, 6 / 300, 300))
    assert fd.cannot_tell_apart(small, fp) and not fd.cannot_tell_apart(large, fp)
    assert fd.cannot_tell_apart(fd.Effect.of_rate(0.60, 0.62, 300), fp)  # unpaired, 2 points on 300 items
    assert not fd.cannot_tell_apart(fd.Effect.of_rate(0.40, 0.62, 300), fp)


def _record(rid: str, metrics: list[Metric], windows: dict | None = None, fp: bool = False) -> RunRecord:
    scheme = {} if fp else {"weight": {"bits": 4, "format": "int", "granularity": "channel"}}
    config = {"model": "tiny", "scheme": scheme, "recipe": [],
              "evaluate": {"perplexity": ["wikitext2"], "seqlen": 64, "max_windows": 4,
                           "divergence": {"seqlen": 64, "windows": 2}, "tasks": ["piqa"], "limit": 100}}
    return RunRecord(id=rid, qmodel_key=rid, model="tiny", model_fingerprint="fp-tiny", architecture="Tiny",
                     config=config, status="done", created_at=f"2026-01-01T00:00:0{len(rid)}+00:00",
                     metrics=metrics, windows=windows or {})


def _kl(kl: float, se: float) -> list[Metric]:
    out = []
    for kind in DIVERGENCE_KINDS:
        value = {"kl": kl, "kl_se": se, "top1": 0.9}.get(kind, kl * 2)
        out.append(Metric(divergence_name(kind, "wikitext2", 64, 2), value))
    return out


def test_fidelity_tables_from_stored_runs(tmp_path: Path) -> None:
    from ptqlab.report.runs import load_views

    fp_nll = [3.0, 3.2, 2.9, 3.1]
    ppl = "ppl.wikitext2.s64.w4"
    acc_se = math.sqrt(0.5 * 0.5 / 99)
    runs = [
        _record("fp", [Metric(ppl, math.exp(3.05)), Metric("lm_eval.piqa.acc", 0.5, acc_se)],
                {ppl: {"nll": fp_nll, "fp_nll": fp_nll}}, fp=True),
        _record("aa", [*_kl(0.100, 0.010), Metric(ppl, 1.0), Metric("lm_eval.piqa.acc", 0.5, acc_se),
                       Metric("lm_eval.piqa.lost", 0.02), Metric("lm_eval.piqa.gained", 0.08)],
                {ppl: {"nll": [x + d for x, d in zip(fp_nll, (0.15, 0.12, 0.19, 0.12), strict=True)],
                       "fp_nll": fp_nll}}),
        _record("bbb", [*_kl(0.110, 0.010), Metric("lm_eval.piqa.acc", 0.5, acc_se),
                        Metric("lm_eval.piqa.lost", 0.30), Metric("lm_eval.piqa.gained", 0.0)]),
        _record("cccc", [*_kl(0.500, 0.010)]),
    ]
    store = Store(str(tmp_path / "s.db"))
    for r in runs:
        store.save(r)
    views = load_views(store)
    table = fd.fidelity_table(views)
    assert table.columns[:4] == ["run", "on", "KL", "± se"]
    by_run = {rids[0]: cells for cells, rids in zip(table.rows, table.runs, strict=True)}
    assert list(by_run) == ["aa", "bbb", "cccc"]  # FP has no row; by increasing KL
    col = table.columns.index
    assert by_run["aa"][col("KL")] == 0.1 and by_run["aa"][col("p99.9")] == 0.2
    assert by_run["aa"][col("ppl ratio")] == pytest.approx(math.exp(0.145))  # se of ln 0.0166
    assert by_run["aa"][col("ppl ≈ FP")] is False and by_run["bbb"][col("ppl ratio")] is None
    assert by_run["aa"][col("KL ≈ above")] is None  # the first of its group
    assert by_run["bbb"][col("KL ≈ above")] is True  # 0.01 apart, se 0.014: below 2.8 se
    assert by_run["cccc"][col("KL ≈ above")] is False
    flips = fd.flips_table(views)
    rows = {rids[0]: cells for cells, rids in zip(flips.rows, flips.runs, strict=True)}
    c = flips.columns.index
    assert rows["aa"][c("items")] == 100 and (rows["aa"][c("right→wrong")], rows["aa"][c("wrong→right")]) == (2, 8)
    assert rows["aa"][c("McNemar p")] == pytest.approx(112 / 1024) and rows["aa"][c("≈ FP")] is True
    assert rows["bbb"][c("McNemar p")] == pytest.approx(2 / 2**30) and rows["bbb"][c("≈ FP")] is False
    assert [t.key for t in fd.fidelity_tables(views)] == ["fidelity", "fidelity-flips"]
