"""Issue 30: the report's uncertainty: Wilson intervals, paired accuracy changes at 0 or 1, no "-0", strict JSON."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from protocols_testutil import FP_PIQA, ITEMS, acc, build_two_protocol_store, two_protocol_run
from report_testutil import act, weight

from ptqlab.cli import main
from ptqlab.report import Budget, load_views
from ptqlab.report.recommend import recommend_each
from ptqlab.report.runs import (
    Z95,
    Change,
    fmt_number,
    fmt_signed,
    json_ready,
    paired_proportion_se,
    proportion_se,
    wilson,
)
from ptqlab.store import Store

NEGATIVE_ZERO = re.compile(r"-0(\.0*)?(?![.\d])")  # -0, -0.0, -0.0000, not -0.05


def test_wilson_known_values() -> None:
    lo, hi = wilson(0.0, 10)
    assert lo == 0.0 and hi == pytest.approx(Z95**2 / (10 + Z95**2))  # 0 of n: upper bound z²/(n + z²)
    lo, hi = wilson(1.0, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + Z95**2))
    lo, hi = wilson(0.5, 100)  # close to the normal interval in the middle
    assert (lo, hi) == (pytest.approx(0.5 - 0.0970, abs=2e-3), pytest.approx(0.5 + 0.0970, abs=2e-3))
    assert 0 < proportion_se(0.0, 30) < proportion_se(0.5, 30)
    with pytest.raises(ValueError):
        wilson(0.5, 0)


def test_paired_se_never_collapses() -> None:
    n = ITEMS
    lost_all = paired_proportion_se(gained=0.0, lost=FP_PIQA, n=n)  # the lambada A2 case: every FP hit lost
    assert lost_all == pytest.approx(math.sqrt((FP_PIQA - FP_PIQA**2) / (n - 1)))
    assert paired_proportion_se(0.0, 0.0, n) == pytest.approx(1 / n)  # every item as FP: floored, not 0
    # with discordant items the Wald SE is untouched by the floor
    assert paired_proportion_se(0.03, 0.08, 400) == pytest.approx(math.sqrt((0.11 - 0.05**2) / 399))


def test_zero_accuracy_change_has_an_interval(tmp_path: Path) -> None:
    views = {v.id: v for v in load_views(build_two_protocol_store(tmp_path / "s.db"))}
    v = views["q-w2a2"]  # accuracy 0: lm-eval's stderr is 0, so n comes from the cohort (FP's stderr)
    assert v.stderr["lm_eval.piqa.acc"] == 0.0 and v.items["piqa"] == ITEMS
    c = v.change("lm_eval.piqa.acc")
    assert c is not None and c.delta == pytest.approx(-FP_PIQA)
    assert c.stderr is not None and c.stderr > 0
    lo, hi = c.interval()  # type: ignore[misc]
    assert lo < c.delta < hi and hi - lo == pytest.approx(2 * Z95 * c.stderr)
    same = views["q-w8"].change("lm_eval.piqa.acc")  # every item as FP
    assert same is not None and same.delta == 0 and same.stderr == pytest.approx(1 / ITEMS)
    unpaired = views["q-g4"].change("lm_eval.piqa.acc")  # no lost/gained: the two Wilson SEs combined
    assert unpaired is not None
    assert unpaired.stderr == pytest.approx(math.hypot(proportion_se(0.3, ITEMS), proportion_se(FP_PIQA, ITEMS)))


def test_items_from_the_protocol_limit_when_no_stderr_tells(tmp_path: Path) -> None:
    store = Store(tmp_path / "lim.db")
    store.save(two_protocol_run("fp", "qllm", extra=acc("piqa", 1.0)))  # se 0 too: n unknown from it
    store.save(two_protocol_run("w2", "qllm", w=weight(2), a=act(2), recipe=("rtn",), d=3.0, bits_weight=2.03,
                                extra=acc("piqa", 0.0, lost=1.0, gained=0.0), n=1))
    v = next(v for v in load_views(store) if v.id == "w2")
    assert v.items["piqa"] == 30  # evaluate.limit
    c = v.change("lm_eval.piqa.acc")
    assert c is not None and c.stderr == pytest.approx(1 / 30)  # all lost: Wald SE 0, floored at 1/n


def test_no_item_count_means_no_interval_not_a_zero_width_one(tmp_path: Path) -> None:
    store = Store(tmp_path / "none.db")
    fp = two_protocol_run("fp", "zq", extra=acc("piqa", 1.0, items=None))
    store.save(fp)
    store.save(two_protocol_run("w2", "zq", w=weight(2), recipe=("rtn",), d=3.0, bits_weight=2.03,
                                extra=acc("piqa", 0.0, items=None), n=1))
    v = next(v for v in load_views(store) if v.id == "w2")
    c = v.change("lm_eval.piqa.acc")
    assert c is not None and c.stderr is None and c.interval() is None
    assert "no interval" in c.describe()


def test_change_intervals_follow_one_convention() -> None:
    c = Change(0.5, 0.6, 0.02)
    lo, hi = c.interval()  # type: ignore[misc]
    assert (lo, hi) == (pytest.approx(-0.1 - Z95 * 0.02), pytest.approx(-0.1 + Z95 * 0.02))
    assert Change(1.0, 1.0, 0.0).interval() == (0.0, 0.0)  # exact data only
    assert Change(1.0, 2.0).interval() is None


@pytest.mark.parametrize(("x", "spec", "plain", "signed"), [
    (-0.0, ".4g", "0", "0"), (0.0, ".4g", "0", "0"), (-1e-7, ".4f", "0.0000", "0.0000"),
    (-0.3667, ".4g", "-0.3667", "-0.3667"), (0.05, ".2g", "0.05", "+0.05"), (-0.00004, ".1e", "-4.0e-05", "-4.0e-05"),
    (math.inf, ".4g", "inf", "+inf"), (None, ".4g", "–", "–"),
])
def test_no_negative_zero(x: float | None, spec: str, plain: str, signed: str) -> None:
    assert fmt_number(x, spec) == plain and fmt_signed(x, spec) == signed


def test_describe_and_outputs_write_no_negative_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert Change(0.25, 0.25, 0.0).describe() == "0 [95% 0, 0]"
    store = build_two_protocol_store(tmp_path / "s.db")
    for argv in (["--max-acc-drop", "0.05", "--task", "piqa"], ["--max-acc-drop", "0.5"], ["--max-class", "2"]):
        main(["recommend", "--store", str(store.path), *argv])
        text = capsys.readouterr().out
        assert not NEGATIVE_ZERO.search(text), text
        main(["recommend", "--store", str(store.path), *argv, "--json"])
        out = capsys.readouterr().out
        assert not NEGATIVE_ZERO.search(out), out
        json.loads(out, parse_constant=lambda c: pytest.fail(c))
    main(["compare", "--store", str(store.path), "q-fp", "q-w8", "q-w2a2"])
    assert not NEGATIVE_ZERO.search(capsys.readouterr().out)


def test_recommend_prints_the_zero_accuracy_loss_with_a_real_interval(tmp_path: Path) -> None:
    views = load_views(build_two_protocol_store(tmp_path / "s.db"))
    recs = recommend_each(views, Budget(max_acc_drop=0.05, task="piqa", max_bits=2.5))
    rec = next(r for r in recs if r.nearest and r.nearest[0].view.id == "q-w2a2")
    e = rec.nearest[0].evidence[0]
    assert e.loss == pytest.approx(FP_PIQA) and e.interval is not None
    assert e.interval[0] < e.loss < e.interval[1]  # not [0.3667, 0.3667]
    assert e.to_json()["interval"] == [pytest.approx(e.interval[0]), pytest.approx(e.interval[1])]


def test_json_ready_removes_non_finite_numbers() -> None:
    obj = {"limit": math.inf, "x": [1.0, math.nan, -math.inf], "nested": {"a": (2, math.inf)}, "s": "inf"}
    out = json_ready(obj)
    assert out == {"limit": None, "x": [1.0, None, None], "nested": {"a": [2, None]}, "s": "inf"}
    json.dumps(out, allow_nan=False)
