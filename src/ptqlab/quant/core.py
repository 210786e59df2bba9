"""Format-aware quantization of 2-D tensors: ranges, scales, codes, fake quantization.

Every format is ``value = scale * (code - zero)`` per range:

- ``int``: integer codes in [0, 2**bits - 1] with a zero point (see :mod:`ptqlab.quant.integer`);
- scaled minifloats and ``nf4``: ``code`` is a point of the element grid, ``scale = absmax / grid_max``,
  zero 0;
- MX formats: ``code`` is a point of the element grid, ``scale`` the block's power-of-two E8M0 scale;
- GGUF block types: integer codes with FP16 block parameters; the types with a minimum are
  ``scale * code + zero`` instead (``zero`` is the offset; see :mod:`ptqlab.quant.gguf`).

The ``kmeans`` format is not scaled: ``scale`` holds each row's codebook (rows, 2**bits) and a code is an
index into it (see :mod:`ptqlab.quant.codebook`).

Ranges follow the granularity: ``tensor`` (one), ``group`` (``group_size`` consecutive columns of a row)
and per row for every other granularity (``channel`` for weights; callers lay activations and KV out
with one token (and head) per row for ``token`` / ``head``).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from . import gguf, integer
from .codebook import codebook_values, kmeans_codebook, nearest_codes
from .formats import MX_FORMATS, element_format, grid_max, mx_shared_scale, round_to_grid
from .integer import QParams
from .spec import QuantSpec

MSE_POINTS = 20
MSE_MIN_RATIO = 0.5


def _grouped_view(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View (rows, cols) as (ranges along rows, ranges along cols, values per range)."""
    rows, cols = w.shape
    if spec.granularity == "tensor":
        return w.reshape(1, 1, -1)
    if spec.granularity == "group":
        return w.reshape(rows, spec.num_groups(cols), -1)  # (rows, groups, group_size)
    return w.reshape(rows, 1, cols)


def _kth(view: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-quantile (0..1) of each range, by the nearest-rank rule."""
    n = view.shape[-1]
    k = min(n, max(1, math.ceil(q * n)))
    return view.kthvalue(k, dim=-1).values


def _ranges(view: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-range (min, max) of a grouped view, by the spec's clipping rule (before ``clip_ratio``)."""
    if spec.clipping == "percentile" and spec.percentile < 100.0:
        p = spec.percentile / 100.0
        return _kth(view, 1.0 - p), _kth(view, p)
    return view.amin(dim=-1), view.amax(dim=-1)


def params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec, ratio: float = 1.0) -> QParams:
    """Scale and zero point of each range for the spec's format.

    Args:
        xmin: Minimum of each range.
        xmax: Maximum of each range (same shape).
        spec: The spec; ``clip_ratio`` (times ``ratio``) shrinks each range first.
        ratio: An extra clipping factor (used by the MSE search).

    Returns:
        QParams with the shape of ``xmin``.

    """
    if spec.is_int:
        return integer.qparams_from_range(xmin * ratio, xmax * ratio, spec)
    if spec.is_codebook:
        raise ConfigError(f"{spec.where}: format kmeans has codebooks, not ranges; a clipping search or a static "
                          "range (AWQ's clipping, static activations) does not apply to it")
    if spec.format in gguf.BLOCK_TYPES:
        clip = spec.clip_ratio * ratio
        return QParams(*gguf.block_params(xmin * clip, xmax * clip, spec.format))
    absmax = torch.maximum(xmin.abs(), xmax.abs()) * (spec.clip_ratio * ratio)
    if spec.format in MX_FORMATS:
        scale = mx_shared_scale(absmax, spec.format)
    else:
        scale = absmax / grid_max(spec.format)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return QParams(scale, torch.zeros_like(scale))


def to_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Map values to codes with broadcastable scale and zero point (grid values for non-int formats)."""
    if spec.is_int:
        return integer.quantize_with(x, scale, zero, spec.maxq, integer.float_zero(spec))
    if spec.format in gguf.BLOCK_TYPES:
        return gguf.block_codes(x, scale, zero, spec.format)
    if spec.is_codebook:
        return nearest_codes(x, scale)
    return round_to_grid(x / scale, element_format(spec.format))


def values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Values of codes with broadcastable scale and zero.

    ``scale * (codes - zero)``; GGUF types with a minimum: ``scale * codes + zero``.
    """
    if spec.format in gguf.BLOCK_TYPES:
        return gguf.block_values(codes, scale, zero, spec.format)
    if spec.is_codebook:
        return codebook_values(codes, scale)
    return integer.dequantize_with(codes, scale, zero)


def _fake_view(view: torch.Tensor, qp: QParams, spec: QuantSpec) -> torch.Tensor:
    scale, zero = qp.scale[..., None], qp.zero[..., None]
    return values(to_codes(view, scale, zero, spec), scale, zero, spec)


def _mse_params(view: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> QParams:
    """Per range, the clipping ratio among ``MSE_POINTS`` in [0.5, 1] with the least squared error."""
    best = params_from_range(xmin, xmax, spec)
    best_err = (_fake_view(view, best, spec) - view).pow(2).sum(dim=-1)
    for k in range(1, MSE_POINTS):
        ratio = 1.0 - (1.0 - MSE_MIN_RATIO) * k / (MSE_POINTS - 1)
        qp = params_from_range(xmin, xmax, spec, ratio)
        err = (_fake_view(view, qp, spec) - view).pow(2).sum(dim=-1)
        better = err < best_err
        best = QParams(torch.where(better, qp.scale, best.scale), torch.where(better, qp.zero, best.zero))
        best_err = torch.where(better, err, best_err)
    return best


def choose_qparams(w: torch.Tensor, spec: QuantSpec, weights: torch.Tensor | None = None) -> QParams:
    """Choose the quantization parameters of a 2-D tensor.

    Args:
        w: Tensor (rows, cols), float.
        spec: The spec (granularity decides the shape of the result; clipping how ranges are set).
        weights: Importance of each input column (cols,) for the ``kmeans`` codebooks (e.g. the Hessian
            diagonal); ignored by the scaled formats.

    Returns:
        QParams shaped (rows, groups) for per-row and group granularities, (1, 1) per tensor; for ``kmeans``
        the codebooks (rows, 2**bits) and zeros (rows, 1).

    """
    if spec.is_codebook:
        return QParams(kmeans_codebook(w, spec.nbits, weights), torch.zeros(w.shape[0], 1, device=w.device))
    view = _grouped_view(w, spec)
    xmin, xmax = _ranges(view, spec)
    if spec.clipping == "mse":
        return _mse_params(view, xmin, xmax, spec)
    return params_from_range(xmin, xmax, spec)


def quantize(w: torch.Tensor, qp: QParams, spec: QuantSpec) -> torch.Tensor:
    """Codes of a 2-D tensor with given parameters (shape of ``w``)."""
    if spec.is_codebook:
        return nearest_codes(w, qp.scale)
    view = w.reshape(qp.scale.shape[0], qp.scale.shape[1], -1)  # (row ranges, col ranges, values)
    codes = to_codes(view, qp.scale[..., None], qp.zero[..., None], spec)
    return codes.reshape(w.shape)


def dequantize(codes: torch.Tensor, qp: QParams, spec: QuantSpec) -> torch.Tensor:
    """Values of codes produced by :func:`quantize` with the same parameters and spec."""
    if spec.is_codebook:
        return codebook_values(codes, qp.scale)
    rows, cols = codes.shape
    view = codes.reshape(qp.scale.shape[0], qp.scale.shape[1], -1)
    return values(view, qp.scale[..., None], qp.zero[..., None], spec).reshape(rows, cols)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize a 2-D tensor; ``w`` itself when the spec is full precision.

    Args:
        w: Tensor (rows, cols).
        spec: The spec.

    Returns:
        A tensor of the same shape and dtype holding the nearest grid values.

    """
    if not spec.enabled:
        return w
    wf = w.float()
    if spec.is_codebook:
        qp = choose_qparams(wf, spec)
        return dequantize(quantize(wf, qp, spec), qp, spec).to(w.dtype)
    view = _grouped_view(wf, spec)
    qp = choose_qparams(wf, spec)
    return _fake_view(view, qp, spec).reshape(w.shape).to(w.dtype)
