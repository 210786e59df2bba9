"""AWQ: the scale search keeps the float function and lowers the quantized error; the clipping search."""

from __future__ import annotations

import pytest
import torch
from methods_testutil import outlier_model

from ptqlab.api import quantize
from ptqlab.methods import Recipe, build_recipe
from ptqlab.methods.awq import AWQClip, AWQConfig, AWQScale
from ptqlab.methods.base import WeightResult, relative_output_error
from ptqlab.methods.rtn import RTN
from ptqlab.models.registry import get_adapter
from ptqlab.pipeline.plan import QuantizationPlan, plan_weights
from ptqlab.pipeline.quantize import quantize as run_plan
from ptqlab.quant import QuantSpec
from ptqlab.testing import TINY_FAMILIES

CAL = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(7))
IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))


class _KeepWeights:
    """A quantizer that changes nothing: isolates what the transforms did."""

    kind = "quantizer"
    needs_calibration = True
    permutes_columns = False
    min_tokens = 1

    def quantize(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None) -> WeightResult:
        return WeightResult(W.float(), W.float(), RTN().quantize(W, spec).qparams)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_awq_scaling_keeps_the_fp_output(family: str) -> None:
    model = outlier_model(family, 5, 6.0)
    with torch.no_grad():
        ref = model(IDS).logits
    adapter = get_adapter(model)
    targets = plan_weights(model, adapter, {"bits": 3, "granularity": "channel"})
    recipe = Recipe(quantizer=_KeepWeights(), layer_transforms=(AWQScale(AWQConfig(grid=10)),), steps=["awq"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = QuantizationPlan(adapter=adapter, targets=targets, recipe=recipe, calibration=CAL)
    run_plan(model, plan, progress=False)
    changed = [k for k, v in model.state_dict().items() if k not in before or not torch.equal(before[k], v)]
    assert changed, "no scale was folded"
    with torch.no_grad():
        out = model(IDS).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_awq_beats_rtn_on_outlier_channels() -> None:
    errs = {}
    for name, recipe in (("rtn", [{"rtn": {}}]), ("awq", [{"awq": {}}])):
        model = outlier_model("llama", 5, 6.0)
        with torch.no_grad():
            ref = model(IDS).logits
        quantize(model, {"weight": {"bits": 3, "granularity": "group", "group_size": 16}}, recipe, CAL, progress=False)
        with torch.no_grad():
            errs[name] = float((model(IDS).logits - ref).norm() / ref.norm())
    assert errs["awq"] < errs["rtn"]


def test_clip_search_never_worse_than_minmax_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 8, generator=g) @ torch.randn(8, 48, generator=g) + 0.1 * torch.randn(256, 48, generator=g)
    H = 2 * X.T @ X / 256
    W = torch.randn(16, 48, generator=g)
    W[:, 3] = 6.0
    spec = QuantSpec(bits=3, granularity="channel")
    clipped = AWQClip().quantize(W, spec, H)
    plain = RTN().quantize(W, spec)
    for r in range(16):
        e_clip = relative_output_error(W[r : r + 1], clipped.weight[r : r + 1], H)
        e_rtn = relative_output_error(W[r : r + 1], plain.weight[r : r + 1], H)
        assert e_clip <= e_rtn + 1e-7


def test_awq_recipe_is_scales_then_clipping() -> None:
    recipe = build_recipe([{"awq": {"grid": 4}}])
    assert recipe.steps == ["awq"] and isinstance(recipe.quantizer, AWQClip)
    with_gptq = build_recipe([{"awq": {}}, {"gptq": {}}, {"lorc": {"rank": 2}}])
    assert with_gptq.steps == ["awq", "gptq", "lorc"] and type(with_gptq.quantizer).__name__ == "GPTQ"
