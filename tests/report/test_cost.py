"""Issue 31: the measured file size and speed of each run beside its quality, within its cohort only."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from protocols_testutil import RUNS, build_two_protocol_store

from ptqlab.cli import main
from ptqlab.metrics import Metric, file_size_name, speed_name
from ptqlab.report import Budget, load_views, write_report
from ptqlab.report.cost import MIB, generation_speed, run_size, speed_metric
from ptqlab.report.plots import cost_panels, draw_figures, pareto_front
from ptqlab.report.recommend import Recommendation, recommend_each
from ptqlab.report.render import to_latex, to_markdown
from ptqlab.report.runs import RunView, difference
from ptqlab.report.table import Table
from ptqlab.report.tables import build_tables
from ptqlab.store import Store

TG, PP, GGUF = speed_name("llama_cpp", "tg", 128), speed_name("llama_cpp", "pp", 512), file_size_name("gguf")
TORCH_TG = speed_name("torch", "tg", 128)


def cost(mib: float | None = None, tg: tuple[float, float] | None = None, pp: tuple[float, float] | None = None,
         torch_tg: tuple[float, float] | None = None) -> list[Metric]:
    out = [] if mib is None else [Metric(GGUF, mib * MIB)]
    out += [Metric(name, *v) for name, v in ((TG, tg), (PP, pp), (TORCH_TG, torch_tg)) if v is not None]
    return out


COSTS: dict[str, list[Metric]] = {
    "zq-fp": cost(64, (20.0, 0.5), (400.0, 4.0)),
    "zq-w8": cost(34, (30.0, 0.5)),
    "zq-w4": cost(18, (45.0, 1.0), torch_tg=(5.0, 0.1)),  # timed in two runtimes: llama.cpp's is the one used
    "zq-g4": cost(20, (46.0, 1.0)),  # faster and better than zq-w4, larger
    "zq-w3": cost(14),  # a file, no speed
    # zq-a8: nothing measured
    "q-fp": cost(64, (21.0, 0.5)),
    "q-w4": cost(18, (1000.0, 2.0)),  # another protocol's run: never on the zq cohort's tables or fronts
}


def _with_costs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "extra": [*(r.get("extra") or []), *COSTS.get(r["rid"], [])]} for r in runs]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return build_two_protocol_store(tmp_path / "cost.db", _with_costs(RUNS))


@pytest.fixture
def views(store: Store) -> dict[str, RunView]:
    return {v.id: v for v in load_views(store)}


def _strict(text: str) -> Any:
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))


def _table(tables: list[Table], key: str) -> Table:
    return next(t for t in tables if t.key == key)


def _column(t: Table, name: str) -> dict[str, Any]:
    """``{run id: cell}`` of a column of a table with one run per row."""
    i = t.columns.index(name)
    return {runs[0]: row[i] for row, runs in zip(t.rows, t.runs, strict=True)}


# ---- reading the metrics -------------------------------------------------------------------------------------


def test_speed_names_read_back() -> None:
    s = speed_metric(TG)
    assert s is not None and (s.runtime, s.kind, s.tokens) == ("llama_cpp", "tg", 128)
    assert s.header == "llama.cpp tg128 t/s"
    assert speed_metric(GGUF) is None and speed_metric("speed.llama_cpp.xx9") is None


def test_size_prefers_the_measured_file(views: dict[str, RunView]) -> None:
    size = run_size(views["zq-w4"])
    assert size is not None and size.measured and size.bytes == 18 * MIB and size.source == "measured GGUF file"
    estimate = run_size(views["zq-a8"])
    assert estimate is not None and not estimate.measured and estimate.source == "estimated from effective bits"
    assert estimate.bytes == views["zq-a8"].size_bytes
    assert run_size(views["zq-a8"], measured_only=True) is None


def test_generation_speed_prefers_llama_cpp(views: dict[str, RunView]) -> None:
    s = generation_speed(views["zq-w4"])
    assert s is not None and s.metric.name == TG and s.value == 45.0 and s.half_width == pytest.approx(1.96)
    assert generation_speed(views["zq-w3"]) is None


# ---- tables --------------------------------------------------------------------------------------------------


def test_cost_columns_only_where_measured(views: dict[str, RunView]) -> None:
    tables = build_tables(list(views.values()))
    weight = _table(tables, "zq-weight-p1")
    assert "file MiB" in weight.columns and "llama.cpp tg128 t/s" in weight.columns
    assert "llama.cpp pp512 t/s" not in weight.columns  # only the FP run has a prompt speed: not in this table
    assert "torch tg128 t/s" in weight.columns  # zq-w4 was timed in torch too
    # the activation-only table's run measured nothing: no cost column
    assert not any("MiB" in c or "t/s" in c for c in _table(tables, "zq-activation-p1").columns)
    rows = {tuple(r[:3]): r for r in weight.rows}
    w4 = dict(zip(weight.columns, rows[(4, "row", "asym")], strict=True))
    assert w4["file MiB"] == 18.0 and w4["llama.cpp tg128 t/s"] == 45.0
    assert w4["± se llama.cpp tg128"] == 1.0  # the same convention as every cell: ± its standard error
    w3 = dict(zip(weight.columns, rows[(3, "row", "asym")], strict=True))
    assert w3["file MiB"] == 14.0 and w3["llama.cpp tg128 t/s"] is None
    assert "± its standard error" in weight.caption


def test_cost_columns_render(views: dict[str, RunView]) -> None:
    weight = _table(build_tables(list(views.values())), "zq-weight-p1")
    md = to_markdown(weight)
    assert "| file MiB |" in md and "llama.cpp tg128 t/s" in md and "45.0 ± 1.0" in md and "± se" not in md
    tex = to_latex(weight)
    assert r"$45.0 \pm 1.0$" in tex and "file MiB" in tex


def test_cost_table_per_protocol(views: dict[str, RunView]) -> None:
    tables = build_tables(list(views.values()))
    zq, q = _table(tables, "cost-p1"), _table(tables, "cost-p2")
    ids = [r[0] for r in zq.runs]
    assert set(ids) == {"zq-fp", "zq-w8", "zq-w4", "zq-g4", "zq-w3"}  # zq-a8 measured nothing
    assert ids[0] == "zq-w3" and ids[-1] == "zq-fp"  # by size
    assert _column(zq, "llama.cpp pp512 t/s")["zq-fp"] == 400.0 and _column(zq, "file MiB")["zq-g4"] == 20.0
    assert _column(zq, "est. MiB")["zq-w4"] == pytest.approx(views["zq-w4"].size_bytes / MIB)  # type: ignore[operator]
    assert {r[0] for r in q.runs} == {"q-fp", "q-w4"}  # never a run of another protocol
    assert "torch tg128 t/s" not in q.columns
    assert not any(t.key.startswith("cost") for t in tables if t.section == 3)  # the lone protocol measured none


def test_no_cost_columns_without_costs(tmp_path: Path) -> None:
    tables = build_tables(load_views(build_two_protocol_store(tmp_path / "plain.db")))
    assert not any(t.key.startswith("cost") for t in tables)
    assert not any("MiB" in c or "t/s" in c for t in tables for c in t.columns)


# ---- the Pareto front ----------------------------------------------------------------------------------------


def test_pareto_front_with_ties() -> None:
    pts = [(1.0, 1.0), (2.0, 0.5), (1.0, 1.0), (2.0, 1.0), (3.0, 0.5), (0.5, 3.0), (4.0, 0.1)]
    # equal points do not beat each other: both on the front; (2, 1) and (3, 0.5) are beaten
    assert pareto_front(pts) == [5, 0, 2, 1, 6]
    # faster is better: negate the speed
    speeds = [(30.0, 0.1), (45.0, 2.0), (46.0, 0.05), (20.0, 0.0), (46.0, 0.05)]
    assert sorted(pareto_front([(-x, y) for x, y in speeds])) == [2, 3, 4]  # 30 t/s: slower and worse than 46
    assert pareto_front([]) == []


def test_pareto_front_is_the_non_dominated_set() -> None:
    rng = random.Random(1)
    for _ in range(50):
        pts = [(rng.choice([1.0, 2.0, 3.0]), rng.choice([0.0, 0.1, 0.5])) for _ in range(10)]
        brute = {i for i, p in enumerate(pts)
                 if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts)}
        assert set(pareto_front(pts)) == brute


def test_cost_fronts_per_cohort(views: dict[str, RunView]) -> None:
    zq = [v for v in views.values() if v.id.startswith("zq-")]
    size, speed = cost_panels(zq)
    assert size.name == "size" and "measured" in size.axis
    assert {p.view.id for p in size.points} == {"zq-fp", "zq-w8", "zq-w4", "zq-g4", "zq-w3"}
    assert size.front_runs == ["zq-w3", "zq-w4", "zq-g4", "zq-w8", "zq-fp"]
    assert speed.axis == "generation speed, llama.cpp tg128 (tokens/s)"
    assert speed.front_runs == ["zq-g4", "zq-w8", "zq-fp"]  # zq-w4: slower and worse than zq-g4
    assert speed.points[[p.view.id for p in speed.points].index("zq-w4")].x == 45.0  # llama.cpp's, not torch's


def test_cost_figure_falls_back_to_the_estimate_and_needs_two_runs(views: dict[str, RunView]) -> None:
    q = [views["q-fp"], views["q-w4"], views["q-w8"]]
    for v in q:
        v.metrics.pop(GGUF, None)
    size, speed = cost_panels(q)
    assert "estimated" in size.axis and len(size.points) == 3 and len(speed.points) == 2
    assert cost_panels([views["zq-w4"], views["zq-a8"]]) == []  # one measured run
    assert cost_panels([views["zq-a8"], views["q-w8"]]) == []  # none measured


def test_cost_figures(views: dict[str, RunView], tmp_path: Path) -> None:
    figures = {f.key: f for f in draw_figures(list(views.values()), [], tmp_path)}
    zq, q = figures["pareto-cost-p1"], figures["pareto-cost-p2"]
    assert set(zq.runs) == {"zq-fp", "zq-w8", "zq-w4", "zq-g4", "zq-w3"} and set(q.runs) == {"q-fp", "q-w4"}
    assert "against measured GGUF file size (MiB): smaller and better is down and to the left" in zq.caption
    assert "generation speed, llama.cpp tg128 (tokens/s): faster and better is down and to the right" in zq.caption
    assert "2 runs with a quality but no speed measurement" in zq.caption  # zq-w3, zq-a8
    assert "1 run with a quality but no size measurement" in zq.caption  # zq-a8
    assert "Protocol:" in zq.caption and zq.png.is_file() and zq.svg.is_file()
    assert "pareto-cost-p3" not in figures


# ---- recommend -----------------------------------------------------------------------------------------------


def _by_cohort(recs: list[Recommendation], views: dict[str, RunView], rid: str) -> Recommendation:
    return next(r for r in recs if r.cohort == views[rid].cohort_id)


def test_min_tps_leaves_out_slow_and_unmeasured_runs(views: dict[str, RunView]) -> None:
    recs = recommend_each(list(views.values()), Budget(max_ppl_increase=0.1, min_tps=40))
    zq = _by_cohort(recs, views, "zq-fp")
    assert zq.choice is not None and zq.choice.view.id == "zq-g4"  # zq-w8 (smaller loss) is too slow
    assert zq.left_out == {"speed": 2}  # zq-w3, zq-a8
    q = _by_cohort(recs, views, "q-fp")
    assert q.choice is not None and q.choice.view.id == "q-w4"
    assert q.left_out == {"speed": 5}
    # nothing in the zq cohort is that fast: q-w4's 1000 t/s never answers for it
    zq = _by_cohort(recommend_each(list(views.values()), Budget(max_class=3, min_tps=500)), views, "zq-fp")
    assert zq.choice is None and all(c.view.id.startswith("zq-") for c in zq.nearest)


def test_max_bytes_uses_the_measured_file(views: dict[str, RunView]) -> None:
    # zq-w4's estimate (23.1 MiB) is over the bound, its measured file (18 MiB) within it
    budget = Budget(max_ppl_increase=5, max_bytes=19 * MIB)
    zq = _by_cohort(recommend_each(list(views.values()), budget), views, "zq-fp")
    assert zq.choice is not None and zq.choice.view.id == "zq-w4"
    assert zq.choice.to_json()["size"] == {"bytes": 18 * MIB, "source": "measured GGUF file", "metric": GGUF}
    assert zq.ranked_by == "measured GGUF file" and zq.left_out == {"size": 0}
    # a fitting run without a file: the candidates are ranked by the estimate, and its size says so
    zq = _by_cohort(recommend_each(list(views.values()), Budget(max_ppl_increase=0.1, max_bytes=100 * MIB)),
                    views, "zq-fp")
    assert zq.ranked_by == "estimated from effective bits"


def test_cli_recommend_json_is_strict(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["recommend", "--store", str(store.path), "--max-ppl-increase", "0.1", "--min-tps", "40"]
    assert main([*args, "--json"]) == 0
    out = _strict(capsys.readouterr().out)
    assert "generation >= 40 tokens/s" in out["budget"]
    zq = next(r for r in out["recommendations"] if r["choice"] and r["choice"]["id"] == "zq-g4")
    assert zq["left_out_unmeasured"] == {"speed": 2} and zq["ranked_by"] == "size: measured GGUF file"
    assert zq["choice"]["speed"]["metric"] == TG and zq["choice"]["speed"]["tokens_per_s"] == 46.0
    assert zq["choice"]["speed"]["interval"] == pytest.approx([46 - 1.96, 46 + 1.96])
    assert zq["choice"]["size"]["source"] == "measured GGUF file"
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "2 runs left out: no generation speed measured" in text
    assert "20.0 MiB (measured GGUF file), llama.cpp tg128 46 ± 2 tokens/s" in text


def test_cli_recommend_says_the_estimate(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--store", str(store.path), "--max-ppl-increase", "0.1", "--max-bytes", "1e9",
                 "--where", "id=zq-a8"]) == 0
    text = capsys.readouterr().out
    assert "(estimated from effective bits), no generation speed measured" in text


# ---- compare and the report ----------------------------------------------------------------------------------


def test_cost_differences_pair_the_runs_own_errors(views: dict[str, RunView]) -> None:
    d = difference(views["zq-w4"], views["zq-g4"], TG)
    assert d is not None and d.delta == 1.0 and d.stderr == pytest.approx(math.hypot(1.0, 1.0))
    assert difference(views["zq-w4"], views["q-w4"], TG) is None  # across protocols: never


def test_cli_compare_shows_costs(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--store", str(store.path), "zq-w4", "zq-g4", "q-w4", "--metric", "s*"]) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.startswith(f"{TG} (t/s)"))
    assert "+1 ± 2.8" in line and "n/c" in line
    line = next(x for x in text.splitlines() if x.startswith(f"{GGUF} (MiB)"))
    assert line.split()[2:4] == ["18", "20"]
    assert main(["compare", "--store", str(store.path), "zq-w4", "zq-g4", "--metric", "speed.*", "--json"]) == 0
    rows = {r["metric"]: r for r in _strict(capsys.readouterr().out)["rows"]}
    assert rows[TG]["diff_se"][1] == pytest.approx(math.hypot(1.0, 1.0))


def test_report_with_costs(store: Store, tmp_path: Path) -> None:
    report = write_report(store.path, tmp_path / "rep")
    assert (report.out / "tables" / "cost-p1.md").is_file() and (report.out / "tables" / "cost-p1.tex").is_file()
    assert "pareto-cost-p1" in {f.key for f in report.figures}
    page = report.index.read_text()
    assert "<th>file MiB</th>" in page and "<th>generation t/s</th>" in page
    assert page.count('id="cost-p1"') == 1 and page.count('id="pareto-cost-p1"') == 1
    csv = (report.out / "tables" / "zq-weight-p1.csv").read_text()
    assert "± se llama.cpp tg128" in csv.splitlines()[0]


def test_speed_settings_name_the_cpu_and_say_when_runs_differ(views: dict[str, RunView]) -> None:
    """A caption names the CPU model the speeds were measured on; runs timed on two CPUs are said to differ."""
    import dataclasses

    from ptqlab.report.cost import speed_settings

    timed = [views["zq-fp"], views["zq-w8"]]
    on = [dataclasses.replace(v, record=dataclasses.replace(v.record, machine={"cpu": cpu}))
          for v, cpu in zip(timed, ("CPU A", "CPU A"), strict=True)]
    assert speed_settings(on) == "Speeds measured on CPU A."
    on[1] = dataclasses.replace(on[1], record=dataclasses.replace(on[1].record, machine={"cpu": "CPU B"}))
    caption = speed_settings(on)
    assert "different settings" in caption and "CPU A" in caption and "CPU B" in caption
    assert "CPU" not in speed_settings(timed)  # runs stored before machines were recorded: no CPU to name
