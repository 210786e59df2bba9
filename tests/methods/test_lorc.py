"""LoRC against its definition, and recipe composition order."""

from __future__ import annotations

import pytest
import torch

from ptqlab.api import plan_quantization, quantize
from ptqlab.errors import ConfigError
from ptqlab.methods import build_recipe
from ptqlab.methods.lorc import LoRC, LoRCConfig
from ptqlab.methods.rtn import RTN
from ptqlab.quant import QuantSpec
from ptqlab.testing import tiny_model

SPEC = QuantSpec(bits=3, granularity="channel")


def _w(rows: int = 48, cols: int = 32) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))


def test_full_rank_fp_factors_reconstruct_w_exactly() -> None:
    W = _w()
    base = RTN().quantize(W, SPEC)
    out = LoRC(LoRCConfig(rank=32, factor_bits=16)).compensate(W, base)
    torch.testing.assert_close(out.weight, W, rtol=0, atol=1e-5)
    assert not torch.allclose(base.weight, W, atol=1e-2)


def test_rank_zero_is_a_no_op() -> None:
    W = _w()
    base = RTN().quantize(W, SPEC)
    assert LoRC(LoRCConfig(rank=0)).compensate(W, base) is base


@pytest.mark.parametrize("factor_bits", [16, 8])
def test_low_rank_correction_lowers_the_error(factor_bits: int) -> None:
    W = _w()
    base = RTN().quantize(W, SPEC)
    out = LoRC(LoRCConfig(rank=8, factor_bits=factor_bits)).compensate(W, base)
    assert (out.weight - W).norm() < (base.weight - W).norm()
    assert torch.equal(out.codes, base.codes)


def test_factor_bits_count_in_the_size() -> None:
    lorc = LoRC(LoRCConfig(rank=8, factor_bits=8))
    assert lorc.extra_bits(48, 32) == 8 * (48 + 32) * 8 + (48 + 8) * 16
    assert LoRC(LoRCConfig(rank=8, factor_bits=16)).extra_bits(48, 32) == 8 * (48 + 32) * 16
    model = tiny_model("llama")
    scheme = {"weight": {"bits": 4}}
    plain = plan_quantization(model, scheme, [{"rtn": {}}]).size_metrics(model)
    with_lorc = plan_quantization(model, scheme, [{"rtn": {}}, {"lorc": {"rank": 4}}]).size_metrics(model)
    assert with_lorc["bits.weight"] > plain["bits.weight"]
    assert with_lorc["size.model_bytes"] > plain["size.model_bytes"]


def test_recipe_order_is_respected_and_recorded() -> None:
    recipe = build_recipe([{"gptq": {}}, {"lorc": {"rank": 2}}])
    assert recipe.steps == ["gptq", "lorc"] and recipe.name == "gptq+lorc" and recipe.needs_calibration
    assert build_recipe([{"lorc": {}}]).steps == ["rtn", "lorc"]
    with pytest.raises(ConfigError, match="comes after a compensator"):
        build_recipe([{"lorc": {}}, {"gptq": {}}])


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        ([{"rtn": {}}, {"lorc": {"rank": 65}}], r"lorc.rank=65 is above min\(d_out, d_in\) = 64"),
        ([{"lorc": {"rank": -1}}], "non-negative"),
        ([{"lorc": {"factor_bits": 12}}], "factor_bits=12"),
        ([{"lorc": {"rnak": 2}}], "unknown option of lorc"),
    ],
)
def test_bad_lorc_input_fails_before_any_work(recipe: list, match: str) -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        quantize(model, {"weight": {"bits": 4}}, recipe, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gptq_lorc_lowers_every_layer_error_in_the_pipeline() -> None:
    cal = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    errs = {}
    for recipe in ([{"gptq": {}}], [{"gptq": {}}, {"lorc": {"rank": 8}}]):
        model = tiny_model("llama")
        report = quantize(model, {"weight": {"bits": 3}}, recipe, cal, progress=False)
        errs[len(recipe)] = {r.module: r.rel_error for r in report.records}
    assert errs[1].keys() == errs[2].keys()
    assert all(errs[2][m] < errs[1][m] for m in errs[1])  # type: ignore[operator]
