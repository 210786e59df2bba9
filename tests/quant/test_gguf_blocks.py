"""GGUF block formats: against llama.cpp's definitions (gguf-py's reference quantizers and dequantizers)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ptqlab.errors import ConfigError
from ptqlab.formats.gguf_blocks import pack
from ptqlab.methods.gptq import GPTQ
from ptqlab.methods.rtn import RTN
from ptqlab.quant.core import choose_qparams, dequantize, fake_quantize, quantize
from ptqlab.quant.gguf import BLOCK_TYPES, fp16
from ptqlab.quant.size import weight_storage_bits
from ptqlab.quant.spec import QuantSpec

REFERENCE = ["gguf_q8_0", "gguf_q4_0", "gguf_q5_0", "gguf_q4_1", "gguf_q5_1"]  # gguf-py quantizes these


def _weights(rows: int = 48, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    W[0, :256] = 0.0  # all-zero blocks
    W[1] = W[1].abs() + 0.3  # all-positive rows, far from 0
    W[2] = -W[2].abs()  # all-negative
    W[3, :32] = 0.125  # a constant block
    W[4, 7] = 1.5  # an outlier
    return W


def _ggml(fmt: str) -> gguf.GGMLQuantizationType:
    return getattr(gguf.GGMLQuantizationType, BLOCK_TYPES[fmt].ggml)


@pytest.mark.parametrize("fmt", REFERENCE)
def test_rtn_is_llama_cpps_quantizer_rounded_on_the_stored_grid(fmt: str) -> None:
    """The scales are llama.cpp's (FP16); codes differ only where ours is nearer the weight on that grid."""
    W = _weights()
    ours = fake_quantize(W, QuantSpec(format=fmt))
    ref_bytes = gguf.quants.quantize(W.numpy(), _ggml(fmt))
    ref = torch.from_numpy(gguf.quants.dequantize(ref_bytes, _ggml(fmt)))
    qp = choose_qparams(W, QuantSpec(format=fmt))
    ref_d = torch.from_numpy(ref_bytes.reshape(W.shape[0], -1, ref_bytes.shape[1] * 32 // W.shape[1])[..., :2]
                             .copy().view(np.float16)[..., 0].astype(np.float32))
    zero = qp.scale == 1.0  # an all-zero block: any scale; ptqlab keeps 1, llama.cpp 0
    assert torch.equal(qp.scale[~zero], ref_d[~zero])
    differ = ours != ref
    assert differ.float().mean() < 0.01
    # where they differ, ours is the nearer point (or a tie up to float32 rounding of the division)
    assert bool(((ours - W).abs() <= (ref - W).abs() + 1e-7)[differ].all())


@pytest.mark.parametrize("fmt", list(BLOCK_TYPES))
def test_packed_blocks_are_read_back_by_gguf_py_bit_for_bit(fmt: str) -> None:
    W = _weights(seed=1)
    spec = QuantSpec(format=fmt)
    qp = choose_qparams(W, spec)
    codes = quantize(W, qp, spec)
    values = dequantize(codes, qp, spec)
    data = pack(BLOCK_TYPES[fmt].ggml, codes, qp.scale, qp.zero)
    assert data.shape[1] * 8 == W.shape[1] * weight_storage_bits(spec, 1, W.shape[1]) // W.shape[1]
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(data, _ggml(fmt))), values)


def test_q4_k_is_its_definition() -> None:
    """value = (d * sc) * q - dmin * mn, FP16 d and dmin per 256, 6-bit sc and mn per 32, the largest 63."""
    W = _weights(rows=8)
    qp = choose_qparams(W, QuantSpec(format="gguf_q4_k"))
    step = qp.scale.reshape(8, 2, 8)
    offset = -qp.zero.reshape(8, 2, 8)
    for values in (step, offset):
        d = values.amax(dim=-1, keepdim=True) / 63
        assert torch.equal(fp16(d), d)
        k = values / torch.where(d == 0, torch.ones_like(d), d)
        assert torch.equal(k, k.round()) and k.min() >= 0 and k.max() <= 63
        assert bool(((k.amax(dim=-1) == 63) | (d[..., 0] == 0)).all())
    out = fake_quantize(W, QuantSpec(format="gguf_q4_k"))
    s, z = qp.scale.repeat_interleave(32, dim=1), qp.zero.repeat_interleave(32, dim=1)
    live = s > 0
    q = (out - z)[live] / s[live]
    assert torch.allclose(q, q.round(), atol=1e-4) and q.min() > -1e-4 and q.max() < 15 + 1e-4
    inner = (q.round() > 0) & (q.round() < 15)  # not clamped at a range end: the nearest grid point
    assert bool(((out - W).abs()[live][inner] <= s[live][inner] * 0.5 * (1 + 1e-5)).all())


def test_bits_per_weight_are_llama_cpps() -> None:
    expected = {"gguf_q8_0": 8.5, "gguf_q4_0": 4.5, "gguf_q5_0": 5.5, "gguf_q4_1": 5.0, "gguf_q5_1": 6.0,
                "gguf_q4_k": 4.5}
    for fmt, bpw in expected.items():
        assert weight_storage_bits(QuantSpec(format=fmt), 4, 256) / (4 * 256) == bpw


def test_gptq_rounds_to_the_block_grid_and_beats_rtn() -> None:
    g = torch.Generator().manual_seed(3)
    X = torch.randn(512, 256, generator=g) @ torch.randn(256, 256, generator=g) * 0.1
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(32, 256, generator=g) * 0.05
    for fmt in ("gguf_q4_0", "gguf_q4_1", "gguf_q4_k"):
        spec = QuantSpec(format=fmt)
        result = GPTQ().quantize(W, spec, H)
        assert result.qparams is not None
        data = pack(BLOCK_TYPES[fmt].ggml, result.codes, result.qparams.scale, result.qparams.zero)
        assert torch.equal(torch.from_numpy(gguf.quants.dequantize(data, _ggml(fmt))), result.weight.float())
        rtn = RTN().quantize(W, spec).weight

        def loss(Q: torch.Tensor) -> float:
            E = Q.float() - W
            return float(torch.einsum("ij,jk,ik->", E, H, E))

        assert loss(result.weight) < loss(rtn)


@pytest.mark.parametrize(("fields", "message"), [
    ({"format": "gguf_q4_0", "group_size": 64}, "blocks of exactly 32"),
    ({"format": "gguf_q4_0", "granularity": "channel"}, "use granularity group"),
    ({"format": "gguf_q4_1", "bits": 8}, "conflicts with format"),
])
def test_bad_gguf_specs_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QuantSpec(**fields)


def test_a_width_that_is_not_whole_blocks_is_refused() -> None:
    with pytest.raises(ConfigError, match="super-blocks of 256.*576"):
        QuantSpec(format="gguf_q4_k").check_width(576, "model.layers.0.self_attn.q_proj")
    QuantSpec(format="gguf_q4_0").check_width(576, "model.layers.0.self_attn.q_proj")
    with pytest.raises(ConfigError, match="blocks of 32"):
        QuantSpec(format="gguf_q4_0").check_width(172, "model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("fmt", ["gguf_q4_0", "gguf_q4_1", "gguf_q4_k"])
def test_rows_divided_after_quantization_stay_on_their_grid(fmt: str) -> None:
    """A scale folded into the rows of a quantized weight (AWQ/SmoothQuant): codes kept, parameters follow."""
    W = _weights(rows=8)
    spec = QuantSpec(format=fmt)
    res = RTN().quantize(W, spec)
    rows, s = torch.tensor([1, 5]), torch.tensor([2.0, 0.5])
    divided = res.divide_rows(rows, s, spec)
    assert torch.equal(dequantize(divided.codes, divided.qparams, spec), divided.weight)
    assert torch.equal(divided.weight[rows], res.weight[rows] / s[:, None])
