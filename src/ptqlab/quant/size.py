"""Honest storage accounting: bits of codes plus scales, zero points and shared exponents."""

from __future__ import annotations

from .formats import MX_FORMATS
from .gguf import BLOCK_TYPES
from .spec import FULL_PRECISION_BITS, QuantSpec

SCALE_BITS = 16
E8M0_BITS = 8


def param_bits_per_range(spec: QuantSpec) -> int:
    """Bits of the parameters each range stores: an FP16 scale (E8M0 for MX) and the zero point if any."""
    if spec.format in MX_FORMATS:
        return E8M0_BITS
    if spec.format in BLOCK_TYPES:
        return BLOCK_TYPES[spec.format].param_bits
    if spec.is_codebook:  # one FP16 centroid per code, per row
        return SCALE_BITS << spec.nbits
    if not spec.is_int or spec.symmetric:
        return SCALE_BITS
    return SCALE_BITS + (spec.nbits if spec.zero_point == "int" else SCALE_BITS)


def weight_storage_bits(spec: QuantSpec | None, rows: int, cols: int) -> int:
    """Bits needed to store a (rows, cols) weight: codes and per-range parameters (FP16 when not quantized).

    Args:
        spec: The weight's spec, or None for full precision.
        rows: Output features.
        cols: Input features.

    Returns:
        Total bits.

    """
    if spec is None or not spec.enabled:
        return FULL_PRECISION_BITS * rows * cols
    if spec.granularity == "tensor":
        ranges = 1
    elif spec.granularity == "group" and spec.group_size:
        ranges = rows * (cols // spec.group_size)
    else:
        ranges = rows
    return spec.nbits * rows * cols + ranges * param_bits_per_range(spec)


def bits_per_element(spec: QuantSpec, range_size: int) -> float:
    """Effective bits per element of a runtime tensor whose ranges hold ``range_size`` elements each."""
    if not spec.enabled:
        return float(FULL_PRECISION_BITS)
    return spec.nbits + param_bits_per_range(spec) / max(1, range_size)
