"""QuantSpec with number formats, clipping methods and honest size accounting."""

from __future__ import annotations

import pytest
import torch

from ptqlab.errors import ConfigError
from ptqlab.quant import QuantSpec, fake_quantize
from ptqlab.quant.formats import MX_FORMATS, element_format, grid_max, grid_values, mx_shared_scale, round_to_grid
from ptqlab.quant.size import weight_storage_bits


def test_format_fixes_bits_and_mx_blocks() -> None:
    assert QuantSpec(format="nf4").nbits == 4
    assert QuantSpec(format="fp8_e4m3", bits=8).enabled
    assert QuantSpec(format="mxfp4").granularity == "group" and QuantSpec(format="mxfp4").group_size == 32
    with pytest.raises(ConfigError, match="conflicts with format 'fp6_e3m2'"):
        QuantSpec(format="fp6_e3m2", bits=4)
    with pytest.raises(ConfigError, match="blocks of exactly 32"):
        QuantSpec(format="mxint8", granularity="group", group_size=16)
    with pytest.raises(ConfigError, match="granularity='channel'"):
        QuantSpec(format="mxfp6_e2m3", granularity="channel")
    with pytest.raises(ConfigError, match="format='int4' is unknown"):
        QuantSpec(format="int4")


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_weights_equal_torch_casts(fmt: str) -> None:
    w = torch.randn(8, 64) * 3
    out = fake_quantize(w, QuantSpec(format=fmt, granularity="channel"))
    gmax = 448.0 if fmt == "fp8_e4m3" else 57344.0
    scale = w.abs().amax(dim=1, keepdim=True) / gmax
    dtype = torch.float8_e4m3fn if fmt == "fp8_e4m3" else torch.float8_e5m2
    ref = (w / scale).clamp(-gmax, gmax).to(dtype).float() * scale
    assert torch.equal(out, ref)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp6_e3m2", "fp6_e2m3", "nf4", "mxfp4", "mxint8", "mxfp6_e2m3"])
def test_values_are_block_scale_times_grid_points(fmt: str) -> None:
    w = torch.randn(4, 64) * 3
    out = fake_quantize(w, QuantSpec(format=fmt, granularity="group", group_size=32))
    elem = element_format(fmt)
    grid = grid_values(elem)
    for r in range(4):
        for g in range(2):
            block, qblock = w[r, g * 32 : (g + 1) * 32], out[r, g * 32 : (g + 1) * 32]
            absmax = block.abs().max()
            if fmt in MX_FORMATS:
                scale = mx_shared_scale(absmax, fmt)
                assert float(torch.log2(scale)).is_integer()  # E8M0: a power of two
            else:
                scale = absmax / grid_max(fmt)
            codes = qblock / scale
            assert ((codes[:, None] - grid[None, :]).abs().amin(dim=1) < 1e-5).all()
            torch.testing.assert_close(qblock, scale * round_to_grid(block / scale, elem), rtol=0, atol=1e-6)


@pytest.mark.parametrize("clipping", ["percentile", "mse"])
def test_clipping_methods(clipping: str) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g)
    w[:, 0] = 20.0  # one outlier per row
    minmax = QuantSpec(bits=4, granularity="channel", symmetric=True)
    clipped = minmax.replace(clipping=clipping, percentile=99.0)
    err_minmax = (fake_quantize(w, minmax) - w).pow(2).sum()
    err_clipped = (fake_quantize(w, clipped) - w).pow(2).sum()
    if clipping == "mse":
        assert err_clipped <= err_minmax
    assert not torch.equal(fake_quantize(w, clipped), fake_quantize(w, minmax))


def test_mse_clipping_never_worse_per_range() -> None:
    w = torch.randn(32, 128) * torch.rand(32, 1) * 4
    base = QuantSpec(bits=3, granularity="group", group_size=32)
    a = (fake_quantize(w, base) - w).pow(2).reshape(32, 4, 32).sum(-1)
    b = (fake_quantize(w, base.replace(clipping="mse")) - w).pow(2).reshape(32, 4, 32).sum(-1)
    assert torch.all(b <= a + 1e-6)


def test_bits16_with_any_clipping_is_a_no_op() -> None:
    w = torch.randn(4, 8)
    assert fake_quantize(w, QuantSpec(bits=16, clipping="mse")) is w


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (QuantSpec(bits=4, granularity="group", group_size=64), 4 + (16 + 4) / 64),
        (QuantSpec(bits=4, granularity="group", group_size=64, symmetric=True), 4 + 16 / 64),
        (QuantSpec(bits=8, granularity="channel", zero_point="float"), 8 + 32 / 128),
        (QuantSpec(format="mxfp4"), 4 + 8 / 32),
        (QuantSpec(format="nf4", granularity="group", group_size=64), 4 + 16 / 64),
        (QuantSpec(bits=16), 16),
    ],
)
def test_effective_bits_count_every_parameter(spec: QuantSpec, expected: float) -> None:
    assert weight_storage_bits(spec, 10, 128) / (10 * 128) == pytest.approx(expected)
