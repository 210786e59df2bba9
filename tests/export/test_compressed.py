"""compressed-tensors export, read back by the library itself (through transformers' CompressedTensorsConfig)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from ptqlab.errors import ConfigError
from ptqlab.export.run import export_config
from ptqlab.formats.compressed import linear_tensors, pack_codes
from ptqlab.pipeline.driver import WeightGrid
from ptqlab.quant.core import choose_qparams, fake_quantize
from ptqlab.quant.spec import QuantSpec
from ptqlab.study.config import parse_config

GROUP = {"granularity": "group", "group_size": 4}
CHANNEL = {"granularity": "channel"}


def _config(weight: dict, recipe: list | None = None) -> dict:
    return {"model": "stories260k", "device": "cpu", "scheme": {"weight": weight},
            "recipe": [{"gptq": {}}] if recipe is None else recipe, "calibration": {"samples": 4, "seqlen": 64}}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_packing_matches_the_librarys(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for cols in (32, 40, 7):
        signed = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, cols), generator=g).to(torch.int8)
        assert torch.equal(pack_codes(signed, bits), pack_to_int32(signed, bits))
        assert torch.equal(pack_codes(signed.T.contiguous(), bits).T, pack_to_int32(signed, bits, packed_dim=0))


INT8_TOKENS = {"bits": 8, "granularity": "token", "dynamic": True, "symmetric": True}
FP8_TOKENS = {"format": "fp8_e4m3", "granularity": "token", "dynamic": True}


@pytest.mark.parametrize(("weight", "activation", "layout"), [
    ({"bits": 4, "symmetric": True, **CHANNEL}, None, "pack-quantized"),
    ({"bits": 4, "symmetric": False, **CHANNEL}, None, "pack-quantized"),
    ({"bits": 4, "symmetric": True, **GROUP}, None, "pack-quantized"),
    ({"bits": 4, "symmetric": False, **GROUP}, None, "pack-quantized"),
    ({"bits": 8, "symmetric": True, **CHANNEL}, None, "pack-quantized"),
    ({"bits": 3, "symmetric": True, **GROUP}, None, "pack-quantized"),
    ({"bits": 8, "symmetric": True, **CHANNEL}, INT8_TOKENS, "int-quantized"),
    ({"format": "fp8_e4m3", **CHANNEL}, None, "naive-quantized"),
    ({"format": "fp8_e4m3", **CHANNEL}, FP8_TOKENS, "float-quantized"),
])
def test_the_library_decompresses_the_runs_weights_bit_for_bit(tmp_path: Path, weight: dict, activation: dict | None,
                                                               layout: str, quantized_here) -> None:
    data = _config(weight)
    if activation is not None:
        data["scheme"]["activation"] = activation
    out = tmp_path / "ct"
    export_config(parse_config(data), "compressed-tensors", out, progress=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == layout and config["ignore"] == ["lm_head"]
    assert "`quantization_config.format`" in (out / "README.md").read_text()  # the card every export carries
    acts = config["config_groups"]["group_0"]["input_activations"]
    assert (acts is None) == (activation is None)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        if layout != "pack-quantized":
            dtype = f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype
            assert dtype == (torch.int8 if layout == "int-quantized" else torch.float8_e4m3fn)
    packed = layout == "pack-quantized"
    assert ("model.layers.0.mlp.down_proj.weight_packed" in names) == packed
    assert ("model.layers.0.mlp.down_proj.weight" not in names) == packed
    assert ("model.layers.0.mlp.down_proj.weight_zero_point" in names) == (not weight.get("symmetric", True))
    theirs = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                  dtype=torch.float32).eval()
    ours = quantized_here(data)
    mine = ours.state_dict()
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(tensor, mine[name]), name
    if activation is None:  # with activations ptqlab's model also quantizes them; dequantize=True does not
        ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            assert torch.allclose(theirs(ids).logits, ours(ids).logits, atol=1e-5)
    else:
        assert acts["num_bits"] == 8 and acts["strategy"] == "token" and acts["dynamic"] is True


@pytest.mark.parametrize(("change", "message"), [
    ({"scheme": {"weight": {"format": "fp8_e5m2", **CHANNEL}}}, "holds INT weights of 1-8 bits or FP8 E4M3"),
    ({"scheme": {"weight": {"bits": 4, "granularity": "tensor"}}}, "granularity 'tensor'"),
    ({"scheme": {"weight": {"bits": 4, "symmetric": False, "zero_point": "float", **CHANNEL}}}, "zero_point: int"),
    ({"recipe": [{"gptq": {"act_order": True}}]}, "act_order"),
    ({"scheme": {"weight": {"bits": 4}, "activation": INT8_TOKENS}}, "W8A8 .* takes symmetric 8-bit INT weights"),
    ({"scheme": {"weight": {"bits": 8}, "activation": {"bits": 4, "granularity": "token"}}}, "per-token 8-bit"),
    ({"scheme": {"weight": {"bits": 8}, "kv_cache": {"bits": 8}}}, "KV-cache"),
    ({"scheme": {"weight": {"bits": 4, **CHANNEL}, "embedding": {"bits": 8}}}, "no quantized embedding"),
])
def test_what_the_format_cannot_hold_is_refused_before_writing(tmp_path: Path, change: dict, message: str) -> None:
    out = tmp_path / "ct"
    with pytest.raises(ConfigError, match=message):
        export_config(parse_config(_config({"bits": 4}) | change), "compressed-tensors", out, progress=False)
    assert not out.exists()


def test_lorc_is_refused_before_any_work_and_pointed_to_hf(tmp_path: Path) -> None:
    """LoRC adds a low-rank product to the quantized weight: pack-quantized has no place for it."""
    data = _config({"bits": 4, **CHANNEL}, [{"rtn": {}}, {"lorc": {"rank": 4}}])
    out = tmp_path / "ct"
    with pytest.raises(ConfigError, match="LoRC.*--format hf"):
        export_config(parse_config(data), "compressed-tensors", out, progress=False)
    assert not out.exists()


def test_a_weight_moved_off_its_grid_is_an_error_not_a_requantization() -> None:
    spec = QuantSpec(bits=4, granularity="group", group_size=8)
    linear = torch.nn.Linear(16, 4, bias=False)
    qp = choose_qparams(linear.weight.detach(), spec)
    with torch.no_grad():
        linear.weight.copy_(fake_quantize(linear.weight, spec))
    grid = WeightGrid(linear, spec, qp.scale, qp.zero)
    assert "x.weight_packed" in linear_tensors("x", linear, grid)
    with torch.no_grad():
        linear.weight[0, 0] += 1e-3
    with pytest.raises(ConfigError, match="not on its quantization grid"):
        linear_tensors("x", linear, grid)
