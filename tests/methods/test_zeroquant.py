"""ZeroQuant-Local / -Global: layer-wise and model-level distillation of the quantized weights."""

from __future__ import annotations

import pytest
import torch

from ptqlab.api import quantize
from ptqlab.errors import ConfigError
from ptqlab.methods import build_recipe
from ptqlab.testing import tiny_model

CAL = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(3))
SCHEME = {"weight": {"bits": 3, "granularity": "group", "group_size": 16}}


@pytest.mark.parametrize("start", ["rtn", "gptq"])
def test_local_lowers_every_layer_output_error(start: str) -> None:
    model = tiny_model("llama")
    recipe = [{start: {}}, {"zeroquant_local": {"steps": 20, "lr": 1e-4}}]
    report = quantize(model, SCHEME, recipe, CAL, progress=False)
    layers = [d for d in report.distill if d["layer"] >= 0]
    assert len(layers) == 2
    assert all(d["best"] < d["start"] for d in layers)


@pytest.mark.parametrize("fp_layer", [0, 1])
def test_local_skips_layers_kept_in_fp_and_the_loop_ends_after_the_last_target(fp_layer: int) -> None:
    model = tiny_model("llama")
    calls: list[int] = []
    model.model.layers[1].register_forward_pre_hook(lambda *_: calls.append(1))
    scheme = {**SCHEME, "overrides": [{"match": rf"model\.layers\.{fp_layer}\..*", "weight": None}]}
    report = quantize(model, scheme, [{"zeroquant_local": {"steps": 3}}], CAL, progress=False)
    assert [d["layer"] for d in report.distill] == [1 - fp_layer]
    assert (len(calls) > 1) == (fp_layer == 0)  # layer 1 in FP and last: run by the input capture alone


def test_distilled_weights_stay_on_the_quantizer_grid() -> None:
    model = tiny_model("qwen2")
    report = quantize(model, SCHEME, [{"zeroquant_local": {"steps": 5, "lr": 1e-3}}], CAL, progress=False)
    assert report.distill
    W = model.model.layers[1].self_attn.q_proj.weight.detach()
    levels = W.reshape(W.shape[0], -1, 16)  # a weight on a 3-bit grid has at most 8 levels per group
    assert all(len(torch.unique(g)) <= 8 for row in levels for g in row)


def test_global_lowers_kl_and_lorc_runs_after_it() -> None:
    model = tiny_model("gpt2")
    recipe = [{"rtn": {}}, {"zeroquant_global": {"steps": 10, "lr": 1e-4}}, {"lorc": {"rank": 4}}]
    report = quantize(model, SCHEME, recipe, CAL, progress=False)
    glob = [d for d in report.distill if d["layer"] < 0]
    assert len(glob) == 1 and glob[0]["best"] < glob[0]["start"]


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        ([{"zeroquant_local": {}}, {"gptq": {}}], "comes after a compensator or refiner"),
        ([{"lorc": {}}, {"zeroquant_local": {}}], "put lorc last"),
        ([{"zeroquant_local": {"optimizer": "lbfgs"}}], "optimizer='lbfgs' is unknown"),
        ([{"zeroquant_local": {"lr": -1}}], "must be positive"),
    ],
)
def test_bad_recipes(recipe: list, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_recipe(recipe)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(CAL[:2]).logits


@pytest.mark.parametrize("transform", ["smoothquant", "awq"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_zeroquant_after_a_transform_keeps_the_rows_it_folded(transform: str, family: str) -> None:
    """A transform divides rows of an already quantized v_proj/up_proj; distillation must start from them.

    With no steps, ZeroQuant-Local leaves the transformed, quantized model as it was; LoRC after it
    compensates against the transformed FP weights, so it brings the model closer to FP.
    """
    fp = _logits(tiny_model(family).eval())
    outs = []
    for tail in ([], [{"zeroquant_local": {"steps": 0}}], [{"zeroquant_local": {"steps": 0}}, {"lorc": {"rank": 16}}]):
        model = tiny_model(family).eval()
        quantize(model, SCHEME, [{transform: {}}, {"rtn": {}}, *tail], CAL, progress=False)
        outs.append(_logits(model))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    assert (outs[2] - fp).pow(2).mean() < 0.5 * (outs[1] - fp).pow(2).mean()
