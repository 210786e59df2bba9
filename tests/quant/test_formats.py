"""Element grids of the FP8 / FP6 / FP4 / NF4 / MX formats against their specs, written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ptqlab.quant.formats import (
    FORMAT_BITS,
    MX_BLOCK,
    MX_FORMATS,
    NF4_LEVELS,
    element_format,
    grid_max,
    grid_values,
    mx_shared_scale,
    round_to_grid,
)

# Non-negative values of the OCP FP4 / FP6 element types, in code order (exponent field, then mantissa
# field), enumerated by hand from the spec: exponent field 0 is subnormal, 0.m * 2**(1 - bias); the others
# are 1.m * 2**(e - bias); no inf / NaN codes. Position i in a list is the code i, so its mantissa is even
# exactly when i is even.
E2M1_POS = [
    0.0, 0.5,  # e=0 (subnormal, bias 1): 0.m * 2**0
    1.0, 1.5,  # e=1: 1.m * 2**0
    2.0, 3.0,  # e=2: 1.m * 2**1
    4.0, 6.0,  # e=3: 1.m * 2**2
]
E2M3_POS = [
    0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875,  # e=0 (subnormal, bias 1): 0.mmm * 2**0
    1.0, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875,  # e=1: 1.mmm * 2**0
    2.0, 2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 3.75,  # e=2: 1.mmm * 2**1
    4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5,  # e=3: 1.mmm * 2**2
]
E3M2_POS = [
    0.0, 0.0625, 0.125, 0.1875,  # e=0 (subnormal, bias 3): 0.mm * 2**-2
    0.25, 0.3125, 0.375, 0.4375,  # e=1: 1.mm * 2**-2
    0.5, 0.625, 0.75, 0.875,  # e=2: 1.mm * 2**-1
    1.0, 1.25, 1.5, 1.75,  # e=3: 1.mm * 2**0
    2.0, 2.5, 3.0, 3.5,  # e=4: 1.mm * 2**1
    4.0, 5.0, 6.0, 7.0,  # e=5: 1.mm * 2**2
    8.0, 10.0, 12.0, 14.0,  # e=6: 1.mm * 2**3
    16.0, 20.0, 24.0, 28.0,  # e=7: 1.mm * 2**4
]
MINIFLOAT_TABLES = {"fp4_e2m1": E2M1_POS, "fp6_e2m3": E2M3_POS, "fp6_e3m2": E3M2_POS}
MINIFLOAT_MX = {"fp4_e2m1": "mxfp4", "fp6_e2m3": "mxfp6_e2m3", "fp6_e3m2": "mxfp6_e3m2"}

NF4_BY_HAND = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]

FP8 = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "fp8_e5m2": (torch.float8_e5m2, 57344.0)}


def full_table(pos: list[float]) -> list[float]:
    """Both signs, +-0 merged, ascending."""
    return sorted(set(pos) | {-v for v in pos} | {0.0})


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def nearest_brute(x: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest table value of each x, and whether the two nearest table values are clearly apart."""
    d = (x[:, None].double() - table[None, :].double()).abs()
    two = d.topk(2, dim=1, largest=False)
    clear = (two.values[:, 1] - two.values[:, 0]) > 1e-6 * (1 + x.abs().double())
    return table[two.indices[:, 0]], clear


def spread_inputs(vmax: float, n: int = 2000, seed: int = 0) -> torch.Tensor:
    """Values of both signs, log-uniform magnitudes from far below the grid's smallest step to past its max."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.empty(n).uniform_(-9.0, math.log2(vmax) + 1.0, generator=g))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return (mag * sign).to(torch.float32)


# ----------------------------------------------------------------------------------------------- names


def test_format_bits_are_the_bits_their_grids_need():
    """Each format's bits index its grid: more values than bits - 1 can address, no more than bits can."""
    assert set(FORMAT_BITS) == set(MX_FORMATS) | {"fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "nf4"}
    for fmt, nbits in FORMAT_BITS.items():
        n = len(grid_values(fmt))
        assert 2 ** (nbits - 1) < n <= 2**nbits, (fmt, nbits, n)
    for fmt in ("fp6_e3m2", "fp6_e2m3", "fp4_e2m1"):  # no inf/NaN codes: every code but -0 is a value
        assert len(grid_values(fmt)) == 2 ** FORMAT_BITS[fmt] - 1


@pytest.mark.parametrize("fmt", sorted(MX_FORMATS))
def test_mx_formats_share_one_power_of_two_scale_per_block(fmt):
    """An MX tensor is blocks of MX_BLOCK along the input dimension, each its element grid times a power of two."""
    from ptqlab.quant import QuantSpec, fake_quantize

    spec = QuantSpec(format=fmt)
    assert spec.granularity == "group" and spec.group_size == MX_BLOCK
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4 * MX_BLOCK, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 0.2]).repeat_interleave(MX_BLOCK)
    q = fake_quantize(w, spec)
    grid = grid_values(element_format(fmt)).double()
    scales = set()
    for row in q.double():
        for block in row.split(MX_BLOCK):
            scale = 2.0 ** torch.floor(torch.log2(block.abs().max() / grid.max())).item()
            candidates = [scale * 2.0**k for k in (-1, 0, 1, 2)]  # the shared exponent, found by its grid
            fits = [c for c in candidates if bool(torch.isin(block / c, grid).all())]
            assert fits, (fmt, block)
            scales.add(fits[0])
    assert len(scales) > 1  # the blocks did not share one scale


def test_element_format_mapping():
    assert element_format("mxfp8_e4m3") == "fp8_e4m3"
    assert element_format("mxfp8_e5m2") == "fp8_e5m2"
    assert element_format("mxfp6_e3m2") == "fp6_e3m2"
    assert element_format("mxfp6_e2m3") == "fp6_e2m3"
    assert element_format("mxfp4") == "fp4_e2m1"
    assert element_format("mxint8") == "int8_mx"
    for fmt in ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "nf4", "int8_mx"):
        assert element_format(fmt) == fmt
    for fmt in MX_FORMATS:  # an MX format quantizes to its element's grid
        assert torch.equal(grid_values(fmt), grid_values(element_format(fmt)))
        assert grid_max(fmt) == grid_max(element_format(fmt))


def test_grid_max_is_the_largest_grid_value_and_follows_the_name():
    for fmt in FORMAT_BITS:
        values = grid_values(fmt)
        assert grid_max(fmt) == float(values.max()) == -float(values.min()), fmt
    assert grid_max("fp8_e4m3") == torch.finfo(torch.float8_e4m3fn).max
    assert grid_max("fp8_e5m2") == torch.finfo(torch.float8_e5m2).max
    for fmt in ("fp6_e3m2", "fp6_e2m3", "fp4_e2m1"):  # OCP minifloats without inf/NaN, from their e/m digits
        e, m = int(fmt[-3]), int(fmt[-1])
        bias = 2 ** (e - 1) - 1
        assert grid_max(fmt) == (2 - 2.0**-m) * 2.0 ** (2**e - 1 - bias), fmt


@pytest.mark.parametrize("name", ["int", "fp16", "bf16", "MXFP4", "mxfp4 ", "fp8", "nf3", "", "int8"])
def test_unknown_names_raise_value_error(name):
    x = torch.zeros(3)
    for call in (lambda: element_format(name), lambda: grid_max(name), lambda: grid_values(name),
                 lambda: round_to_grid(x, name), lambda: mx_shared_scale(x, name)):
        with pytest.raises(ValueError, match="unknown format"):
            call()


def test_mx_shared_scale_rejects_formats_without_mx_rule():
    with pytest.raises(ValueError):
        mx_shared_scale(torch.ones(2), "nf4")


# ----------------------------------------------------------------------------------------------- FP8


@pytest.mark.parametrize("fmt", sorted(FP8))
def test_fp8_matches_torch_cast_bit_for_bit(fmt):
    dtype, vmax = FP8[fmt]
    g = torch.Generator().manual_seed(1)
    base = torch.randn(512, generator=g)
    x = torch.cat([base * m for m in (2.0**-20, 1e-4, 1e-2, 0.3, 1.0, 10.0, 300.0, 1e3, 1e5, 1e7)])
    x = torch.cat([x, torch.tensor([0.0, -0.0, vmax, -vmax, vmax * 1.03, -vmax * 1.06, float("inf"), -float("inf")])])
    ref = x.clamp(-vmax, vmax).to(dtype).to(torch.float32)
    out = round_to_grid(x, fmt)
    assert torch.equal(bits(out), bits(ref))
    assert torch.equal(bits(round_to_grid(x, "mx" + fmt)), bits(ref))


@pytest.mark.parametrize("fmt", sorted(FP8))
def test_fp8_saturates_without_inf(fmt):
    vmax = FP8[fmt][1]
    x = torch.tensor([vmax, vmax * 1.01, vmax * 1.2, 1e9, float("inf"), -vmax * 1.2, -1e9, -float("inf")])
    out = round_to_grid(x, fmt)
    assert torch.isfinite(out).all()
    assert out.tolist() == [vmax] * 5 + [-vmax] * 3


@pytest.mark.parametrize("fmt", sorted(FP8))
def test_fp8_grid_values_and_nearest(fmt):
    grid = grid_values(fmt)
    assert grid.numel() == {"fp8_e4m3": 253, "fp8_e5m2": 247}[fmt]  # 256 codes minus NaN/inf codes and -0
    assert grid.max().item() == FP8[fmt][1] and grid.min().item() == -FP8[fmt][1]
    assert torch.equal(round_to_grid(grid, fmt), grid)
    x = spread_inputs(FP8[fmt][1], seed=2)
    want, clear = nearest_brute(x, grid)
    assert torch.equal(round_to_grid(x, fmt)[clear], want[clear])


# ----------------------------------------------------------------------------------------------- FP6 / FP4


@pytest.mark.parametrize("fmt", sorted(MINIFLOAT_TABLES))
def test_minifloat_grid_values_equal_hand_table(fmt):
    table = full_table(MINIFLOAT_TABLES[fmt])
    assert len(table) == {"fp4_e2m1": 15, "fp6_e2m3": 63, "fp6_e3m2": 63}[fmt]
    for name in (fmt, MINIFLOAT_MX[fmt]):
        got = grid_values(name)
        assert got.dtype == torch.float32 and got.dim() == 1
        assert got.tolist() == table
        assert not torch.signbit(got[got == 0]).any()


def test_e2m1_table_is_the_spec_set():
    assert full_table(E2M1_POS) == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert min(v for v in E2M3_POS if v > 0) == 0.125 and max(E2M3_POS) == 7.5
    assert min(v for v in E3M2_POS if v > 0) == 0.0625 and max(E3M2_POS) == 28.0


@pytest.mark.parametrize("fmt", sorted(MINIFLOAT_TABLES))
def test_minifloat_grid_values_map_to_themselves(fmt):
    table = torch.tensor(full_table(MINIFLOAT_TABLES[fmt]))
    assert torch.equal(round_to_grid(table, fmt), table)
    assert torch.equal(round_to_grid(table, MINIFLOAT_MX[fmt]), table)


@pytest.mark.parametrize("fmt", sorted(MINIFLOAT_TABLES))
def test_minifloat_rounding_is_nearest_hand_table_value(fmt):
    table = torch.tensor(full_table(MINIFLOAT_TABLES[fmt]))
    vmax = max(MINIFLOAT_TABLES[fmt])
    for seed in (3, 4):
        x = spread_inputs(vmax, seed=seed)
        want, clear = nearest_brute(x, table)
        assert clear.float().mean() > 0.95
        got = round_to_grid(x, fmt)
        assert torch.equal(got[clear], want[clear])
    uniform = (torch.rand(2000, generator=torch.Generator().manual_seed(5)) * 2 - 1) * vmax
    want, clear = nearest_brute(uniform, table)
    assert torch.equal(round_to_grid(uniform, fmt)[clear], want[clear])


@pytest.mark.parametrize("fmt", sorted(MINIFLOAT_TABLES))
def test_minifloat_ties_go_to_even_mantissa(fmt):
    pos = MINIFLOAT_TABLES[fmt]
    mids, want = [], []
    for code in range(len(pos) - 1):
        mids.append((pos[code] + pos[code + 1]) / 2)  # exact in float32: the grids have few bits
        want.append(pos[code] if code % 2 == 0 else pos[code + 1])  # code parity = mantissa parity
    m = torch.tensor(mids)
    assert round_to_grid(m, fmt).tolist() == want
    assert round_to_grid(-m, fmt).tolist() == [-w for w in want]


@pytest.mark.parametrize("fmt", sorted(MINIFLOAT_TABLES))
def test_minifloat_saturates(fmt):
    vmax = max(MINIFLOAT_TABLES[fmt])
    x = torch.tensor([vmax * 1.0001, vmax * 1.5, vmax * 100, 1e30, float("inf")])
    assert round_to_grid(x, fmt).tolist() == [vmax] * 5
    assert round_to_grid(-x, fmt).tolist() == [-vmax] * 5


def test_minifloat_keeps_shape_and_dtype_and_propagates_nan():
    x = torch.tensor([[0.7, -2.6], [5.2, 100.0]], dtype=torch.bfloat16)
    out = round_to_grid(x, "fp4_e2m1")
    assert out.dtype == torch.bfloat16 and out.shape == (2, 2)
    assert out.float().tolist() == [[0.5, -3.0], [6.0, 6.0]]
    y = round_to_grid(torch.tensor([float("nan"), 1.2]), "fp6_e3m2")
    assert math.isnan(y[0].item()) and y[1].item() == 1.25


# ----------------------------------------------------------------------------------------------- NF4


def test_nf4_levels():
    assert list(NF4_LEVELS) == NF4_BY_HAND
    assert len(NF4_LEVELS) == 16
    assert grid_values("nf4").tolist() == [float(torch.tensor(v)) for v in NF4_BY_HAND]
    assert grid_max("nf4") == 1.0


def test_nf4_rounding_is_nearest_level():
    levels = torch.tensor(NF4_BY_HAND)
    x = torch.randn(3000, generator=torch.Generator().manual_seed(6)) * 0.6
    want, clear = nearest_brute(x, levels)
    got = round_to_grid(x, "nf4")
    assert torch.equal(got[clear], want[clear])
    assert torch.equal(round_to_grid(levels, "nf4"), levels)


def test_nf4_saturates_ties_low_and_nan():
    x = torch.tensor([1.5, 1e9, float("inf"), -1.5, -float("inf")])
    assert round_to_grid(x, "nf4").tolist() == [1.0, 1.0, 1.0, -1.0, -1.0]
    levels = torch.tensor(NF4_BY_HAND)
    mids = (levels[:-1] + levels[1:]) * 0.5
    assert torch.equal(round_to_grid(mids, "nf4"), levels[:-1])
    assert math.isnan(round_to_grid(torch.tensor([float("nan")]), "nf4").item())


# ----------------------------------------------------------------------------------------------- MXINT8


def test_mxint8_grid_values():
    want = [k / 64 for k in range(-127, 128)]
    assert grid_values("mxint8").tolist() == want
    assert grid_values("int8_mx").tolist() == want
    assert grid_max("mxint8") == 1.984375


def test_mxint8_rounding_and_saturation():
    x = torch.tensor([0.5 / 64, 1.5 / 64, 2.5 / 64, -0.5 / 64, 0.3 / 64, 0.7 / 64, 1.99, 2.0, 50.0, -3.0])
    want = [0.0, 2 / 64, 2 / 64, 0.0, 0.0, 1 / 64, 127 / 64, 127 / 64, 127 / 64, -127 / 64]
    assert round_to_grid(x, "mxint8").tolist() == want
    table = grid_values("mxint8")
    y = torch.empty(2000).uniform_(-2.5, 2.5, generator=torch.Generator().manual_seed(7))
    near, clear = nearest_brute(y, table)
    assert torch.equal(round_to_grid(y, "mxint8")[clear], near[clear])


# ----------------------------------------------------------------------------------------------- MX shared scale


def test_mx_shared_scale_worked_examples():
    def one(a: float, fmt: str) -> float:
        return mx_shared_scale(torch.tensor([a]), fmt).item()

    assert one(6.0, "mxfp4") == 1.0  # 2**(2 - 2)
    assert one(7.0, "mxfp4") == 1.0
    assert one(8.0, "mxfp4") == 2.0  # 2**(3 - 2)
    assert one(0.3, "mxfp4") == 2.0**-4  # 2**(-2 - 2)
    assert one(448.0, "mxfp8_e4m3") == 1.0  # 2**(8 - 8)
    assert one(512.0, "mxfp8_e4m3") == 2.0
    assert one(57344.0, "mxfp8_e5m2") == 1.0  # 2**(15 - 15)
    assert one(1.0, "mxfp8_e5m2") == 2.0**-15
    assert one(28.0, "mxfp6_e3m2") == 1.0  # 2**(4 - 4)
    assert one(7.5, "mxfp6_e2m3") == 1.0  # 2**(2 - 2)
    assert one(1.5, "mxint8") == 1.0  # 2**(0 - 0)
    assert one(100.0, "mxint8") == 64.0  # 2**(6 - 0)
    assert one(2.0**-3 - 2.0**-27, "mxfp4") == 2.0**-6  # largest float32 below 2**-3: floor(log2) is -4


def test_mx_shared_scale_edge_cases():
    s = mx_shared_scale(torch.tensor([0.0, 2.0**-140, 1e-45, 2.0**130, 3e38, float("inf")]), "mxfp4")
    assert s.dtype == torch.float32
    assert torch.isfinite(s).all() and (s > 0).all()
    assert s[0].item() == 1.0  # zero block
    assert s[1].item() == 2.0**-127 and s[2].item() == 2.0**-127  # E8M0 lower clamp
    assert s[3].item() == 2.0**127 and s[4].item() == 2.0**125 and s[5].item() == 2.0**127
    assert math.isnan(mx_shared_scale(torch.tensor([float("nan")]), "mxfp4").item())
    shaped = mx_shared_scale(torch.rand(3, 4, dtype=torch.float64) + 0.1, "mxfp6_e2m3")
    assert shaped.shape == (3, 4) and shaped.dtype == torch.float32


@pytest.mark.parametrize("fmt", sorted(MX_FORMATS))
def test_mx_scaled_blocks_stay_below_twice_the_largest_binade(fmt):
    emax = {"mxfp8_e4m3": 8, "mxfp8_e5m2": 15, "mxfp6_e3m2": 4, "mxfp6_e2m3": 2, "mxfp4": 2, "mxint8": 0}[fmt]
    g = torch.Generator().manual_seed(8)
    blocks = torch.randn(64, MX_BLOCK, generator=g) * torch.exp2(torch.randint(-30, 30, (64, 1), generator=g))
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scale = mx_shared_scale(absmax, fmt)
    assert scale.shape == (64, 1)
    assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))  # powers of two
    top = (blocks / scale).abs().amax(dim=1)
    assert (top < 2 * 2**emax).all()
    assert (top >= 2**emax).all()  # the block's largest element lands in the top binade
    q = round_to_grid(blocks / scale, fmt)
    assert (q.abs() <= grid_max(fmt)).all()
