"""The export checks read the capabilities a method declares, not the options of one method they know by name."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from ptqlab.errors import ConfigError
from ptqlab.formats.common import refuse_off_grid_recipe, refuse_runtime_ops
from ptqlab.methods import RTN, Recipe, ResidualRotation, RotationConfig, WeightResult
from ptqlab.models.adapter import Adapter
from ptqlab.models.registry import get_adapter
from ptqlab.pipeline.plan import QuantizationPlan
from ptqlab.quant.spec import QuantSpec
from ptqlab.testing import tiny_model


class _ColumnOrder:
    """A quantizer (not GPTQ) that says it quantizes columns in an order of its own."""

    kind: ClassVar[str] = "quantizer"
    needs_calibration: ClassVar[bool] = False
    permutes_columns: ClassVar[bool] = True
    min_tokens: ClassVar[int] = 1

    def check_spec(self, spec: QuantSpec) -> None:
        pass

    def quantize(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None) -> WeightResult:
        return RTN().quantize(W, spec)


class _Hooked:
    """A model transform (not the rotation) that says it installs forward hooks."""

    kind: ClassVar[str] = "model_transform"
    needs_calibration: ClassVar[bool] = False
    rotates_cached_keys: ClassVar[bool] = False
    runtime_hooks: ClassVar[bool] = True

    def check(self, model: torch.nn.Module, adapter: Adapter) -> None:
        pass

    def apply(self, model: torch.nn.Module, adapter: Adapter) -> list[Any]:
        return []


def _plan(recipe: Recipe) -> QuantizationPlan:
    return QuantizationPlan(adapter=get_adapter(tiny_model("llama")), targets=[], recipe=recipe)


def test_a_quantizer_that_permutes_columns_is_refused_by_packed_formats() -> None:
    with pytest.raises(ConfigError, match="g_idx"):
        refuse_off_grid_recipe(_plan(Recipe(quantizer=_ColumnOrder())), "gguf_q4_0", "llama.cpp")
    refuse_off_grid_recipe(_plan(Recipe(quantizer=RTN())), "gguf_q4_0", "llama.cpp")  # nothing to refuse


@pytest.mark.parametrize("transform", [_Hooked(), ResidualRotation(RotationConfig(online_down=True))])
def test_a_transform_with_runtime_hooks_is_refused(transform: Any) -> None:
    with pytest.raises(ConfigError, match="forward hook that vllm does not run"):
        refuse_runtime_ops(_plan(Recipe(model_transforms=(transform,))), "vllm")


def test_a_rotation_without_online_hooks_passes() -> None:
    refuse_runtime_ops(_plan(Recipe(model_transforms=(ResidualRotation(RotationConfig(online_down=False)),))), "vllm")
