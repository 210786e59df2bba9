"""Issue 30: runs of different evaluation protocols are never compared, paired, ranked or drawn together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from protocols_testutil import EVALUATE, FP_PIQA, FP_PPL, build_two_protocol_store, ppl_name

from ptqlab.cli import main
from ptqlab.errors import ReportError
from ptqlab.report import Budget, compare_runs, load_views, recommend
from ptqlab.report.recommend import recommend_each
from ptqlab.report.runs import (
    RunView,
    cohorts,
    difference,
    quality,
    quality_difference,
    same_cohort,
)
from ptqlab.report.select import apply_filter, parse_filter
from ptqlab.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return build_two_protocol_store(tmp_path / "two.db")


@pytest.fixture
def views(store: Store) -> dict[str, RunView]:
    return {v.id: v for v in load_views(store)}


def _strict(text: str) -> object:
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))


def test_cohorts_split_by_protocol(views: dict[str, RunView]) -> None:
    groups = cohorts(views.values())
    assert [sorted(v.id.split("-")[0] for v in g) for g in groups.values()] == [["zq"] * 6, ["q"] * 7, ["lone"] * 2]
    assert len({v.cohort_id for v in views.values()}) == 3
    assert same_cohort(views["zq-w4"], views["zq-fp"]) and not same_cohort(views["zq-w4"], views["q-w4"])
    assert views["q-w4"].protocol.corpora == ("wikitext2",) and views["q-w4"].protocol.limit == 30
    assert "30 items" in views["q-w4"].protocol.describe()


def test_quality_is_the_mean_over_the_runs_own_protocol(views: dict[str, RunView]) -> None:
    for v in views.values():
        q = quality(v)
        if q is None:
            continue
        proto = v.id.split("-")[0]
        proto = {"q": "qllm"}.get(proto, proto)
        assert q.corpora == tuple(EVALUATE[proto]["perplexity"])
        fp_mean = sum(FP_PPL[proto].values()) / len(FP_PPL[proto])
        assert q.fp == pytest.approx(fp_mean, rel=1e-2), v.id  # FP of its own protocol, never the other's


def test_fp_baselines_never_cross_cohorts(views: dict[str, RunView]) -> None:
    # no stored windows: the FP values come from the FP run of the same cohort
    assert views["zq-a8"].fp[ppl_name("wikitext2")] == views["zq-fp"].metrics[ppl_name("wikitext2")]
    assert views["q-a8"].fp[ppl_name("wikitext2")] == views["q-fp"].metrics[ppl_name("wikitext2")]
    # the zq FP run's piqa (400 items, 0.6) is another protocol's: q-g4 takes q-fp's
    assert views["q-g4"].fp["lm_eval.piqa.acc"] == pytest.approx(FP_PIQA)
    # a cohort without an FP run gets no baseline from another cohort
    assert views["lone-w4"].change(ppl_name("wikitext2", 4)) is None
    assert ppl_name("wikitext2", 2) not in views["lone-w4"].fp and quality(views["lone-w4"]) is None
    # its run with stored FP windows has its own (exact) baseline
    assert quality(views["lone-w8"]) is not None
    # an FP run is its own baseline, exactly
    assert quality(views["q-fp"]).delta == 0 and quality(views["q-fp"]).stderr == 0  # type: ignore[union-attr]


def test_no_difference_across_cohorts(views: dict[str, RunView]) -> None:
    name = ppl_name("wikitext2")  # the same metric name under both protocols
    assert difference(views["zq-w4"], views["q-w4"], name) is None
    assert quality_difference(views["zq-w4"], views["q-w4"]) is None
    within = difference(views["zq-w4"], views["zq-w3"], name)
    assert within is not None and within.stderr is not None
    qd = quality_difference(views["zq-w4"], views["zq-w3"])
    assert qd is not None and qd.delta == pytest.approx(quality(views["zq-w3"]).value - quality(views["zq-w4"]).value)  # type: ignore[union-attr]


def test_recommend_refuses_several_cohorts_and_names_them(views: dict[str, RunView]) -> None:
    with pytest.raises(ReportError, match="cohort=") as err:
        recommend(list(views.values()), Budget(max_class=1))
    for v in (views["zq-w4"], views["q-w4"]):
        assert f"cohort={v.cohort_id}" in str(err.value)
    assert "wikitext2, ptb_new, c4local_new" in str(err.value) and "30 items" in str(err.value)


@pytest.mark.parametrize("budget", [Budget(max_class=1), Budget(max_ppl_increase=0.02),
                                    Budget(max_class=1, max_bits=3.5), Budget(max_class=3),
                                    Budget(max_acc_drop=0.05, task="piqa")])
def test_recommend_each_ranks_within_one_cohort(views: dict[str, RunView], budget: Budget) -> None:
    recs = recommend_each(list(views.values()), budget)
    assert len({r.cohort for r in recs}) == len(recs)
    for rec in recs:
        named = [c for c in (rec.choice, rec.sure_choice, *rec.nearest) if c is not None]
        assert named and all(c.view.cohort_id == rec.cohort for c in named)
        assert rec.protocol == named[0].view.protocol.describe()
        json.dumps(rec.to_json(), allow_nan=False)  # strict
    if budget.max_acc_drop is not None:
        rec = next(r for r in recs if r.cohort == views["q-w4"].cohort_id)
        assert rec.choice is not None and rec.choice.view.id == "q-w4"  # gained more than it lost
        assert views["lone-w4"].cohort_id not in {r.cohort for r in recs}  # no piqa there


def test_recommend_within_a_chosen_cohort(views: dict[str, RunView]) -> None:
    zq = apply_filter(list(views.values()), parse_filter(f"cohort={views['zq-w4'].cohort_id}"))
    assert {v.id for v in zq} == {v.id for v in views.values() if v.id.startswith("zq-")}
    rec = recommend(zq, Budget(max_class=1))
    assert rec.choice is not None and rec.choice.view.id == "zq-g4"  # 4.5 bits, zq's smallest in class 1
    assert rec.choice.evidence[0].of == "mean ppl over wikitext2, ptb_new, c4local_new"
    q = apply_filter(list(views.values()), parse_filter("protocol.corpora=wikitext2,protocol.limit=30"))
    assert {v.id for v in q} == {v.id for v in views.values() if v.id.startswith("q-")}
    assert apply_filter(list(views.values()), parse_filter(f"protocol={views['q-w4'].protocol.id}")) == q


def test_compare_flags_runs_of_another_cohort(store: Store) -> None:
    cmp = compare_runs(store, ["zq-w4", "zq-w3", "q-w4"])
    assert cmp.comparable == [True, True, False]
    row = next(r for r in cmp.rows if r.metric == ppl_name("wikitext2"))
    assert all(x is not None for x in row.values)  # shown side by side ...
    assert row.diffs[1] is not None and row.paired[1]
    assert row.diffs[2] is None and row.diff_se[2] is None and not row.paired[2]  # ... but never differenced
    out = cmp.to_json()
    assert [r["comparable"] for r in out["runs"]] == [True, True, False]
    json.dumps(out, allow_nan=False)


def test_cli_outputs_are_strict_json_and_name_the_protocol(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--store", str(store.path)]
    assert main(["recommend", *args, "--max-class", "3", "--json"]) == 0  # class 3: no limit
    out = _strict(capsys.readouterr().out)
    assert isinstance(out, dict)
    recs = out["recommendations"]
    assert len(recs) == 3 and all(r["choice"]["evidence"][0]["limit"] is None for r in recs)
    assert len({r["protocol"] for r in recs}) == 3
    assert main(["recommend", *args, "--max-class", "1"]) == 0
    text = capsys.readouterr().out
    assert "3 cohorts" in text and "windows of 512, at most 4 per corpus" in text
    assert "mean ppl over wikitext2, ptb_new, c4local_new" in text and "ppl on wikitext2" in text
    assert main(["compare", *args, "zq-w4", "q-w4", "--json"]) == 0
    assert [r["comparable"] for r in _strict(capsys.readouterr().out)["runs"]] == [True, False]  # type: ignore[index]
    assert main(["compare", *args, "zq-w4", "q-w4"]) == 0
    assert "n/c" in capsys.readouterr().out


def test_tables_findings_and_figures_stay_within_a_cohort(store: Store, tmp_path: Path) -> None:
    from ptqlab.report import write_report

    cohort_of = {v.id: v.cohort for v in load_views(store)}
    report = write_report(store.path, tmp_path / "rep")
    for t in report.tables:
        for runs in t.runs:
            assert len({cohort_of[r] for r in runs}) <= 1, (t.key, runs)
    for f in report.findings:
        for p in f.pairs:
            assert len({cohort_of[r] for r in p.runs}) == 1, (f.key, p.runs)
    for fig in report.figures:
        assert len({cohort_of[r] for r in fig.runs}) <= 1, (fig.key, fig.runs)


def test_ids_that_read_as_numbers_still_match() -> None:
    (clause,) = parse_filter("cohort=12345678")  # YAML reads an all-digit id as an int
    assert clause.value == 12345678 and clause._compare("12345678") and not clause._compare("12345679")
