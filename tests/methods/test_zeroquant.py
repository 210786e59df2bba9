"""ZeroQuant-Local / -Global: layer-wise and model-level distillation of the quantized weights."""

from __future__ import annotations

import pytest
import torch

from ptqlab.api import quantize
from ptqlab.errors import ConfigError
from ptqlab.methods import build_quantizer
from ptqlab.models.tiny import tiny_model

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
        build_quantizer(recipe)
