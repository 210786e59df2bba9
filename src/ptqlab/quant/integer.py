"""Uniform integer quantization: scales and zero points from ranges, codes, values.

The 2-D, format-aware entry points (ranges per granularity, clipping) are in :mod:`ptqlab.quant.core`.

Grids (``maxq = 2**bits - 1``, codes are unsigned integers in [0, maxq]):
- asymmetric, integer zero point: the range is widened to contain 0, ``scale = (max - min) / maxq``,
  ``zero = round(-min / scale)``; 0 is exactly representable (the GPTQ grid).
- asymmetric, float zero point: ``scale = (max - min) / maxq``, ``zero = -min / scale`` unrounded;
  the grid spans exactly [min, max].
- symmetric: ``scale = absmax / (2**(bits-1) - 1)``, ``zero = 2**(bits-1)``; signed levels
  ``-2**(bits-1) .. 2**(bits-1) - 1`` times the scale.
Dequantization is always ``scale * (code - zero)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import QuantSpec


@dataclass(frozen=True)
class QParams:
    """Scales and zero points, shaped (rows, groups) or broadcastable to the quantized slice."""

    scale: torch.Tensor
    zero: torch.Tensor


def qparams_from_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> QParams:
    """Compute scale and zero point from a range, per the grid rules of the module docstring.

    Args:
        xmin: Minimum of each range.
        xmax: Maximum of each range (same shape as ``xmin``).
        spec: The quantization spec; ``clip_ratio`` shrinks the range first.

    Returns:
        QParams with the shape of ``xmin``.

    """
    xmin = xmin * spec.clip_ratio
    xmax = xmax * spec.clip_ratio
    if spec.symmetric:
        half = 2 ** (spec.nbits - 1)
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        scale = absmax / (half - 1)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return QParams(scale, torch.full_like(scale, float(half)))
    if spec.zero_point == "int":
        xmin = torch.clamp(xmin, max=0)
        xmax = torch.clamp(xmax, min=0)
    scale = (xmax - xmin) / spec.maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = -xmin / scale
    if spec.zero_point == "int":
        zero = torch.round(zero)
    return QParams(scale, zero)


def quantize_with(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, float_zero: bool = False
) -> torch.Tensor:
    """Map values to integer codes in [0, maxq] with broadcastable scale and zero point.

    Integer zero points use ``round(w / scale) + zero``; float zero points ``round(w / scale + zero)``.
    """
    if float_zero:
        return torch.clamp(torch.round(w / scale + zero), 0, maxq)
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def float_zero(spec: QuantSpec) -> bool:
    """Whether ``spec`` keeps its zero point in floating point (asymmetric, ``zero_point: float``)."""
    return not spec.symmetric and spec.zero_point == "float"


def dequantize_with(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Map integer codes back to values: ``scale * (codes - zero)``."""
    return scale * (codes - zero)
