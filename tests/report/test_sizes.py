"""Model size as an axis: the size findings on constructed stores of three models, the model columns, the
reference notes, the loss-by-size figure and ``recommend --params``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from report_testutil import act, kv, make_run, weight

from ptqlab.cli import main as cli_main
from ptqlab.metrics import BITS_SOURCE, Metric
from ptqlab.report import load_views, write_report
from ptqlab.report.findings import (
    CONTRADICTS,
    HOLDS,
    NOT_ENOUGH,
    NOT_HOLDS,
    SUPPORTS,
    WITHIN_NOISE,
    Finding,
    check_findings,
    verdict_of,
)
from ptqlab.report.recommend import Budget, nearest_size, recommend_each
from ptqlab.report.runs import RunView
from ptqlab.report.sizes import (
    family_of,
    model_sizes,
    parse_params,
    reference_text,
    relative_loss,
    size_series,
)
from ptqlab.report.tables import build_tables
from ptqlab.store import RunRecord, Store

# name: (fingerprint, architecture, parameters, source bits per weight)
MODELS: dict[str, tuple[str, str, int, float | None]] = {
    "small": ("fp-small", "LlamaForCausalLM", 135_000_000, 5.0),
    "mid": ("fp-mid", "Qwen2ForCausalLM", 630_000_000, 5.52),
    "large": ("fp-large", "Qwen2ForCausalLM", 1_780_000_000, 4.81),
}
SIZE_KEYS = ("size-weights", "size-activations", "size-pattern")


def sized_run(model: str, rid: str, *, w: dict[str, Any] | None = None, a: dict[str, Any] | None = None,
              k: dict[str, Any] | None = None, recipe: tuple[str, ...] = (), d: float = 0.0,
              bits_weight: float = 16.0, n: int = 0, source: bool = True) -> RunRecord:
    """A run of ``model`` whose windows are FP's shifted by ``d`` nats (relative increase about exp(d) - 1)."""
    fingerprint, arch, params, bits = MODELS[model]
    r = make_run(f"{model}-{rid}", w=w, a=a, k=k, recipe=recipe, d=d, bits_weight=bits_weight, n=n)
    r.model, r.model_fingerprint, r.architecture = model, fingerprint, arch
    r.config["model"] = model
    size = params * 2 * bits_weight / 16  # every parameter at 16 bits when the weights stay in FP
    r.metrics = [Metric(m.name, size if m.name == "size.model_bytes" else m.value, m.stderr) for m in r.metrics]
    if source and bits is not None:
        r.metrics.append(Metric(BITS_SOURCE, bits))
    return r


def store_of(tmp_path: Path, name: str, specs: list[tuple[str, str, dict[str, Any]]]) -> Store:
    """``specs``: (model, run id, keyword arguments of :func:`sized_run`); an FP run per model is added first."""
    store = Store(tmp_path / f"{name}.db")
    n = 0
    for model in dict.fromkeys(m for m, _, _ in specs):
        store.save(sized_run(model, "fp", n=n))
        n += 1
    for model, rid, kwargs in specs:
        store.save(sized_run(model, rid, n=n, **kwargs))
        n += 1
    return store


def findings_of(store: Store) -> tuple[dict[str, Finding], list[RunView]]:
    views = load_views(store)
    return {f.key: f for f in check_findings(views)}, views


def check_pairs(f: Finding, views: list[RunView]) -> None:
    """Every size pair: one protocol, two models, the interval by the noise rule, the outcome by the interval."""
    by_id = {v.id: v for v in views}
    for p in f.pairs:
        a, b = (by_id[r] for r in p.runs)
        assert a.protocol.key == b.protocol.key
        lo, hi = p.interval
        if f.key != "size-pattern":
            assert a.record.model_fingerprint != b.record.model_fingerprint
            half = max(1.96 * (p.se or 0.0), 0.01)
            assert (lo, hi) == pytest.approx((p.diff - half, p.diff + half))
            assert p.diff == pytest.approx(p.delta[1] - p.delta[0])
            assert p.delta == pytest.approx((relative_loss(a)[0], relative_loss(b)[0]))  # type: ignore[index]
            assert p.scope in ("within Qwen2", "across Llama and Qwen2")
            assert ("within" in p.scope) == (a.record.architecture == b.record.architecture)
        else:
            assert a.cohort == b.cohort
        inside, outside = lo > 0, hi < 0
        if f.key == "size-pattern":
            e_lo, e_hi = p.expected
            inside = (e_lo is None or lo > e_lo) and (e_hi is None or hi < e_hi)
            outside = (e_lo is not None and hi < e_lo) or (e_hi is not None and lo > e_hi)
        assert p.outcome == (SUPPORTS if inside else CONTRADICTS if outside else WITHIN_NOISE)
    assert f.verdict == verdict_of(f.pairs)
    data = json.loads(json.dumps(f.to_json(), allow_nan=False))
    assert len(data["pairs"]) == len(f.pairs)


def w4(model: str, d: float) -> tuple[str, str, dict[str, Any]]:
    return (model, "w4", dict(w=weight(4), recipe=("rtn",), d=d, bits_weight=4.03))


def a4(model: str, d: float) -> tuple[str, str, dict[str, Any]]:
    return (model, "a4", dict(a=act(4), d=d))


# ---- larger models lose less under weight quantization ---------------------------------------------------------


def test_weights_finding_holds_with_the_families_said(tmp_path: Path) -> None:
    store = store_of(tmp_path, "holds", [w4("small", 0.10), w4("mid", 0.05), w4("large", 0.02)])
    found, views = findings_of(store)
    f = found["size-weights"]
    check_pairs(f, views)
    assert f.verdict == HOLDS and f.counts[SUPPORTS] == 3
    scopes = sorted(p.scope or "" for p in f.pairs)
    assert scopes == ["across Llama and Qwen2", "across Llama and Qwen2", "within Qwen2"]
    within = next(p for p in f.pairs if p.scope == "within Qwen2")
    assert within.runs == ("large-w4", "mid-w4")  # the larger (expected better) first
    assert within.model == "large vs mid"
    assert any(e.startswith("within Qwen2: holds (1 pairs") for e in f.evidence)
    assert any(e.startswith("across Llama and Qwen2: holds (2 pairs") for e in f.evidence)
    assert any("families: Llama: small; Qwen2: mid, large" in e for e in f.evidence)
    pj = f.to_json()["pairs"][0]
    assert pj["scope"] in ("within Qwen2", "across Llama and Qwen2")
    assert "scope" not in found["gptq-beats-rtn"].to_json()["pairs"][:1]  # one-model pairs have no scope


def test_weights_finding_does_not_hold_when_larger_lose_more(tmp_path: Path) -> None:
    store = store_of(tmp_path, "not", [w4("small", 0.02), w4("mid", 0.05), w4("large", 0.10)])
    found, views = findings_of(store)
    f = found["size-weights"]
    check_pairs(f, views)
    assert f.verdict == NOT_HOLDS and f.counts[CONTRADICTS] == 3


def test_weights_finding_within_noise_and_with_one_size_is_not_enough_data(tmp_path: Path) -> None:
    same = store_of(tmp_path, "same", [w4("small", 0.05), w4("mid", 0.05), w4("large", 0.05)])
    found, views = findings_of(same)
    check_pairs(found["size-weights"], views)
    assert found["size-weights"].verdict == NOT_ENOUGH and found["size-weights"].counts[WITHIN_NOISE] == 3
    one = store_of(tmp_path, "one", [w4("small", 0.10)])
    found, _ = findings_of(one)
    assert not set(SIZE_KEYS) & set(found)  # one model: a size claim does not apply, it is not listed
    other = store_of(tmp_path, "other", [w4("small", 0.10), ("mid", "a8", dict(a=act(8), d=0.01))])
    found, _ = findings_of(other)  # two models, no weight scheme measured on both
    for key in SIZE_KEYS:
        assert found[key].verdict == NOT_ENOUGH and not found[key].pairs, key


def test_a_model_without_a_parameter_count_is_left_out(tmp_path: Path) -> None:
    """A model with no run that keeps its weights in FP has no parameter count: it is on no size axis."""
    store = Store(tmp_path / "nofp.db")
    store.save(sized_run("small", "fp"))
    for n, (model, rid, kwargs) in enumerate([w4("small", 0.10), w4("mid", 0.02)]):
        store.save(sized_run(model, rid, n=n + 1, **kwargs))
    views = load_views(store)
    assert model_sizes(views)["fp-mid"].params is None
    assert size_series(views) == []
    f = {f.key: f for f in check_findings(views)}["size-weights"]
    assert f.verdict == NOT_ENOUGH and any("two model sizes or more" in e for e in f.evidence)


# ---- smaller models tolerate activation quantization better -----------------------------------------------------


def test_activation_finding_holds_does_not_hold_and_not_enough(tmp_path: Path) -> None:
    found, views = findings_of(store_of(tmp_path, "a-holds", [a4("small", 0.2), a4("mid", 0.5), a4("large", 1.0)]))
    check_pairs(found["size-activations"], views)
    assert found["size-activations"].verdict == HOLDS
    p = next(p for p in found["size-activations"].pairs if p.scope == "within Qwen2")
    assert p.runs == ("mid-a4", "large-a4")  # the smaller (expected better) first
    found, views = findings_of(store_of(tmp_path, "a-not", [a4("small", 1.0), a4("mid", 0.5), a4("large", 0.2)]))
    check_pairs(found["size-activations"], views)
    assert found["size-activations"].verdict == NOT_HOLDS
    found, _ = findings_of(store_of(tmp_path, "a-none", [w4("small", 0.1), w4("large", 0.02)]))
    assert found["size-activations"].verdict == NOT_ENOUGH  # weight-only runs are not activation evidence
    assert found["size-weights"].verdict == HOLDS


# ---- the qllm-eval pattern across sizes --------------------------------------------------------------------------


def pattern_runs(model: str, w8: float = 0.001) -> list[tuple[str, str, dict[str, Any]]]:
    """W8 lossless (by default), W4 and KV4 a small loss, W3 a clear one, W2 a collapse (relative ~ exp(d) - 1)."""
    return [(model, "w8", dict(w=weight(8), recipe=("rtn",), d=w8, bits_weight=8.03)),
            (model, "w4", dict(w=weight(4), recipe=("rtn",), d=0.06, bits_weight=4.03)),
            (model, "w3", dict(w=weight(3), recipe=("rtn",), d=0.4, bits_weight=3.03)),
            (model, "w2", dict(w=weight(2), recipe=("rtn",), d=2.0, bits_weight=2.03)),
            (model, "kv4", dict(k=kv(4), d=0.06))]


def test_pattern_across_sizes(tmp_path: Path) -> None:
    found, views = findings_of(store_of(tmp_path, "p-holds", pattern_runs("small") + pattern_runs("large")))
    f = found["size-pattern"]
    check_pairs(f, views)
    assert f.verdict == HOLDS and f.counts[SUPPORTS] == 10 and not f.counts[CONTRADICTS]
    assert any(e.startswith("small (135M parameters, Llama): holds") for e in f.evidence)
    assert any(e.startswith("large (1.78B parameters, Qwen2): holds") for e in f.evidence)
    assert any(e.startswith("within a family: none; 2 families") for e in f.evidence)

    lossy = [r if r[1] != "w8" else (r[0], "w8", {**r[2], "d": 0.1}) for r in pattern_runs("large")]
    only_w8 = [r for r in pattern_runs("small", w8=0.1) + lossy if r[1] == "w8"]
    found, views = findings_of(store_of(tmp_path, "p-not", only_w8))
    check_pairs(found["size-pattern"], views)
    assert found["size-pattern"].verdict == NOT_HOLDS  # W8 loses 10 % on both sizes: not lossless

    found, views = findings_of(store_of(tmp_path, "p-mixed", pattern_runs("small") + lossy))
    assert found["size-pattern"].verdict == "mixed"  # holds on the small model, W8 contradicts it on the large

    found, _ = findings_of(store_of(tmp_path, "p-one", pattern_runs("small") + [w4("mid", 0.05)[:2] + ({},)]))
    f = found["size-pattern"]  # the mid model has an FP run only: the pattern was measured on one size
    assert f.verdict == NOT_ENOUGH and not f.pairs
    assert any("measured on 1 model size" in e for e in f.evidence)
    assert found["qllm-pattern"].verdict == HOLDS  # the one-model finding is unchanged


# ---- tables, notes, figure --------------------------------------------------------------------------------------


def three_model_store(tmp_path: Path) -> Store:
    specs = []
    for model, scale in (("small", 1.0), ("mid", 0.6), ("large", 0.3)):
        specs += [w4(model, 0.1 * scale), (model, "w8", dict(w=weight(8), recipe=("rtn",), d=0.001 * scale,
                                                             bits_weight=8.03)),
                  (model, "w4g64", dict(w=weight(4, "group", group=64), recipe=("rtn",), d=0.05 * scale,
                                        bits_weight=4.5)), a4(model, 0.2 / scale)]
    return store_of(tmp_path, "three", specs)


def test_tables_have_a_column_set_per_model_with_parameter_counts_and_the_reference(tmp_path: Path) -> None:
    store = three_model_store(tmp_path)
    views = load_views(store)
    tables = {t.key: t for t in build_tables(views)}
    heads = tables["zq-weight"].columns
    for label in ("small (135M parameters)", "mid (630M parameters)", "large (1.78B parameters)"):
        assert f"Δ ppl · {label}" in heads
    assert heads.index("Δ ppl · small (135M parameters)") < heads.index("Δ ppl · large (1.78B parameters)")
    text = reference_text(model_sizes(views).values())
    assert "not FP16" in text and "small at 5.00" in text and "large at 4.81" in text
    report = write_report(store.path, tmp_path / "rep")
    zq = next(t for t in report.tables if t.key == "zq-weight")
    assert "Reference (FP): the dequantized GGUF file, not FP16" in zq.note
    assert "mid at 5.52" in zq.note
    md = (report.out / "tables" / "zq-weight.md").read_text()
    assert "not FP16" in md
    fig = next(f for f in report.figures if f.key == "loss-by-size")
    assert fig.png.is_file() and fig.svg.is_file()
    assert "large (1.78B parameters, Qwen2)" in fig.caption and "not FP16" in fig.caption
    assert "Families: Llama: small; Qwen2: mid, large" in fig.caption
    assert set(fig.runs) >= {"small-w4", "mid-w4", "large-w4", "small-a4", "large-a4"}
    assert "loss-by-size" in (report.out / "report.md").read_text()
    data = json.loads((report.out / "findings.json").read_text())
    assert {d["key"]: d["verdict"] for d in data if d["key"] in SIZE_KEYS} == {
        "size-weights": HOLDS, "size-activations": HOLDS, "size-pattern": HOLDS}


def test_no_reference_note_without_a_gguf_source(tmp_path: Path) -> None:
    store = Store(tmp_path / "plain.db")
    for n, (model, rid, kwargs) in enumerate([("small", "fp", {}), w4("small", 0.1)]):
        store.save(sized_run(model, rid, n=n, source=False, **kwargs))
    views = load_views(store)
    assert reference_text(model_sizes(views).values()) == ""
    assert all("not FP16" not in t.note for t in build_tables(views))


def test_family_and_params_parsing() -> None:
    assert family_of("Qwen2ForCausalLM") == "Qwen2" and family_of("GPT2LMHeadModel") == "GPT2"
    assert family_of(None) == "unknown"
    assert parse_params("1.5B") == 1.5e9 and parse_params("500M") == 5e8 and parse_params("1.5e9") == 1.5e9
    assert parse_params("135m") == 135e6 and parse_params("260K") == 260e3
    for bad in ("", "-1B", "big", "0"):
        with pytest.raises(ValueError):
            parse_params(bad)


# ---- recommend --params -------------------------------------------------------------------------------------------


def test_recommend_params_picks_the_nearest_measured_size(tmp_path: Path) -> None:
    views = load_views(three_model_store(tmp_path))
    chosen, size = nearest_size(views, 1.5e9)
    assert size.model == "large" and size.inside and {v.record.model for v in chosen} == {"large"}
    assert "nearest measured size, large (1.78B parameters, Qwen2), within the measured range" in size.note
    _, size = nearest_size(views, 7e9)
    assert size.model == "large" and not size.inside and "not an extrapolation" in size.note
    _, size = nearest_size(views, 2e8)  # log scale: 200M is nearer 135M than 630M
    assert size.model == "small"
    recs = recommend_each(chosen, Budget(max_ppl_increase=0.5))
    assert len(recs) == 1 and recs[0].model == "large"


def test_recommend_params_with_one_size_says_it_is_for_the_measured_model(tmp_path: Path) -> None:
    views = load_views(store_of(tmp_path, "one", [w4("small", 0.1)]))
    chosen, size = nearest_size(views, 7e9)
    assert chosen == views and size.model is None
    assert "recommendation is for the measured model only" in size.note and "7B" in size.note


def test_recommend_params_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = three_model_store(tmp_path)
    assert cli_main(["--store", str(store.path), "recommend", "--max-ppl-increase", "0.5", "--params", "600M",
                     "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["size"]["model"] == "mid" and data["size"]["within_measured_range"] is True
    assert [r["model"] for r in data["recommendations"]] == ["mid"]
    assert cli_main(["--store", str(store.path), "recommend", "--max-class", "3", "--params", "1.5B"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("model size: for 1.5B parameters: the nearest measured size, large")
    one = store_of(tmp_path, "one-cli", [w4("small", 0.1)])
    assert cli_main(["--store", str(one.path), "recommend", "--max-class", "3", "--params", "7B"]) == 0
    assert "for the measured model only" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["--store", str(one.path), "recommend", "--max-class", "3", "--params", "lots"])
    assert math.isfinite(parse_params("7B"))
