"""llama.cpp's GGUF block types as weight formats: the grid a GGUF file holds, so a method rounds to it.

A weight in format ``gguf_q4_0`` (and the others below) is quantized in blocks of 32 consecutive input
columns of a row, with the block's parameters in FP16 as llama.cpp stores them. Because the scales are
FP16 values and the codes integers, ``scale * (code - zero)`` (symmetric types) and ``scale * code + zero``
(types with a minimum) are exact in float32, the same products llama.cpp and gguf-py's dequantizers form:
a GGUF file written from a run's codes gives back every weight the run evaluated.

Types (``value`` of code ``q``):

- ``gguf_q8_0`` (Q8_0): ``d * (q - 128)``, ``d = fp16(absmax / 127)``; 8.5 bits per weight.
- ``gguf_q4_0`` (Q4_0), ``gguf_q5_0`` (Q5_0): ``d * (q - 2**(b-1))`` with ``d = fp16(m / -2**(b-1))``, where
  ``m`` is the block's value of largest magnitude (llama.cpp's rule: that value gets the code 0); 4.5 / 5.5 bits.
- ``gguf_q4_1`` (Q4_1), ``gguf_q5_1`` (Q5_1): ``d * q + m``, ``d = fp16((max - min) / (2**b - 1))``,
  ``m = fp16(min)``; 5.0 / 6.0 bits.
- ``gguf_q4_k`` (Q4_K): super-blocks of 256 columns, eight blocks of 32 with a 6-bit scale ``sc`` and
  6-bit minimum ``mn`` each, and two FP16 factors per super-block: ``value = (d * sc) * q - dmin * mn``.
  The blocks' min-max scales ``s`` and minimums ``-min(min, 0)`` set ``d = fp16(max s / 63)`` and
  ``dmin = fp16(max mn / 63)``; the largest of each gets 63 (so a writer reads ``d`` back as
  ``max(d * sc) / 63``), the others ``round(s / d)``. 4.5 bits per weight.

In the (scale, zero) pairs the quantizers pass around, ``scale`` is the block's step (``d``, or ``d * sc``
for Q4_K) and ``zero`` is the integer zero point for the symmetric types and the additive offset (``m``, or
``-dmin * mn``) for the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32
"""Columns per GGUF block."""

SUPER_BLOCK = 256
"""Columns per K-quant super-block (llama.cpp's QK_K)."""

_SUB_MAX = 63  # largest 6-bit Q4_K sub-block scale or minimum


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type as a weight format.

    Attributes:
        ggml: llama.cpp's name of the type (``Q4_0``, ...), as in ``gguf.GGMLQuantizationType``.
        bits: Bits per code.
        symmetric: Codes around a fixed zero point (no minimum stored).
        span: Columns whose parameters are chosen together (a block, or a K super-block).
        param_bits: Bits of parameters per block of 32 (FP16 scale, FP16 minimum, or Q4_K's share).

    """

    ggml: str
    bits: int
    symmetric: bool
    span: int
    param_bits: int

    @property
    def maxq(self) -> int:
        """Largest code."""
        return (1 << self.bits) - 1


BLOCK_TYPES: dict[str, BlockType] = {
    "gguf_q8_0": BlockType("Q8_0", 8, True, BLOCK, 16),
    "gguf_q4_0": BlockType("Q4_0", 4, True, BLOCK, 16),
    "gguf_q5_0": BlockType("Q5_0", 5, True, BLOCK, 16),
    "gguf_q4_1": BlockType("Q4_1", 4, False, BLOCK, 32),
    "gguf_q5_1": BlockType("Q5_1", 5, False, BLOCK, 32),
    "gguf_q4_k": BlockType("Q4_K", 4, False, SUPER_BLOCK, 16),  # (2 x 6 bits) + (2 x 16 bits) / 8 blocks
}
"""The GGUF weight formats, by ptqlab format name."""

GGUF_BITS: dict[str, int] = {name: t.bits for name, t in BLOCK_TYPES.items()}
"""Bits per code of each GGUF format (its parameters are counted by :attr:`BlockType.param_bits`)."""


def fp16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to FP16 and back to float32 (the parameters a GGUF block can store)."""
    return x.to(torch.float16).to(torch.float32)


def block_params(xmin: torch.Tensor, xmax: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (or offset) of each block from its range, per the module docstring's rules.

    Args:
        xmin: Minimum of each block of 32, shaped (..., blocks); for Q4_K the blocks of a super-block are
            consecutive along the last dimension (a multiple of 8).
        xmax: Maximum of each block (same shape).
        fmt: A format of :data:`BLOCK_TYPES`.

    Returns:
        ``(scale, zero)`` as float32, shaped like ``xmin``.

    """
    t = BLOCK_TYPES[fmt]
    xmin, xmax = xmin.float(), xmax.float()
    if t.ggml == "Q4_K":
        return _k_params(xmin, xmax)
    if t.symmetric:
        half = 1 << (t.bits - 1)
        if t.bits == 8:
            d = torch.maximum(xmin.abs(), xmax.abs()) / 127
        else:
            d = torch.where(xmax >= -xmin, xmax, xmin) / -half
        d = fp16(d)
        return torch.where(d == 0, torch.ones_like(d), d), torch.full_like(d, float(half))
    d = fp16((xmax - xmin) / t.maxq)
    return torch.where(d == 0, torch.ones_like(d), d), fp16(xmin)


def _k_params(xmin: torch.Tensor, xmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K: each super-block's FP16 ``d`` and ``dmin`` with 6-bit sub-block factors (see the docstring)."""
    shape = xmin.shape
    lo = torch.clamp(xmin, max=0).reshape(*shape[:-1], -1, SUPER_BLOCK // BLOCK)
    eff, _ = _six_bit((xmax.reshape(lo.shape) - lo) / BLOCK_TYPES["gguf_q4_k"].maxq)
    offset, _ = _six_bit(-lo)
    return eff.reshape(shape), (-offset).reshape(shape)


def _six_bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative per-block values as ``fp16(max / 63) * k`` with ``k`` in 0..63; the largest gets 63."""
    top = values.amax(dim=-1, keepdim=True)
    d = fp16(top / _SUB_MAX)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    k = torch.clamp(torch.round(values / safe), 0, _SUB_MAX)
    k = torch.where(values == top, torch.full_like(k, _SUB_MAX), k)
    k = torch.where(d == 0, torch.zeros_like(k), k)
    return d * k, d


def block_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: str) -> torch.Tensor:
    """Codes of ``x`` (broadcastable with ``scale`` and ``zero``): the nearest point of each block's grid."""
    t = BLOCK_TYPES[fmt]
    if t.symmetric:
        return torch.clamp(torch.round(x / scale) + zero, 0, t.maxq)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.clamp(torch.round((x - zero) / safe), 0, t.maxq)
    return torch.where(scale == 0, torch.zeros_like(codes), codes)


def block_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: str) -> torch.Tensor:
    """Values of codes: ``scale * (codes - zero)`` (symmetric types) or ``scale * codes + zero``."""
    if BLOCK_TYPES[fmt].symmetric:
        return scale * (codes - zero)
    return scale * codes + zero


def k_superblock_factors(step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a Q4_K super-block factor and the 6-bit sub-block values back from the products.

    Args:
        step: Per-block products ``d * k`` (or ``dmin * mn``), shaped (..., 8) for the eight blocks of each
            super-block, as :func:`block_params` made them.

    Returns:
        ``(d, k)``: the FP16 factor (..., 1) and integer factors (..., 8), with ``d * k == step`` exactly.

    Raises:
        ValueError: ``step`` is not of that form (a weight moved off the grid after quantization).

    """
    d = step.amax(dim=-1, keepdim=True) / _SUB_MAX
    safe = torch.where(d == 0, torch.ones_like(d), d)
    k = torch.round(step / safe)
    if not (torch.equal(fp16(d), d) and torch.equal(d * k, step) and bool(((k >= 0) & (k <= _SUB_MAX)).all())):
        raise ValueError("Q4_K block steps are not an FP16 factor times 6-bit integers")
    return d, k
