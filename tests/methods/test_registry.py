"""A new method is one class and one registration line: a toy quantizer defined here runs through `ptqlab run`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import yaml

from ptqlab.cli import main
from ptqlab.errors import ConfigError
from ptqlab.methods import RTN, WeightResult, build_recipe, register_method, registered_methods
from ptqlab.methods import recipe as recipe_module
from ptqlab.quant import QuantSpec


@dataclass(frozen=True)
class HalfStepRTN:
    """RTN whose grid is shifted by ``shift`` of a step before rounding (shift 0 is RTN itself)."""

    kind: ClassVar[str] = "quantizer"
    needs_calibration: ClassVar[bool] = False
    permutes_columns: ClassVar[bool] = False  # the capabilities every quantizer declares
    min_tokens: ClassVar[int] = 1
    calls: ClassVar[list[int]] = []
    shift: float = 0.0

    def check_spec(self, spec: QuantSpec) -> None:
        pass

    def quantize(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None) -> WeightResult:
        self.calls.append(W.shape[0])
        base = RTN().quantize(W, spec)
        return base if self.shift == 0 else RTN().quantize(W + self.shift * base.qparams.scale.mean(), spec)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(recipe_module, "_METHODS", dict(recipe_module._METHODS))  # undone after the test
    monkeypatch.setenv("PTQLAB_CACHE", str(tmp_path / "cache"))  # counts the calls: no weights kept before
    register_method("half_step_rtn", HalfStepRTN)
    HalfStepRTN.calls.clear()


def test_a_foreign_method_keys_its_weights_by_its_source(toy) -> None:
    """Weights a user's method made are not reused once its source changes (ptqlab's fingerprint misses it)."""
    from ptqlab.schema import parse_config
    from ptqlab.study.resident import quantized_weights_key

    cfg = parse_config({"model": "m", "scheme": {"weight": {"bits": 4}}, "recipe": [{"half_step_rtn": {}}]})
    own = parse_config({"model": "m", "scheme": {"weight": {"bits": 4}}, "recipe": [{"rtn": {}}]})
    assert recipe_module.foreign_source(["rtn", "gptq"]) == ""
    assert recipe_module.foreign_source(["half_step_rtn"]) != ""
    from ptqlab.store import weights_key

    assert quantized_weights_key(own, "fp") == weights_key(own, "fp")  # ptqlab's own methods: keys as before
    assert quantized_weights_key(cfg, "fp") != weights_key(cfg, "fp")


def _run(tmp_path, capsys, recipe: list[dict], name: str) -> dict:
    cfg = {"model": "stories260k", "scheme": {"weight": {"bits": 4, "granularity": "channel"}}, "recipe": recipe,
           "evaluate": {"perplexity": ["wikitext2"], "seqlen": 128, "max_windows": 2, "sample": None}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--store", str(tmp_path / "s.db"), "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_toy_method_registered_in_one_line_runs_end_to_end(toy, tmp_path, capsys) -> None:
    assert registered_methods()["half_step_rtn"].cls is HalfStepRTN
    toy_run = _run(tmp_path, capsys, [{"half_step_rtn": {}}, {"lorc": {"rank": 2}}], "toy")
    rtn_run = _run(tmp_path, capsys, [{"rtn": {}}, {"lorc": {"rank": 2}}], "rtn")
    assert len(HalfStepRTN.calls) == 5 * 7 == len(toy_run["layers"])  # every linear of stories260k
    assert toy_run["metrics"] == rtn_run["metrics"]  # shift 0 is RTN, and LoRC ran after it the same way
    shifted = _run(tmp_path, capsys, [{"half_step_rtn": {"shift": 0.5}}], "shifted")
    ppl = "ppl.wikitext2.s128.w2"
    assert shifted["metrics"][ppl]["value"] != rtn_run["metrics"][ppl]["value"]  # the option reached the method
    assert build_recipe([{"half_step_rtn": {"shift": 0.5}}]).steps == ["half_step_rtn"]


def test_a_toy_method_gets_the_same_checks(toy) -> None:
    with pytest.raises(ConfigError, match=r"recipe\[0\]\.half_step_rtn\.shfit: unknown option of half_step_rtn"):
        build_recipe([{"half_step_rtn": {"shfit": 1}}])
    with pytest.raises(ConfigError, match="more than one weight quantizer"):
        build_recipe([{"half_step_rtn": {}}, {"gptq": {}}])
    with pytest.raises(ConfigError, match="comes after a compensator"):
        build_recipe([{"lorc": {}}, {"half_step_rtn": {}}])


def test_a_class_without_a_known_kind_is_refused() -> None:
    class NoKind:
        pass

    with pytest.raises(ValueError, match="is not one of"):
        register_method("nokind", NoKind)
    assert "nokind" not in registered_methods()
