"""INT quantization against its definition."""

from __future__ import annotations

import pytest
import torch

from ptqlab.errors import ConfigError
from ptqlab.quant import QuantSpec, choose_qparams, dequantize, fake_quantize, quantize


def test_bits16_is_identity_object():
    w = torch.randn(8, 16)
    assert fake_quantize(w, QuantSpec(bits=16)) is w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asym_int_grid_contains_zero_and_codes_in_range(bits):
    w = torch.randn(16, 64) + 0.5
    spec = QuantSpec(bits=bits)
    qp = choose_qparams(w, spec)
    codes = quantize(w, qp, spec)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert torch.equal(qp.zero, torch.round(qp.zero))
    zero_row = torch.zeros(16, 64)
    assert torch.all(dequantize(quantize(zero_row, qp, spec), qp, spec) == 0)


def test_rtn_error_at_most_half_step():
    w = torch.randn(32, 64)
    for spec in (QuantSpec(bits=4), QuantSpec(bits=3, granularity="group", group_size=16),
                 QuantSpec(bits=4, symmetric=True), QuantSpec(bits=4, zero_point="float"),
                 QuantSpec(bits=5, granularity="tensor")):
        qp = choose_qparams(w, spec)
        step = qp.scale.repeat_interleave(64 // qp.scale.shape[1], dim=1) if qp.scale.shape[1] > 1 else qp.scale
        err = (fake_quantize(w, spec) - w).abs()
        assert torch.all(err <= step / 2 + 1e-6), spec


def test_float_zero_point_is_lossless_on_its_own_grid():
    # values already on an asymmetric 4-bit grid with a float offset per group of 32 are kept exactly
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (8, 64), generator=g).float()
    codes[:, ::32] = 0
    codes[:, 1::32] = 15
    scale = torch.rand(8, 2, generator=g) + 0.1
    offset = torch.randn(8, 2, generator=g)
    w = codes * scale.repeat_interleave(32, 1) + offset.repeat_interleave(32, 1)
    spec = QuantSpec(bits=4, granularity="group", group_size=32, zero_point="float")
    torch.testing.assert_close(fake_quantize(w, spec), w, rtol=0, atol=1e-5)
    assert not torch.allclose(fake_quantize(w, QuantSpec(bits=4, granularity="group", group_size=32)), w, atol=1e-5)


def test_symmetric_grid_is_signed_and_centred():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0]])
    out = fake_quantize(w, QuantSpec(bits=3, symmetric=True))
    torch.testing.assert_close(out, torch.tensor([[-1.0, -2 / 3, 0.0, 2 / 3, 1.0]]))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"bits": 0}, "bits"), ({"bits": 33}, "bits"), ({"bits": 1}, "bits"), ({"bits": 4.0}, "bits"),
     ({"granularity": "row"}, "granularity"), ({"format": "int5"}, "format"),
     ({"granularity": "group"}, "group_size"), ({"group_size": 64}, "group_size"),
     ({"zero_point": "half"}, "zero_point"), ({"clip_ratio": 0}, "clip_ratio")],
)
def test_impossible_specs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"scheme\.weight\.{field}"):
        QuantSpec(**{"bits": 4, **kwargs})


def test_group_size_that_does_not_divide_names_module_and_width():
    spec = QuantSpec(bits=4, granularity="group", group_size=128)
    with pytest.raises(ConfigError, match=r"group_size=128 does not divide the input width 576 of module m\.q"):
        spec.check_width(576, "m.q")
    spec.check_width(512, "m.q")
