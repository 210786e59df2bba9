"""SmoothQuant: a transform that keeps the float function, folded as each family adapter describes."""

from __future__ import annotations

import pytest
import torch
from methods_testutil import outlier_model, ulp_sensitivity

from ptqlab.api import quantize
from ptqlab.errors import ConfigError
from ptqlab.methods import build_recipe
from ptqlab.methods.smoothquant import SmoothQuant, SmoothQuantConfig
from ptqlab.testing import TINY_FAMILIES, tiny_model

CAL = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_smoothing_keeps_the_fp_output(family: str) -> None:
    model = outlier_model(family)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    # folding rounds each rescaled weight by at most 2 ulps: 8x the effect of one ulp on every parameter
    # leaves room for the worst alignment of those roundings (qwen3's q/k norms amplify it most: about
    # 40 ulps of its largest logit, 1.3e-5)
    tol = 8 * ulp_sensitivity(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize(model, None, [{"smoothquant": {"alpha": 0.5}}], CAL, progress=False)
    with torch.no_grad():
        out = model(ids).logits
    changed = [k for k, v in model.state_dict().items() if k not in before or not torch.equal(before[k], v)]
    assert changed, "nothing was folded"
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)
    assert tol < 1e-3 * float(ref.abs().max())  # the bound still catches a fold that is wrong


def test_smoothing_makes_activations_easier_to_quantize() -> None:
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    errs = []
    for recipe in ([], [{"smoothquant": {"alpha": 0.5}}]):
        model = outlier_model("llama")
        with torch.no_grad():
            ref = model(ids).logits
        quantize(model, {"weight": {"bits": 8}, "activation": {"bits": 4, "granularity": "token"}},
                 recipe, CAL, progress=False)
        with torch.no_grad():
            errs.append(float((model(ids).logits - ref).norm() / ref.norm()))
    assert errs[1] < errs[0]


def test_scales_follow_the_formula() -> None:
    sq = SmoothQuant(SmoothQuantConfig(alpha=0.75))
    act, w = torch.tensor([4.0, 1.0, 0.0]), torch.tensor([2.0, 0.5, 1.0])
    s = sq.scales(act, w)
    torch.testing.assert_close(s[:2], act[:2] ** 0.75 / w[:2] ** 0.25)
    assert s[2] == 1.0


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        ([{"smoothquant": {"alpha": 1.5}}], r"alpha=1.5 must be in \[0, 1\]"),
        ([{"gptq": {}}, {"smoothquant": {}}], "placed after a quantizer"),
        ([{"lorc": {}}, {"smoothquant": {}}], "placed after a quantizer or compensator"),
    ],
)
def test_bad_recipes(recipe: list, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_recipe(recipe)


def test_transform_without_calibration_fails_before_any_work() -> None:
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize(model, {"weight": {"bits": 8}}, [{"smoothquant": {}}], None, progress=False)


@pytest.mark.parametrize("family", ["gpt2", "opt", "bloom", "gpt_neox", "falcon"])
def test_groups_after_gelu_get_an_explicit_scale(family: str) -> None:
    """Nothing absorbs a scale after GELU/ReLU: a scale op is inserted, exact, and saved in the state dict."""
    from ptqlab.models.registry import get_adapter
    from ptqlab.pipeline.fold import ScaledOutput

    model = outlier_model(family)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    quantize(model, None, [{"smoothquant": {"alpha": 0.5}}, {"awq": {"grid": 5}}], CAL, progress=False)
    fc2 = next(g for g in get_adapter(model).groups if g.name == "fc2")
    scaled = [m for m in model.modules() if isinstance(m, ScaledOutput)]
    assert fc2.fold == "scale" and len(scaled) == model.config.num_hidden_layers
    assert all(not isinstance(m.inner, ScaledOutput) for m in scaled), "a second transform wraps twice"
    assert any(k.endswith(".scale") for k in model.state_dict())
    assert all(not torch.equal(m.scale, torch.ones_like(m.scale)) for m in scaled)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-5)
