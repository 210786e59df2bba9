"""Search files are checked before any work: the section's keys, the base configuration, the budgets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ptqlab.cli import main
from ptqlab.errors import ConfigError
from ptqlab.search import parse_search, plan_search
from ptqlab.search import signal as signal_module

MENU = [{"bits": 2, "granularity": "channel"}, {"bits": 4, "granularity": "channel"},
        {"bits": 8, "granularity": "channel"}]
BASE = {"model": "stories260k", "evaluate": {"divergence": {"seqlen": 64, "windows": 2}},
        "calibration": {"samples": 4, "seqlen": 64, "batch_size": 4}}


def _file(**section: object) -> dict:
    return {**BASE, "search": {"menu": MENU, "budget": {"bits": [4.0]}, **section}}


@pytest.mark.parametrize(("data", "message"), [
    ({**BASE, "search": {"menu": MENU, "budget": {"bits": [4.0]}, "sigal": "kl"}}, "search.sigal: unknown key"),
    (_file(menu=MENU[:1]), "at least two weight specs"),
    (_file(budget={"bits": [4.0], "bytes": [1e6]}), "exactly one of bits or bytes"),
    (_file(budget={"bits": []}), "empty list"),
    (_file(signal="hutchinson"), "search.signal"),
    (_file(menu=[*MENU, {"bits": 4, "granularity": "channel"}]), "listed twice"),
    (_file(menu=[{"bits": 9}, {"bits": 4}]), "search.menu[0]"),
    (_file(rule=2), "rule moves some projections one menu type up"),
    ({**_file(), "scheme": {"weight": {"bits": 4}}}, "scheme.weight: a search writes"),
    ({**_file(), "scheme": {"activation": {"bits": 8}}}, "scheme.activation"),
    ({**_file(), "evaluate": {"perplexity": ["wikitext2"]}}, "evaluate.divergence"),
    ({**_file(), "recipe": [{"smoothquant": {}}]}, "transform"),
    ({**_file(), "grid": {"scheme.weight.bits": [4]}}, "grid: unknown key"),
])
def test_a_bad_search_file_is_one_error_naming_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_search(data)


def test_the_default_name_says_the_signal_and_the_solver() -> None:
    assert parse_search(_file(), default_name="f").name == "f-kl"
    assert parse_search(_file(signal="fisher", solver="greedy"), default_name="f").name == "f-fisher-greedy"
    assert parse_search({**_file(), "name": "mine"}).name == "mine"


@pytest.mark.parametrize(("budget", "where"), [(1.5, "below the cheapest"), (9.0, "above the dearest")])
def test_a_budget_outside_the_menu_is_an_error_before_any_work(tmp_path: Path, monkeypatch, capsys, budget: float,
                                                               where: str) -> None:
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the signal was measured")

    monkeypatch.setattr(signal_module, "measure", no_work)
    search = parse_search(_file(budget={"bits": [4.0, budget]}))
    with pytest.raises(ConfigError, match=rf"search.budget.bits: {budget:g} is {where} .* feasible range is 2.2383"):
        plan_search(search, progress=False)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_file(budget={"bits": [budget]})))
    db = tmp_path / "s.db"
    assert main(["--store", str(db), "search", str(path), "--quiet"]) == 2
    assert "feasible range" in capsys.readouterr().err
    assert not db.exists()
    assert not (tmp_path / "cache" / "search").exists() and not (tmp_path / "cache" / "qmodels").exists()


def test_a_block_type_that_does_not_fit_a_width_names_the_module() -> None:
    search = parse_search(_file(menu=[{"format": "gguf_q4_0"}, {"format": "gguf_q8_0"}], budget={"bits": [5.0]}))
    with pytest.raises(ConfigError, match=r"search.menu\[0\].format='gguf_q4_0'.*down_proj"):
        plan_search(search, measure=False, progress=False)
