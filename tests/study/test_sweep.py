"""Sweep files: expansion (grid, zip, exclude, include, --set) and one clear error per bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ptqlab.errors import ConfigError
from ptqlab.study.sweep import check_path, expand, load_sweep, parse_set

BASE = {
    "model": "stories260k",
    "scheme": {"weight": {"bits": 4}},
    "evaluate": {"perplexity": ["wikitext2"], "seqlen": 64, "max_windows": 2, "sensitivity": None, "sample": None},
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_grid_is_a_product_in_file_order() -> None:
    sweep = expand({**BASE, "grid": {"scheme.weight.bits": [8, 4, 3], "recipe": [[{"rtn": {}}], [{"gptq": {}}]]}})
    got = [(r.config.scheme.weight.bits, next(iter(r.config.recipe[0]))) for r in sweep.runs]
    assert got == [(8, "rtn"), (8, "gptq"), (4, "rtn"), (4, "gptq"), (3, "rtn"), (3, "gptq")]
    assert sweep.varied == ["scheme.weight.bits", "recipe"]


def test_zip_varies_together_and_groups_cross() -> None:
    one = expand({**BASE, "zip": {"scheme.weight.granularity": ["channel", "group"],
                                  "scheme.weight.group_size": [None, 32]}})
    assert [(r.config.scheme.weight.granularity, r.config.scheme.weight.group_size) for r in one.runs] == [
        ("channel", None), ("group", 32)]
    two = expand({**BASE, "grid": {"scheme.weight.bits": [8, 4]},
                  "zip": [{"scheme.weight.granularity": ["channel", "group"], "scheme.weight.group_size": [None, 32]},
                          {"scheme.kv_cache.bits": [8, 4]}]})
    assert len(two.runs) == 2 * 2 * 2
    assert {r.config.scheme.kv_cache.bits for r in two.runs} == {8, 4}


def test_exclude_drops_matching_runs_nested_or_dotted() -> None:
    grid = {"scheme.weight.bits": [8, 4], "recipe": [[{"rtn": {}}], [{"gptq": {}}]]}
    dotted = expand({**BASE, "grid": grid, "exclude": [{"scheme.weight.bits": 8, "recipe": [{"gptq": {}}]}]})
    nested = expand({**BASE, "grid": grid, "exclude": [{"scheme": {"weight": {"bits": 8}}, "recipe": [{"gptq": {}}]}]})
    for sweep in (dotted, nested):
        assert len(sweep.runs) == 3 and sweep.excluded == 1
        assert all(not (r.config.scheme.weight.bits == 8 and "gptq" in r.config.recipe[0]) for r in sweep.runs)


def test_duplicates_are_kept_once() -> None:
    sweep = expand({**BASE, "grid": {"scheme.weight.bits": [4, 4, 3]}})
    assert [r.config.scheme.weight.bits for r in sweep.runs] == [4, 3]


def test_include_is_merged_first_and_set_overrides(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", BASE)
    path = _write(tmp_path / "s.yaml", {"include": ["base.yaml"], "name": "mine",
                                        "scheme": {"weight": {"granularity": "group", "group_size": 32}},
                                        "grid": {"scheme.weight.bits": [8, 4]}})
    sweep = load_sweep(path)
    assert sweep.name == "mine"
    assert [(r.config.model, r.config.scheme.weight.group_size) for r in sweep.runs] == [("stories260k", 32)] * 2
    pinned = load_sweep(path, ["scheme.weight.bits=3", "evaluate.max_windows=1"])
    assert [r.config.scheme.weight.bits for r in pinned.runs] == [3]
    assert pinned.runs[0].config.evaluate.max_windows == 1
    assert load_sweep(_write(tmp_path / "plain.yaml", BASE)).name == "plain"


def test_parse_set_reads_yaml_values() -> None:
    assert parse_set("model=./my-model") == ("model", "./my-model")
    assert parse_set("recipe=[{gptq: {}}]") == ("recipe", [{"gptq": {}}])
    assert parse_set("scheme.weight=null") == ("scheme.weight", None)
    with pytest.raises(ConfigError, match="PATH=VALUE"):
        parse_set("model")


def test_check_path_walks_the_schema() -> None:
    for ok in ("scheme.weight.bits", "recipe", "evaluate.divergence.top_k", "calibration.seed",
               "scheme.kv_cache.key.bits", "evaluate.adaptive.confidence"):
        check_path(ok)
    with pytest.raises(ConfigError, match=r"'scheme.wieght.bits' names no config field: scheme has no field 'wieght'"):
        check_path("scheme.wieght.bits")
    with pytest.raises(ConfigError, match="names no config field"):
        check_path("scheme.weight.bits.x")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**BASE, "grdi": {"scheme.weight.bits": [4]}}, "grdi: unknown key"),
        ({**BASE, "grid": {"scheme.weight.bitz": [4]}}, "names no config field"),
        ({**BASE, "grid": {}}, "grid: empty"),
        ({**BASE, "grid": {"scheme.weight.bits": []}}, r"grid.scheme.weight.bits: empty list"),
        ({**BASE, "grid": {"scheme.weight.bits": 4}}, "expected a list"),
        ({**BASE, "zip": {"scheme.weight.bits": [4, 8], "calibration.seed": [1]}}, "equal lengths"),
        ({**BASE, "grid": {"scheme.weight.bits": [4, 1]}}, r"run 1 \(scheme.weight.bits=1\)"),
        ({**BASE, "grid": {"scheme.weight.bits": [4]}, "exclude": [{"scheme.weight.bits": 4}]},
         "every run is excluded"),
        ({**BASE, "exclude": [{"scheme.weight.bitz": 4}]}, "names no config field"),
    ],
)
def test_bad_sweep_files_get_one_clear_error(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        expand(data)


def test_include_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="include: file not found"):
        load_sweep(_write(tmp_path / "a.yaml", {**BASE, "include": ["missing.yaml"]}))
    _write(tmp_path / "b.yaml", {"include": ["c.yaml"]})
    _write(tmp_path / "c.yaml", {"include": ["b.yaml"]})
    with pytest.raises(ConfigError, match="includes itself"):
        load_sweep(tmp_path / "b.yaml")


STUDIES = Path(__file__).resolve().parents[2] / "configs" / "studies"


@pytest.mark.parametrize(("name", "runs"), [("demo", 5), ("zeroquant-v2-quick", 28), ("qllm-eval-quick", 21),
                                             ("qllm-eval", 21)])
def test_built_in_studies_expand(name: str, runs: int) -> None:
    sweep = load_sweep(STUDIES / f"{name}.yaml", [])
    assert sweep.name == name and len(sweep.runs) == runs
