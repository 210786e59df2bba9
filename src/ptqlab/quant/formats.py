"""Element grids of the non-integer number formats and the OCP Microscaling (MX) shared-scale rule.

A *format* names the grid of representable element values. Scaling (per tensor, channel, group or
MX block) happens elsewhere: the values given to :func:`round_to_grid` are already divided by their
scale, and this module only snaps them to the element grid.

Formats:
- ``fp8_e4m3`` (OCP E4M3, ``torch.float8_e4m3fn``: no inf, max 448) and ``fp8_e5m2`` (OCP E5M2,
  ``torch.float8_e5m2``, max 57344). Rounding is torch's own float8 cast after clamping to the max.
- ``fp6_e3m2`` (bias 3, max 28, min subnormal 0.0625), ``fp6_e2m3`` (bias 1, max 7.5, min subnormal
  0.125), ``fp4_e2m1`` (bias 1, values +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}): the OCP MX element types; every
  exponent code encodes finite values (no inf, no NaN) and exponent code 0 encodes subnormals.
- ``nf4``: the 16 NormalFloat levels of QLoRA (Dettmers et al. 2023), :data:`NF4_LEVELS`, in [-1, 1].
- ``mxfp8_e4m3``, ``mxfp8_e5m2``, ``mxfp6_e3m2``, ``mxfp6_e2m3``, ``mxfp4``, ``mxint8``: OCP MX formats,
  blocks of :data:`MX_BLOCK` elements sharing one power-of-two (E8M0) scale, :func:`mx_shared_scale`;
  their elements use the grid :func:`element_format` names. The MXINT8 element grid, ``int8_mx``, is
  8-bit two's complement with an implicit scale of 2**-6 (OCP Microscaling spec v1.0). This module uses
  it symmetrically: the values k/64 for k in -127..127 (max 127/64 = 1.984375); the code -128 that the
  spec allows is left out so the grid is symmetric around 0.

The uniform integer format ``int`` is not handled here (see :mod:`ptqlab.quant.integer`); names this
module does not know raise ``ValueError``.
"""

from __future__ import annotations

import torch

MX_BLOCK: int = 32
"""Number of consecutive elements sharing one scale in the OCP MX formats."""

FORMAT_BITS: dict[str, int] = {
    "fp8_e4m3": 8,
    "fp8_e5m2": 8,
    "fp6_e3m2": 6,
    "fp6_e2m3": 6,
    "fp4_e2m1": 4,
    "mxfp8_e4m3": 8,
    "mxfp8_e5m2": 8,
    "mxfp6_e3m2": 6,
    "mxfp6_e2m3": 6,
    "mxfp4": 4,
    "mxint8": 8,
    "nf4": 4,
}
"""Bits per element of every format of this module (the MX shared scale is not counted)."""

_MX_ELEMENT: dict[str, str] = {
    "mxfp8_e4m3": "fp8_e4m3",
    "mxfp8_e5m2": "fp8_e5m2",
    "mxfp6_e3m2": "fp6_e3m2",
    "mxfp6_e2m3": "fp6_e2m3",
    "mxfp4": "fp4_e2m1",
    "mxint8": "int8_mx",
}

MX_FORMATS: frozenset[str] = frozenset(_MX_ELEMENT)
"""The OCP Microscaling formats."""

NF4_LEVELS: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
"""The 16 NF4 levels of QLoRA, ascending."""

_FP8_DTYPES: dict[str, torch.dtype] = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}

# OCP FP6 / FP4 element types: (exponent bits, mantissa bits, exponent bias).
_MINIFLOATS: dict[str, tuple[int, int, int]] = {
    "fp6_e3m2": (3, 2, 3),
    "fp6_e2m3": (2, 3, 1),
    "fp4_e2m1": (2, 1, 1),
}

_INT8_MX_STEP = 1.0 / 64.0
_INT8_MX_MAXCODE = 127

_GRID_MAX: dict[str, float] = {
    "fp8_e4m3": 448.0,
    "fp8_e5m2": 57344.0,
    "fp6_e3m2": 28.0,
    "fp6_e2m3": 7.5,
    "fp4_e2m1": 6.0,
    "nf4": 1.0,
    "int8_mx": _INT8_MX_MAXCODE * _INT8_MX_STEP,
}

# Exponent of the largest normal value of each MX element grid (floor(log2(grid_max))).
_EMAX_ELEM: dict[str, int] = {
    "fp8_e4m3": 8,
    "fp8_e5m2": 15,
    "fp6_e3m2": 4,
    "fp6_e2m3": 2,
    "fp4_e2m1": 2,
    "int8_mx": 0,
}

_E8M0_MIN_EXP = -127
_E8M0_MAX_EXP = 127


def _unknown(fmt: str) -> ValueError:
    known = ", ".join(sorted(FORMAT_BITS))
    return ValueError(f"unknown format {fmt!r}; known here: {known} (uniform 'int' is handled elsewhere)")


def element_format(fmt: str) -> str:
    """Return the name of the element grid of a format.

    Args:
        fmt: A format name of :data:`FORMAT_BITS`, or the MXINT8 element grid name ``int8_mx``.

    Returns:
        For an MX format, its element grid (``mxfp8_e4m3`` -> ``fp8_e4m3``, ``mxfp8_e5m2`` -> ``fp8_e5m2``,
        ``mxfp6_e3m2`` -> ``fp6_e3m2``, ``mxfp6_e2m3`` -> ``fp6_e2m3``, ``mxfp4`` -> ``fp4_e2m1``,
        ``mxint8`` -> ``int8_mx``); otherwise ``fmt`` itself.

    Raises:
        ValueError: If the name is unknown (including ``int``, which this module does not handle).

    """
    if fmt in _MX_ELEMENT:
        return _MX_ELEMENT[fmt]
    if fmt in _GRID_MAX:
        return fmt
    raise _unknown(fmt)


def grid_max(fmt: str) -> float:
    """Return the largest finite magnitude of a format's element grid.

    Args:
        fmt: A format name (MX names use their element grid).

    Returns:
        448 (fp8_e4m3), 57344 (fp8_e5m2), 28 (fp6_e3m2), 7.5 (fp6_e2m3), 6 (fp4_e2m1), 1 (nf4) or
        127/64 (int8_mx).

    Raises:
        ValueError: If the name is unknown.

    """
    return _GRID_MAX[element_format(fmt)]


def _minifloat_values(ebits: int, mbits: int, bias: int) -> list[float]:
    """Enumerate the non-negative values of an OCP minifloat without inf/NaN codes."""
    values = []
    for ecode in range(2**ebits):
        for mcode in range(2**mbits):
            frac = mcode / 2**mbits
            if ecode == 0:  # subnormal: 0.m * 2**(1 - bias)
                values.append(frac * 2.0 ** (1 - bias))
            else:
                values.append((1.0 + frac) * 2.0 ** (ecode - bias))
    return values


def grid_values(fmt: str) -> torch.Tensor:
    """Return every distinct finite value of a format's element grid.

    FP8 grids are supported too (all finite float8 values: 253 for e4m3, 247 for e5m2). Negative and
    positive zero count as one value, ``0.0``.

    Args:
        fmt: A format name (MX names use their element grid).

    Returns:
        Sorted (ascending) 1-D float32 tensor.

    Raises:
        ValueError: If the name is unknown.

    """
    elem = element_format(fmt)
    if elem in _FP8_DTYPES:
        codes = torch.arange(256, dtype=torch.uint8).view(_FP8_DTYPES[elem]).to(torch.float32)
        vals = codes[torch.isfinite(codes)]
    elif elem in _MINIFLOATS:
        pos = torch.tensor(_minifloat_values(*_MINIFLOATS[elem]), dtype=torch.float32)
        vals = torch.cat([-pos, pos])
    elif elem == "nf4":
        vals = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    else:  # int8_mx
        vals = torch.arange(-_INT8_MX_MAXCODE, _INT8_MX_MAXCODE + 1, dtype=torch.float32) * _INT8_MX_STEP
    return torch.unique(vals + 0.0)  # + 0.0 turns -0.0 into +0.0; unique sorts


def _round_minifloat(x: torch.Tensor, ebits: int, mbits: int, bias: int) -> torch.Tensor:
    """Round float32 ``x`` to the nearest value of an OCP minifloat (no inf/NaN), saturating.

    With ``a = min(|x|, max)`` and ``e = max(floor(log2(a)), 1 - bias)`` (the lower bound covers zero
    and the subnormal range, whose spacing equals that of the smallest binade), the spacing of the grid
    around ``a`` is ``2**(e - mbits)``; ``a / spacing`` is rounded half to even, which is round half to
    even mantissa because the integer's last bit is the mantissa's last bit. A carry out of the
    mantissa lands on the next power of two, itself representable; clamping ``a`` to the max first keeps
    the result at most the max. ``floor(log2(a))`` is taken exactly from ``torch.frexp``.
    """
    emin = 1 - bias
    emax = 2**ebits - 1 - bias
    vmax = 2.0**emax * (2.0 - 2.0**-mbits)
    a = x.abs().clamp(max=vmax)  # NaN stays NaN
    _, exp = torch.frexp(a)  # a = m * 2**exp, m in [0.5, 1): floor(log2(a)) = exp - 1 (exp = 0 for a = 0)
    spacing = torch.exp2((exp - 1).clamp(min=emin).sub(mbits).to(torch.float32))
    return torch.copysign(torch.round(a / spacing) * spacing, x)


def _round_nf4(x: torch.Tensor) -> torch.Tensor:
    """Round float32 ``x`` to the nearest NF4 level; a midpoint goes to the lower level."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=x.device)
    mids = (levels[:-1] + levels[1:]) * 0.5
    idx = torch.bucketize(x, mids)  # first i with x <= mids[i]: a midpoint maps to the level below it
    out = levels[idx]
    return torch.where(torch.isnan(x), x, out)


def round_to_grid(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round already-scaled values to the nearest value of a format's element grid, saturating.

    Values beyond +-``grid_max(fmt)`` (infinities included) become +-``grid_max(fmt)``. The work is done
    in float32 and the result cast back to ``x.dtype``. Ties:

    - FP8: exactly ``x.clamp(-max, max).to(float8).to(float32)``, torch's cast (round half to even
      mantissa).
    - FP6 / FP4: round half to even mantissa (computed arithmetically, see ``_round_minifloat``).
    - NF4: a value exactly at the float32 midpoint of two levels goes to the lower (more negative) one.
    - int8_mx: ``torch.round`` of ``64 * x`` (round half to even code), clamped to -127..127.

    NaN inputs give NaN outputs. Negative inputs that round to zero give ``-0.0`` for the FP grids.

    Args:
        x: Values already divided by their scale; any shape, floating dtype.
        fmt: A format name (MX names use their element grid).

    Returns:
        Tensor of the shape and dtype of ``x``.

    Raises:
        ValueError: If the name is unknown.

    """
    elem = element_format(fmt)
    xf = x.to(torch.float32)
    if elem in _FP8_DTYPES:
        vmax = _GRID_MAX[elem]
        out = xf.clamp(-vmax, vmax).to(_FP8_DTYPES[elem]).to(torch.float32)
    elif elem in _MINIFLOATS:
        out = _round_minifloat(xf, *_MINIFLOATS[elem])
    elif elem == "nf4":
        out = _round_nf4(xf)
    else:  # int8_mx
        out = torch.round(xf / _INT8_MX_STEP).clamp(-_INT8_MX_MAXCODE, _INT8_MX_MAXCODE) * _INT8_MX_STEP
    return out.to(x.dtype)


def mx_shared_scale(absmax: torch.Tensor, fmt: str) -> torch.Tensor:
    """Compute the OCP MX shared scale of each block from its largest magnitude.

    The scale is ``2**clamp(floor(log2(absmax)) - emax_elem, -127, 127)``, where ``emax_elem`` is the
    exponent of the largest normal value of the element grid (fp8_e4m3: 8, fp8_e5m2: 15, fp6_e3m2: 4,
    fp6_e2m3: 2, fp4_e2m1: 2, int8_mx: 0) and [-127, 127] is the E8M0 exponent range. After dividing a
    block by its scale, every magnitude is below ``2 * 2**emax_elem``; values above the element grid's
    max are left to the saturation of :func:`round_to_grid`.

    Special blocks: absmax 0 gets scale 1.0 (any scale maps an all-zero block to zeros; 1.0 avoids the
    float32 subnormal 2**-127, which flush-to-zero modes would turn into 0). A nonzero absmax below
    ``2**(emax_elem - 127)`` gets the smallest E8M0 scale, 2**-127 (a float32 subnormal); +inf gets
    2**127; NaN gives NaN (E8M0's NaN code).

    Args:
        absmax: Largest magnitude of each block (non-negative), any shape.
        fmt: An MX format name, or the name of an MX element grid (e.g. ``fp4_e2m1``).

    Returns:
        Float32 tensor of the shape of ``absmax``.

    Raises:
        ValueError: If the name is unknown or has no MX shared-scale rule (e.g. ``nf4``).

    """
    elem = element_format(fmt)
    if elem not in _EMAX_ELEM:
        raise ValueError(f"format {fmt!r} has no MX shared scale; MX formats: {', '.join(sorted(MX_FORMATS))}")
    a = absmax.to(torch.float32).abs()
    _, exp = torch.frexp(a)  # floor(log2(a)) = exp - 1 for finite a > 0 (subnormals included)
    shared = (exp - 1 - _EMAX_ELEM[elem]).clamp(_E8M0_MIN_EXP, _E8M0_MAX_EXP).to(torch.float32)
    scale = torch.exp2(shared)
    scale = torch.where(a == 0, torch.ones_like(scale), scale)
    scale = torch.where(torch.isinf(a), torch.full_like(scale, 2.0**_E8M0_MAX_EXP), scale)
    return torch.where(torch.isnan(a), a, scale)
