"""Tables, findings, the Pareto front, recommendations and comparisons on a store with known runs."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import statistics
from pathlib import Path

import pytest
from report_testutil import FP_PPL, RUNS, build_store, expected_quality, fp_nll, make_run, q_nll, weight

from ptqlab.cli import main
from ptqlab.errors import ConfigError, ReportError
from ptqlab.metrics import Metric
from ptqlab.report import Budget, compare_runs, load_views, recommend, select_views, write_report
from ptqlab.report.findings import HOLDS, MIXED, NOT_ENOUGH, NOT_HOLDS, check_findings
from ptqlab.report.plots import pareto_front, sensitivity_grid
from ptqlab.report.render import to_csv, to_latex
from ptqlab.report.runs import proportion_se
from ptqlab.report.select import apply_filter, parse_filter
from ptqlab.report.tables import build_tables, swept_bits
from ptqlab.store import Store

D = {r["rid"]: r.get("d", 0.0) for r in RUNS}


def _table(views, key):
    return next(t for t in build_tables(views) if t.key == key)


def _row(table, run_id):
    return dict(zip(table.columns, table.rows[[r[0] for r in table.runs].index(run_id)], strict=True))


def test_weight_table_numbers_and_classes(store: Store) -> None:
    t = _table(load_views(store), "zq-weight")
    assert [r[0] for r in t.runs] == ["w8row", "w4g64", "w4row", "w3g64", "w3row"]  # 8 > 4 > 3; g64 before row
    for rid in ("w8row", "w4row", "w3g64"):
        mean, delta = expected_quality(D[rid])
        row = _row(t, rid)
        assert row["mean ppl"] == pytest.approx(mean, rel=1e-12)
        assert row["Δ ppl"] == pytest.approx(delta, rel=1e-9)
        assert row["class"] == (1 if delta <= 0.1 else 2 if delta <= 0.5 else 3)
    # the standard error: per corpus ppl * sd(paired NLL differences) / sqrt(windows), combined over corpora
    se_c = [math.exp(sum(q_nll(c, 0.1)) / 4) * statistics.stdev(
        [a - b for a, b in zip(q_nll(c, 0.1), fp_nll(c), strict=True)]) / 2 for c in FP_PPL]
    assert _row(t, "w4row")["± (se)"] == pytest.approx(math.sqrt(sum(s * s for s in se_c)) / 3)
    assert _row(t, "w8row")["class"] == 1 and _row(t, "w3row")["class"] == 3


def test_fp_from_the_fp_run_when_the_run_kept_no_windows(store: Store) -> None:
    row = _row(_table(load_views(store), "zq-activation"), "a8")
    assert row["Δ ppl"] == pytest.approx(expected_quality(0.03)[1], rel=1e-9)
    assert row["± (se)"] is None  # neither side has a standard error


def test_methods_table_pairs_lorc(store: Store) -> None:
    t = _table(load_views(store), "zq-methods")
    row = _row(t, "w3row")
    assert t.runs[[r[0] for r in t.runs].index("w3row")] == ["w3row", "w3lorc"]
    assert row["LoRC gain"] == pytest.approx(expected_quality(0.5)[1] - expected_quality(0.2)[1])
    assert _row(t, "w4gptq")["Δ ppl +LoRC"] is None


def _pivot_row(table, measure, scheme):
    return next(dict(zip(table.columns, r, strict=True)) for r in table.rows if r[0] == measure and r[1] == scheme)


def test_qllm_tables(store: Store) -> None:
    # qllm-eval's layout (issue 30): rows are schemes with the bit width open, columns the bits, cells Δ ± se
    views = load_views(store)
    tasks = _pivot_row(_table(views, "qllm-tasks"), "Δ acc piqa", "Wb row asym [rtn]")
    assert tasks["b=4"] == pytest.approx(-0.05)
    n = 400  # from lm-eval's stderr of 0.55 over 400 items
    assert tasks["± b=4"] == pytest.approx(math.sqrt((0.11 - 0.05**2) / (n - 1)), rel=1e-6)
    assert tasks["FP"] == pytest.approx(0.60)
    assert _pivot_row(_table(views, "qllm-agreement"), "agreement piqa", "Wb row asym [rtn]")["b=4"] \
        == pytest.approx(0.89)
    lc = _pivot_row(_table(views, "qllm-long-context"), "Δ retrieval acc, 2048 tokens", "KVb g64 asym")
    assert lc["b=4"] == pytest.approx(0.5 - 0.9)  # against the FP run's retrieval
    assert lc["b=8"] == pytest.approx(0.0) and lc["FP"] == 0.9
    assert lc["± b=4"] == pytest.approx(math.hypot(proportion_se(0.5, 10), proportion_se(0.9, 10)))
    assert _pivot_row(_table(views, "qllm-divergence"), "KL wikitext2", "KVb g64 asym")["b=4"] == 0.05


def test_findings_hold_on_the_known_store(store: Store) -> None:
    verdicts = {f.key: f.verdict for f in check_findings(load_views(store))}
    # no row/group runs within 0.1 effective bits, and retrieval on 10 samples only: neither can be settled
    unsettled = {"coarse-high-beats-fine-low", "long-context-kv"}
    assert verdicts == {k: NOT_ENOUGH if k in unsettled else HOLDS for k in verdicts}
    assert set(verdicts) == {"activation-vs-weight", "groups-beat-rows", "gptq-beats-rtn", "coarse-high-beats-fine-low",
                             "qllm-pattern", "lorc-lowest-bits", "long-context-kv"}


def test_findings_that_do_not_hold(tmp_path: Path) -> None:
    contrary = [dict(r) for r in RUNS]
    for spec in contrary:
        spec.update({"w4gptq": {"d": 0.2}, "a8": {"d": 0.0}, "a4": {"d": 0.01}, "w3lorc": {"d": 0.49},
                     "w4lorc": {"d": 0.0}, "w3g64": {"d": 0.05}, "w4g64": {"d": 0.3}, "kv4": {"d": 0.5},
                     "w3row": {"d": 0.01}}.get(spec["rid"], {}))
    # coarse-vs-fine pairs only runs within 0.1 effective bits: W3 g32 (4.0 b/w) against W4 per row (4.03)
    contrary.append(dict(rid="w3g32", w=weight(3, "group", group=32), recipe=("rtn",), d=0.05, bits_weight=4.0))
    found = {f.key: f for f in check_findings(load_views(build_store(tmp_path / "c.db", contrary)))}
    for key in ("activation-vs-weight", "gptq-beats-rtn", "lorc-lowest-bits", "groups-beat-rows",
                "coarse-high-beats-fine-low", "long-context-kv"):
        assert found[key].verdict == NOT_HOLDS, (key, found[key].evidence)
    assert found["qllm-pattern"].verdict == MIXED  # W3 and KV4 contradict it, the other configs still support it
    assert any("contradicts" in e for e in found["gptq-beats-rtn"].evidence)


def test_findings_without_enough_data(store: Store) -> None:
    views = apply_filter(load_views(store), parse_filter("target=W,method=rtn,lorc=false"))
    found = {f.key: f.verdict for f in check_findings(views)}
    assert found["activation-vs-weight"] == NOT_ENOUGH
    assert found["gptq-beats-rtn"] == NOT_ENOUGH
    assert found["lorc-lowest-bits"] == NOT_ENOUGH
    assert found["long-context-kv"] == NOT_ENOUGH
    assert found["groups-beat-rows"] == HOLDS


def test_pareto_front_matches_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(50):
        pts = [(rng.choice([2.0, 3.0, 3.5, 4.0, 4.5, 8.0]), rng.choice([0.01, 0.1, 0.5, 1.0, 5.0])) for _ in range(12)]
        brute = {i for i, p in enumerate(pts)
                 if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts)}
        front = pareto_front(pts)
        # duplicates of a front point: one of them is on the front
        assert {pts[i] for i in front} == {pts[i] for i in brute}
        assert [pts[i][0] for i in front] == sorted(pts[i][0] for i in front)


def test_sensitivity_grid_is_layers_by_linears(store: Store) -> None:
    layers, modules, grid = sensitivity_grid(store.get("w3row"))  # type: ignore[arg-type]
    assert layers == [0, 1] and modules == ["q_proj", "o_proj", "down_proj"]  # the layer's order, not alphabetical
    assert grid == [[pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.2)],
                    [pytest.approx(0.2), pytest.approx(0.2), pytest.approx(0.4)]]


def test_recommend_smallest_meeting_the_class(store: Store) -> None:
    rec = recommend(load_views(store), Budget(max_class=1))
    assert rec.choice is not None and rec.choice.view.id == "w8row" and rec.choice.sure
    out = rec.to_json()
    assert out["choice"]["id"] == "w8row" and out["choice"]["evidence"][0]["measure"] == "mean perplexity"


def test_recommend_flags_a_budget_met_only_inside_the_interval(store: Store) -> None:
    rec = recommend(load_views(store), Budget(max_ppl_increase=0.03))
    assert rec.choice is not None and rec.choice.view.id == "w8row"
    assert not rec.choice.sure and rec.to_json()["flagged"]
    assert rec.sure_choice is not None and rec.sure_choice.sure
    lo, hi = rec.choice.evidence[0].interval
    assert lo < rec.choice.evidence[0].loss <= 0.03 < hi


def test_recommend_without_an_answer_names_the_nearest(store: Store) -> None:
    rec = recommend(load_views(store), Budget(max_class=1, max_bits=3.6))
    assert rec.choice is None
    assert [c.view.id for c in rec.nearest][0] == "w3lorc"  # the smallest excess under 3.6 bits


def test_recommend_on_accuracy_and_kl(store: Store) -> None:
    views = load_views(store)
    rec = recommend(views, Budget(max_acc_drop=0.1, task="piqa"))
    assert rec.choice is not None and rec.choice.view.id == "w4row"
    assert rec.choice.evidence[0].loss == pytest.approx(0.05)
    assert recommend(views, Budget(max_acc_drop=0.01, task="piqa")).choice.view.id == "fp"  # type: ignore[union-attr]
    assert recommend(views, Budget(max_kl=0.1)).choice.view.id == "kv4"  # type: ignore[union-attr]
    with pytest.raises(ReportError, match="close: piqa"):
        recommend(views, Budget(max_acc_drop=0.1, task="piqq"))


def test_compare_pairs_the_shared_windows(store: Store) -> None:
    cmp = compare_runs(store, ["w4row", "w4gptq"], "ppl.*")
    row = next(r for r in cmp.rows if r.metric == "ppl.wikitext2.s512.w4")
    a, b = q_nll("wikitext2", 0.10), q_nll("wikitext2", 0.06)
    assert row.diffs[1] == pytest.approx(math.exp(sum(b) / 4) - math.exp(sum(a) / 4))
    assert row.paired[1]
    # the same noise on both sides: the paired differences are constant, so their spread is zero
    assert row.diff_se[1] == pytest.approx(0.0, abs=1e-12)
    mixed = compare_runs(store, ["w4row", "a8"], "ppl.ptb*")
    assert not mixed.rows[0].paired[1] and mixed.rows[0].diff_se[1] is None
    with pytest.raises(ReportError, match="close"):
        compare_runs(store, ["w4row", "w4gptq"], "ppl.wikitext3.s512.w4")
    with pytest.raises(ReportError, match="at least two"):
        compare_runs(store, ["w4row"])


def test_filters(store: Store) -> None:
    views = load_views(store)
    assert {v.id for v in apply_filter(views, parse_filter("scheme.weight.bits<=3"))} == {"w3row", "w3g64", "w3lorc"}
    assert {v.id for v in apply_filter(views, parse_filter("target=KV, bits=4"))} == {"kv4"}
    assert {v.id for v in apply_filter(views, parse_filter("id=w4*,lorc=true"))} == {"w4lorc"}
    with pytest.raises(ConfigError, match="KEY OP VALUE"):
        parse_filter("bits")
    with pytest.raises(ReportError, match="no stored run matches"):
        select_views(store, "scheme.weight.bits=5")


def test_outputs_carry_raw_numbers_and_run_ids(store: Store) -> None:
    t = _table(load_views(store), "zq-weight")
    csv_text = to_csv(t)
    assert csv_text.splitlines()[0].endswith(",runs") and "w4row" in csv_text
    tex = to_latex(t)
    assert r"\toprule" in tex and r"$\Delta$ ppl" in tex and r"\bottomrule" in tex


def test_write_report_files(store: Store, tmp_path: Path) -> None:
    report = write_report(store.path, tmp_path / "rep")
    names = {p.name for p in (tmp_path / "rep" / "tables").iterdir()}
    assert {"zq-weight.csv", "zq-weight.md", "zq-weight.tex", "qllm-tasks.csv"} <= names
    figures = {f.key for f in report.figures}
    assert {"pareto", "loss-by-bits", "long-context", "kl-vs-accuracy"} <= figures
    # heatmaps: by default the runs with the fewest weight bits that stored per-module errors
    assert {k for k in figures if k.startswith("sensitivity-")} == {"sensitivity-w3row", "sensitivity-w4row"}
    only = write_report(store.path, tmp_path / "rep-h", heatmaps=["w4row"])
    assert [f.key for f in only.figures if f.key.startswith("sensitivity-")] == ["sensitivity-w4row"]
    with pytest.raises(ReportError, match="--heatmap"):
        write_report(store.path, tmp_path / "rep-x", heatmaps=["nope"])
    html = report.index.read_text()
    assert "<svg" in html and 'id="run-w4row"' in html and "<metadata>" not in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//|url\((https?:)?//|@import""", html)
    findings = json.loads((tmp_path / "rep" / "findings.json").read_text())
    # the known store cannot settle coarse-vs-fine (no runs within 0.1 bits) nor long context (10 samples)
    assert all(f["verdict"] == ("not enough data" if f["key"] in ("coarse-high-beats-fine-low", "long-context-kv")
                                else "holds") for f in findings)
    again = write_report(store.path, tmp_path / "rep")  # an earlier report is replaced
    assert again.index.read_text() == html  # the same runs give the same page
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rep-")]


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Store(tmp_path / "empty.db")
    assert main(["report", "--store", str(tmp_path / "empty.db"), "--out", str(tmp_path / "r")]) == 2
    assert "no finished run" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main(["report", "--store", str(tmp_path / "nope.db")]) == 2
    assert "no results store" in capsys.readouterr().err
    build_store(tmp_path / "s.db", RUNS[:3])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("x")
    assert main(["report", "--store", str(tmp_path / "s.db"), "--out", str(tmp_path / "busy")]) == 2
    assert "not a ptqlab report" in capsys.readouterr().err
    assert main(["report", "--store", str(tmp_path / "s.db"), "--where", "target=KV"]) == 2
    assert "no stored run matches" in capsys.readouterr().err
    assert main(["recommend", "--store", str(tmp_path / "s.db"), "--max-class", "1", "--max-bits", "2"]) == 1
    assert "nothing meets the budget" in capsys.readouterr().out
    assert main(["recommend", "--store", str(tmp_path / "s.db"), "--max-acc-drop", "0.1", "--task", "pika"]) == 2
    assert "close: piqa" in capsys.readouterr().err


def test_cli_report_recommend_compare(store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    assert main(["report", "--store", str(store.path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(str((out / "index.html").resolve()))
    assert main(["recommend", "--store", str(store.path), "--max-class", "1", "--json"]) == 0
    # issue 30: recommend --json lists one recommendation per cohort (protocols are never ranked together)
    assert json.loads(capsys.readouterr().out)["recommendations"][0]["choice"]["id"] == "w8row"
    assert main(["compare", "--store", str(store.path), "w4row", "w4gptq", "--metric", "ppl.*"]) == 0
    text = capsys.readouterr().out
    assert "ppl.wikitext2.s512.w4" in text and " p" in text


def test_every_run_combination_of_views_is_stable(store: Store) -> None:
    """Loading twice gives the same views (the report is a function of the store)."""
    a = [(v.id, v.target, v.bits, v.method, v.lorc, v.granularity) for v in load_views(store)]
    b = [(v.id, v.target, v.bits, v.method, v.lorc, v.granularity) for v in load_views(store)]
    assert a == b and len(a) == len(RUNS)
    assert {(v.target) for v in load_views(store)} == {"FP", "W", "A", "W+A", "KV"}
    assert list(itertools.islice((v.id for v in load_views(store)), 1)) == ["fp"]
    assert make_run("x").id == "x"


def test_a_scheme_whose_overrides_set_weights_is_labelled_mixed():
    """A searched or GGUF-mix run names its base weight spec and how many linears it overrides."""
    from ptqlab.report import describe_scheme

    base = {"format": "gguf_q4_0"}
    over = [{"match": r"model\.layers\.0\.mlp\.down_proj", "weight": {"format": "gguf_q8_0"}},
            {"match": r"model\.layers\.1\.mlp\.down_proj", "weight": {"format": "gguf_q8_0"}}]
    assert describe_scheme({"weight": base}) == "Wgguf_q4_0"
    assert describe_scheme({"weight": base, "overrides": over}) == "Wgguf_q4_0 mixed (2 overrides)"
    assert describe_scheme({"weight": base, "overrides": over[:1]}) == "Wgguf_q4_0 mixed (1 override)"
    assert describe_scheme({"weight": base, "overrides": [{"match": "x", "activation": None}]}) == "Wgguf_q4_0"


def test_a_mixed_weight_run_sits_at_no_bit_width(tmp_path: Path) -> None:
    # a searched allocation with a W4 base and W8 overrides is not a W4 run: no bit-width column, no ZeroQuant
    # row at W4, no finding's pair; its note says it was left out
    mixed = make_run("w4mix", w=weight(4), recipe=("rtn",), d=0.01, bits_weight=5.1, n=len(RUNS),
                     extra=[Metric("kl.wikitext2.s512.w16", 0.01)])
    mixed.config["scheme"]["overrides"] = [{"match": r".*v_proj", "weight": weight(8)}]
    store = build_store(tmp_path / "m.db")
    store.save(mixed)
    views = load_views(store)
    view = next(v for v in views if v.id == "w4mix")
    assert view.mixed_weights and swept_bits(view) is None
    for t in build_tables(views):
        if t.key.startswith(("qllm-", "zq-")):
            assert all("w4mix" not in runs for runs in t.runs), t.key
    div = _table(views, "qllm-divergence")
    assert "1 run with mixed weights" in div.note
    assert _pivot_row(div, "KL wikitext2", "Wb row asym [rtn]")["b=4"] == 0.2  # the uniform W4 run still there
    assert {f.key: f.verdict for f in check_findings(views)} == \
        {f.key: f.verdict for f in check_findings([v for v in views if v.id != "w4mix"])}
