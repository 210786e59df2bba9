"""Every method declares its kind's capabilities (methods/kinds.py), with the right types and values."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from ptqlab.methods import (
    GPTQ,
    RTN,
    GPTQConfig,
    ResidualRotation,
    RotationConfig,
    build_recipe,
    register_method,
    registered_methods,
)
from ptqlab.methods import recipe as recipe_module
from ptqlab.methods.base import WeightResult
from ptqlab.methods.kinds import KINDS, PROTOCOLS, protocol_members
from ptqlab.models.registry import get_adapter
from ptqlab.pipeline.driver import _quantizer_for
from ptqlab.quant.spec import QuantSpec
from ptqlab.testing import tiny_model

CAPABILITIES = {"model_transform": {"runtime_hooks": bool, "rotates_cached_keys": bool},
                "quantizer": {"permutes_columns": bool, "min_tokens": int}}


def _steps() -> list[tuple[str, Any]]:
    """Every registered method with its default options, and the quantizers transforms bring (AWQ's clipping)."""
    out: list[tuple[str, Any]] = []
    for name in sorted(registered_methods()):
        recipe = build_recipe([{name: {}}])
        steps = [recipe.quantizer, *recipe.model_transforms, *recipe.layer_transforms, *recipe.layer_refiners,
                 *recipe.model_refiners, *recipe.compensators]
        out += [(f"{name}:{type(s).__name__}", s) for s in steps]
    return out


@pytest.mark.parametrize(("name", "step"), _steps(), ids=[n for n, _ in _steps()])
def test_every_method_declares_its_kinds_members_with_the_right_types(name: str, step: Any) -> None:
    assert step.kind in KINDS, name
    for member in protocol_members(step.kind):
        assert hasattr(step, member), f"{name} lacks {member}"
    for member, typ in CAPABILITIES.get(step.kind, {}).items():
        value = getattr(step, member)
        assert type(value) is typ, f"{name}.{member} = {value!r}"
    if step.kind == "quantizer":
        assert step.min_tokens >= 1


def test_the_protocols_list_the_capabilities() -> None:
    assert set(PROTOCOLS) == set(KINDS)
    for kind, capabilities in CAPABILITIES.items():
        assert set(capabilities) <= set(protocol_members(kind)), kind
    assert protocol_members("quantizer") == ("check_spec", "kind", "min_tokens", "needs_calibration",
                                             "permutes_columns", "quantize")


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("min_tokens", [1, 20])
def test_gptq_declares_its_column_order_and_minimum_tokens_from_its_options(act_order: bool, min_tokens: int) -> None:
    gptq = build_recipe([{"gptq": {"act_order": act_order, "min_tokens": min_tokens}}]).quantizer
    assert isinstance(gptq, GPTQ)
    assert gptq.permutes_columns is act_order
    assert gptq.min_tokens == min_tokens


def test_data_free_and_default_quantizers_keep_columns_in_place() -> None:
    for recipe in ([{"rtn": {}}], [], [{"squeezellm": {}}], [{"awq": {}}]):
        quantizer = build_recipe(recipe).quantizer
        assert quantizer.permutes_columns is False and quantizer.min_tokens == 1, recipe


@pytest.mark.parametrize("online_down", [False, True])
def test_rotation_declares_the_hooks_it_installs(online_down: bool) -> None:
    (rotation,) = build_recipe([{"rotation": {"online_down": online_down}}]).model_transforms
    assert isinstance(rotation, ResidualRotation)
    assert rotation.runtime_hooks is online_down
    model = tiny_model("llama").eval()
    handles = ResidualRotation(RotationConfig(online_down=online_down)).apply(model, get_adapter(model))
    try:
        assert bool(handles) is online_down  # the declaration says what apply does
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(("tokens", "fallback"), [(0, "rtn"), (19, "rtn"), (20, None), (64, None)])
def test_the_driver_reads_min_tokens(tokens: int, fallback: str | None) -> None:
    gptq = GPTQ(GPTQConfig(min_tokens=20))
    quantizer, name = _quantizer_for(gptq, tokens)
    assert name == fallback
    assert quantizer is gptq if fallback is None else isinstance(quantizer, RTN)


class _Undeclared:
    """A quantizer that declares its kind but none of the quantizer's capabilities."""

    kind: ClassVar[str] = "quantizer"
    needs_calibration: ClassVar[bool] = False

    def quantize(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None) -> WeightResult:
        return RTN().quantize(W, spec)


def test_a_method_that_does_not_declare_its_capabilities_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recipe_module, "_METHODS", dict(recipe_module._METHODS))  # undone after the test
    with pytest.raises(ValueError, match=r"_Undeclared \(kind quantizer\) does not declare check_spec, min_tokens, "
                                         r"permutes_columns"):
        register_method("undeclared", _Undeclared)
    assert "undeclared" not in registered_methods()
