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
from ptqlab.export.compressed import pack_codes
from ptqlab.export.run import export_config
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


@pytest.mark.parametrize("weight", [
    {"bits": 4, "symmetric": True, **CHANNEL}, {"bits": 4, "symmetric": False, **CHANNEL},
    {"bits": 4, "symmetric": True, **GROUP}, {"bits": 4, "symmetric": False, **GROUP},
    {"bits": 8, "symmetric": True, **CHANNEL}, {"bits": 3, "symmetric": True, **GROUP},
])
def test_the_library_decompresses_the_runs_weights_bit_for_bit(tmp_path: Path, weight: dict, quantized_here) -> None:
    data = _config(weight)
    out = tmp_path / "ct"
    export_config(parse_config(data), "compressed-tensors", out, progress=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.down_proj.weight_packed" in names
    assert "model.layers.0.mlp.down_proj.weight" not in names
    assert ("model.layers.0.mlp.down_proj.weight_zero_point" in names) == (not weight["symmetric"])
    theirs = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                  dtype=torch.float32).eval()
    ours = quantized_here(data)
    mine = ours.state_dict()
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(tensor, mine[name]), name
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(theirs(ids).logits, ours(ids).logits, atol=1e-5)


@pytest.mark.parametrize(("change", "message"), [
    ({"scheme": {"weight": {"format": "fp8_e4m3"}}}, "pack-quantized holds INT weights"),
    ({"scheme": {"weight": {"bits": 4, "granularity": "tensor"}}}, "granularity 'tensor'"),
    ({"scheme": {"weight": {"bits": 4, "symmetric": False, "zero_point": "float", **CHANNEL}}}, "zero_point: int"),
    ({"recipe": [{"gptq": {"act_order": True}}]}, "act_order"),
    ({"scheme": {"weight": {"bits": 4}, "activation": {"bits": 8}}}, "weight-only"),
])
def test_what_the_format_cannot_hold_is_refused_before_writing(tmp_path: Path, change: dict, message: str) -> None:
    out = tmp_path / "ct"
    with pytest.raises(ConfigError, match=message):
        export_config(parse_config(_config({"bits": 4}) | change), "compressed-tensors", out, progress=False)
    assert not out.exists()


def test_a_weight_moved_off_its_grid_is_an_error_not_a_requantization(tmp_path: Path) -> None:
    """LoRC adds a low-rank product to the quantized weight: pack-quantized has no place for it."""
    data = _config({"bits": 4, **CHANNEL}, [{"rtn": {}}, {"lorc": {"rank": 4}}])
    out = tmp_path / "ct"
    with pytest.raises(ConfigError, match="not on its quantization grid"):
        export_config(parse_config(data), "compressed-tensors", out, progress=False)
    assert not out.exists()
