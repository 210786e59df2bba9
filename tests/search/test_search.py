"""A search end to end on the real tiny stories260K: ordinary stored runs, a signal measured once, determinism,
the additivity check, the report's figure, and resuming after SIGKILL as a sweep does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ptqlab.cli import main
from ptqlab.metrics import BITS_WEIGHT
from ptqlab.report.build import write_report
from ptqlab.report.search import search_names, search_summary, spearman, summarize
from ptqlab.search import parse_search, plan_search, run_search
from ptqlab.search import signal as signal_module
from ptqlab.search.allocate import read_allocation
from ptqlab.store import KILL_AT_ENV, Store
from ptqlab.study.executors import LocalExecutor

FILE = {
    "name": "tiny",
    "model": "stories260k",
    "evaluate": {"divergence": {"seqlen": 64, "windows": 2}},
    "calibration": {"samples": 4, "seqlen": 64, "batch_size": 4},
    "search": {"menu": [{"bits": 2, "granularity": "channel"}, {"bits": 4, "granularity": "channel"},
                        {"bits": 8, "granularity": "channel"}],
               "budget": {"bits": [3.5, 5.0]}, "validate": 2},
}


class _Counted:
    """Wraps the signal's measurement to count it."""

    def __init__(self) -> None:
        self.calls = 0
        self.inner = signal_module.measure

    def __call__(self, *args: object, **kwargs: object) -> signal_module.Signal:
        self.calls += 1
        return self.inner(*args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PTQLAB_CACHE", str(root / "cache"))
        counter = _Counted()
        mp.setattr(signal_module, "measure", counter)
        search = parse_search(FILE)
        plan = plan_search(search, progress=False)
        store = Store(root / "s.db")
        done = run_search(plan, store, LocalExecutor(progress=False), progress=False)
        yield {"root": root, "search": search, "plan": plan, "store": store, "done": done, "counter": counter,
               "mp": mp}


def test_every_allocation_is_an_ordinary_stored_run_whose_overrides_are_the_allocation(searched) -> None:
    plan, store, done = searched["plan"], searched["store"], searched["done"]
    roles = [r["role"] for a in plan.allocations for r in a.roles]
    assert (roles.count("uniform"), roles.count("rule"), roles.count("searched"), roles.count("validation")) == \
        (3, 1, 3, 4)  # the searched: both budgets and the rule's own
    assert done.computed == len(plan.allocations) and done.failed == 0
    runs = {r.id: r for r in store.list_runs(sweep="tiny")}
    assert set(runs) == {a.run_id for a in plan.allocations}
    assert search_names(store) == ["tiny"]
    for a in plan.allocations:
        record = store.get(a.run_id)
        assert record is not None and record.status == "done"
        assert read_allocation(record.config, plan.units, plan.search.menu) == a.choice
        bits = {m.name: m.value for m in record.metrics}[BITS_WEIGHT]
        assert bits == a.bits  # ptqlab's own size accounting, in the budget and in the stored run
        if any(r["role"] == "uniform" for r in a.roles):  # the signal's uniform quantizations, shared
            assert record.timings.get("qmodel_reused") == 1.0
    for role in plan.role("searched"):
        for r in role.roles:
            if r["role"] == "searched" and not r.get("rule_budget"):
                assert role.bits <= r["budget"]
    assert searched["counter"].calls == 1


def test_the_front_and_the_additivity_check_come_back_from_the_store(searched) -> None:
    summary = search_summary(searched["store"], "tiny")
    assert summary.metric == "kl.wikitext2.s64.w2" and summary.signal == "kl"
    assert [r.budget for r in summary.front][-2:] == [3.5, 5.0]
    assert all(r.searched.kl is not None and r.uniform is not None for r in summary.front)
    add = summary.additivity
    assert add is not None and add.n == 4 and add.spearman is not None and add.mean_abs_error is not None
    base = searched["plan"].signal.offset
    base_run = next(p for p in summary.role("uniform") if p.score == 0.0)
    assert base_run.kl == pytest.approx(base, rel=1e-6)  # the signal's base point is the stored uniform run's KL
    json.dumps(summary.to_json(), allow_nan=False)


def test_a_second_budget_or_solver_measures_no_new_signal_and_runs_only_what_is_new(searched) -> None:
    data = {**FILE, "name": "tiny-2", "search": {**FILE["search"], "budget": {"bits": [3.5, 4.5]},
                                                 "solver": "greedy"}}
    plan = plan_search(parse_search(data), progress=False)
    assert searched["counter"].calls == 1 and not plan.signal_measured
    store = searched["store"]
    new = {a.run_id for a in plan.allocations} - set(store.statuses())
    done = run_search(plan, store, LocalExecutor(progress=False), progress=False)
    assert done.computed == len(new) and done.already == len(plan.allocations) - len(new)


def test_the_same_search_file_gives_the_same_signal_allocations_and_runs(searched, tmp_path: Path) -> None:
    searched["mp"].setenv("PTQLAB_CACHE", str(tmp_path / "fresh"))
    try:
        again = plan_search(parse_search(FILE), progress=False)
    finally:
        searched["mp"].setenv("PTQLAB_CACHE", str(searched["root"] / "cache"))
    first = searched["plan"]
    assert again.signal_measured and searched["counter"].calls == 2
    assert again.signal.values == first.signal.values and again.signal.offset == first.signal.offset
    assert [(a.choice, a.run_id, a.roles) for a in again.allocations] == \
        [(a.choice, a.run_id, a.roles) for a in first.allocations]


def test_dry_run_json_and_the_reports_figure(searched, tmp_path: Path, capsys) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(FILE))
    db = str(searched["store"].path)
    assert main(["--store", db, "search", str(path), "--dry-run", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {r["id"] for r in shown["runs"]} >= {a.run_id for a in searched["plan"].allocations}
    assert all(r["status"] == "done" for r in shown["runs"])
    report = write_report(db, tmp_path / "report")
    figure = next(f for f in report.figures if f.key.startswith("search-tiny"))
    assert figure.png.is_file() and "Spearman" in figure.caption


def test_a_searched_run_exports_one_config_group_per_menu_point(searched, tmp_path: Path) -> None:
    from ptqlab.export.run import export_config
    from ptqlab.study.config import parse_config

    plan, store = searched["plan"], searched["store"]
    chosen = next(a for a in plan.role("searched") if len(set(a.choice)) > 1)
    record = store.get(chosen.run_id)
    result = export_config(parse_config(record.config), "compressed-tensors", tmp_path / "ct", store=store,
                           progress=False)
    assert result.run_id == chosen.run_id
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    bits = {name: g["weights"]["num_bits"] for g in groups.values() for name in g["targets"]}
    menu_bits = [m["bits"] for m in plan.search.menu]
    assert bits == {name: menu_bits[m] for u, m in zip(plan.units.units, chosen.choice, strict=True)
                    for name in u.modules}


def test_a_killed_search_resumes_like_a_sweep(searched, tmp_path: Path, capsys) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(FILE))
    db = tmp_path / "killed.db"
    command = [sys.executable, "-m", "ptqlab.cli", "--store", str(db), "search", str(path), "--quiet"]
    env = {**os.environ, "PTQLAB_CACHE": str(searched["root"] / "cache")}  # the signal is cached: no model work
    killed = subprocess.run(command, env={**env, KILL_AT_ENV: "after:2"}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(Store(db).statuses()) == 2
    assert main(["--store", str(db), "search", str(path), "--quiet"]) == 0  # resumed here, the signal from the cache
    out = capsys.readouterr().out
    total = len(searched["plan"].allocations)
    assert f"computed {total - 2} runs" in out and "2 were done before" in out
    assert set(Store(db).statuses()) == {a.run_id for a in searched["plan"].allocations}


def test_spearman_and_the_error_of_the_sum_on_a_small_case() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / 10**0.5)  # mid-ranks for the tie
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [1, 2]) is None
    entries = {f"v{k}": {"search.roles": [{"role": "validation", "budget": 4.0, "k": k}], "search.score": s,
                         "search.signal": "kl", "search.offset": 0.5, "search.budget_kind": "bits"}
               for k, s in enumerate([0.1, 0.2, 0.4])}
    measured = {"v0": {"kl.x.s8.w1": (0.6, 0.01), BITS_WEIGHT: (4.0, None)},
                "v1": {"kl.x.s8.w1": (0.8, 0.01), BITS_WEIGHT: (4.0, None)},
                "v2": {"kl.x.s8.w1": (0.9, 0.01), BITS_WEIGHT: (4.0, None)}}
    add = summarize("s", entries, measured).additivity
    assert add is not None and add.n == 3 and add.spearman == pytest.approx(1.0)
    assert add.mean_abs_error == pytest.approx((0.0 + 0.1 + 0.0) / 3)
    assert add.bias == pytest.approx(-0.1 / 3)
    proxy = {k: {**v, "search.signal": "hessian", "search.roles": [{"role": "uniform", "menu": 0}]}
             for k, v in entries.items()}
    fitted = summarize("p", proxy, measured)
    scale = (0.1 * 0.6 + 0.2 * 0.8 + 0.4 * 0.9) / (0.01 + 0.04 + 0.16)
    assert fitted.additivity is not None and fitted.additivity.scale == pytest.approx(scale)
    assert fitted.points[0].predicted == pytest.approx(0.1 * scale)
    # entries an earlier signal or solver left under the same name are not summarized with the latest
    keyed = {**{k: {**v, "search.key": "old"} for k, v in entries.items()},
             "u": {**entries["v0"], "search.roles": [{"role": "uniform", "menu": 0}], "search.key": "new"}}
    assert [p.run_id for p in summarize("s", keyed, measured).points] == ["u"]


@pytest.mark.parametrize("kind", ["hessian", "fisher", "error"])
def test_the_proxy_signals_grow_as_the_bits_fall(searched, kind: str) -> None:
    data = {**FILE, "search": {**FILE["search"], "signal": kind, "unit": "layer", "validate": 0}}
    plan = plan_search(parse_search(data), progress=False)
    values = plan.signal.values
    assert len(values) == 5 and plan.signal.offset is None
    for row in values:
        assert row[0] > row[1] > row[2] >= 0.0
    assert plan.role("searched")


def test_a_front_with_measured_costs_is_drawn_against_file_size_and_speed_too(tmp_path: Path) -> None:
    """Runs that measured their GGUF file and speed put them beside bits: one panel each, the values read back."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ptqlab.report.search import _figure

    roles = {"u0": [{"role": "uniform", "menu": 0}], "u1": [{"role": "uniform", "menu": 1}],
             "s": [{"role": "searched", "budget": 5.0}]}
    entries = {k: {"search.roles": r, "search.score": 0.1, "search.signal": "kl", "search.offset": 0.0,
                   "search.budget_kind": "bits"} for k, r in roles.items()}
    cost = {"u0": (4.5, 0.30, 80e6, 60.0), "u1": (8.5, 0.02, 140e6, 40.0), "s": (5.0, 0.10, 90e6, 55.0)}
    measured = {k: {"kl.x.s8.w1": (kl, 0.01), BITS_WEIGHT: (bits, None), "size.file.gguf": (size, None),
                    "speed.llama_cpp.tg128": (tps, 1.0), "speed.torch.tg128": (1.0, 0.1)}
                for k, (bits, kl, size, tps) in cost.items()}
    summary = summarize("s", entries, measured)
    point = {p.run_id: p for p in summary.points}["s"]
    assert (point.file_bytes, point.tps) == (90e6, 55.0)  # llama.cpp's speed before torch's
    assert summary.to_json()["front"][0]["searched"]["file_bytes"] == 90e6

    drawn: dict = {}

    class Cohort:
        views: list = []

        def caption(self, text, shown, kinds, unmeasured):
            drawn["caption"] = text
            return text

        def figure(self, plt_, fig, out, name, title, caption, runs):
            drawn["axes"] = [ax.get_xlabel() for ax in fig.axes]
            plt_.close(fig)
            return name

    _figure(plt, Cohort(), tmp_path, summary)
    assert drawn["axes"][:3] == ["effective bits per decoder-linear weight (bits.weight)", "measured GGUF file, MiB",
                                 "generation speed, tokens/s (measured)"]
    assert len(drawn["axes"]) == 4 and "file's size and the measured generation speed" in drawn["caption"]
    without = {k: {n: v for n, v in m.items() if not n.startswith(("size.file", "speed."))}
               for k, m in measured.items()}
    _figure(plt, Cohort(), tmp_path, summarize("s", entries, without))
    assert len(drawn["axes"]) == 2 and "against bits and" not in drawn["caption"]


def test_the_searched_allocations_prediction_is_checked_where_the_solver_went() -> None:
    entries = {"s": {"search.roles": [{"role": "searched", "budget": 4.5}], "search.score": 0.2,
                     "search.signal": "kl", "search.offset": 0.5, "search.budget_kind": "bits"},
               "u": {"search.roles": [{"role": "uniform", "menu": 0}], "search.score": 0.0,
                     "search.signal": "kl", "search.offset": 0.5, "search.budget_kind": "bits"}}
    measured = {"s": {"kl.x.s8.w1": (1.4, 0.01), BITS_WEIGHT: (4.5, None)},
                "u": {"kl.x.s8.w1": (0.5, 0.01), BITS_WEIGHT: (4.0, None)}}
    summary = summarize("s", entries, measured)
    assert summary.searched_ratios() == [(4.5, pytest.approx(1.4 / 0.7))]  # predicted: the offset plus the sum
    assert summary.to_json()["searched_measured_over_predicted"] == [{"budget": 4.5, "ratio": pytest.approx(2.0)}]
