"""Fake quantization of runtime tensors laid out as rows (tokens), with padding left out of the ranges."""

from __future__ import annotations

import torch

from ..quant.core import choose_qparams, dequantize, fake_quantize, quantize
from ..quant.integer import QParams
from ..quant.spec import QuantSpec


def fake_quantize_rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize ``x`` (..., C) with one range per row of C values (or per group of them).

    ``spec.granularity`` ``group`` splits each row into groups of ``group_size``; any other granularity
    gives one range per row.
    """
    shape = x.shape
    out = fake_quantize(x.reshape(-1, shape[-1]), spec)
    return out.reshape(shape)


def _per_row(spec: QuantSpec) -> QuantSpec:
    return spec.replace(granularity="channel", group_size=None)


def fake_quantize_sequences(x: torch.Tensor, spec: QuantSpec, valid: torch.Tensor | None) -> torch.Tensor:
    """Fake-quantize ``x`` (B, T, ...) with one range per sequence over its real tokens.

    Args:
        x: Tensor whose first two dimensions are batch and tokens.
        spec: The grid (its granularity is ignored: one range per sequence).
        valid: Boolean (B, T) mask of real tokens, or None when every token is real.

    Returns:
        The fake-quantized tensor; padded tokens use their sequence's parameters.

    """
    row = _per_row(spec)
    flat = x.reshape(x.shape[0], -1).float()  # (B, T * rest)
    if valid is None:
        return fake_quantize(flat, row).reshape(x.shape).to(x.dtype)
    out = torch.empty_like(flat)
    for b in range(x.shape[0]):
        real = x[b][valid[b]].reshape(1, -1).float()
        qp = choose_qparams(real if real.numel() else flat[b : b + 1], row)
        out[b] = dequantize(quantize(flat[b : b + 1], qp, row), qp, row)[0]
    return out.reshape(x.shape).to(x.dtype)


def fake_quantize_over_tokens(x: torch.Tensor, spec: QuantSpec, valid: torch.Tensor | None) -> torch.Tensor:
    """Fake-quantize ``x`` (B, T, F) with one range per feature across the real tokens of each sequence.

    This is KIVI's per-channel layout for keys: each of the F features of a sequence gets its range from
    all its tokens of this call.
    """
    row = _per_row(spec)
    out = torch.empty_like(x, dtype=torch.float32)
    for b in range(x.shape[0]):
        xb = x[b].float().transpose(0, 1)  # (F, T)
        real = xb if valid is None else xb[:, valid[b]]
        qp = choose_qparams(real if real.shape[1] else xb, row)  # (F, 1)
        out[b] = dequantize(quantize(xb, qp, row), qp, row).transpose(0, 1)
    return out.to(x.dtype)


def fake_quantize_static(x: torch.Tensor, spec: QuantSpec, qp: QParams) -> torch.Tensor:
    """Fake-quantize ``x`` of any shape with one fixed (1, 1) range."""
    flat = x.reshape(1, -1).float()
    row = _per_row(spec)
    return dequantize(quantize(flat, qp, row), qp, row).reshape(x.shape).to(x.dtype)
