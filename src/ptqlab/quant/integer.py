"""Uniform integer quantization: choose scales and zero points, quantize, dequantize, fake-quantize.

All functions take 2-D tensors laid out as (rows, columns) = (out_features, in_features); ranges are per
tensor, per row ("channel") or per group of ``group_size`` consecutive columns of a row.

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


def _ranges(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Return per-range min and max of ``w`` shaped (rows, groups) (or (1, 1) per tensor)."""
    rows, cols = w.shape
    if spec.granularity == "tensor":
        view = w.reshape(1, 1, -1)
    elif spec.granularity == "group":
        view = w.reshape(rows, spec.num_groups(cols), -1)  # (rows, groups, group_size)
    else:
        view = w.reshape(rows, 1, cols)
    return view.amin(dim=-1), view.amax(dim=-1)


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
        half = 2 ** (spec.bits - 1)
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


def choose_qparams(w: torch.Tensor, spec: QuantSpec) -> QParams:
    """Choose min-max quantization parameters for a 2-D tensor.

    Args:
        w: Tensor (rows, cols).
        spec: The quantization spec (granularity decides the shape of the result).

    Returns:
        QParams shaped (rows, groups) for channel/group granularity, (1, 1) per tensor.

    """
    xmin, xmax = _ranges(w, spec)
    return qparams_from_range(xmin, xmax, spec)


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


def _grouped(w: torch.Tensor, groups: int) -> torch.Tensor:
    """View (rows, cols) as (rows, groups, cols // groups) so per-group parameters broadcast."""
    rows, cols = w.shape
    return w.reshape(rows, groups, cols // groups)


def quantize(w: torch.Tensor, qp: QParams, spec: QuantSpec) -> torch.Tensor:
    """Quantize a 2-D tensor to integer codes (float tensor of whole numbers) with given parameters."""
    groups = qp.scale.shape[1]
    codes = quantize_with(_grouped(w, groups), qp.scale[..., None], qp.zero[..., None], spec.maxq, float_zero(spec))
    return codes.reshape(w.shape)


def dequantize(codes: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Dequantize codes produced by :func:`quantize` with the same parameters."""
    groups = qp.scale.shape[1]
    return dequantize_with(_grouped(codes, groups), qp.scale[..., None], qp.zero[..., None]).reshape(codes.shape)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize ``w`` with min-max parameters; identity when bits is 16.

    Args:
        w: Tensor (rows, cols).
        spec: The quantization spec.

    Returns:
        A tensor of the same shape and dtype holding the nearest grid values (``w`` itself at 16 bits).

    """
    if not spec.enabled:
        return w
    wf = w.float()
    qp = choose_qparams(wf, spec)
    return dequantize(quantize(wf, qp, spec), qp).to(w.dtype)
