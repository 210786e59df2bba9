"""LLM.int8-style outlier decomposition (Dettmers et al., 2022): which input columns stay in FP16.

A linear's input columns (features) whose activation magnitude exceeds a threshold, or the top fraction
of them by magnitude, are computed in FP16: those columns of the input and of the weight are not
quantized; every other column is quantized by the scheme's specs. The columns are chosen once per linear
input from the calibration activations (their largest magnitude over the calibration tokens), so the
weight's FP16 columns are fixed (LLM.int8 chooses per batch at inference; with a fixed weight only a
fixed set can be FP16 in the weight too).

Storage, counted in the effective bits: each FP16 column of a weight costs 16 bits per row instead of the
codes, plus a 32-bit column index; each FP16 activation element 16 bits instead of the spec's bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError

INDEX_BITS = 32
"""Bits of the stored index of each FP16 column."""


@dataclass(frozen=True)
class OutlierRule:
    """How outlier columns are chosen.

    Attributes:
        threshold: A column is an outlier when its largest input magnitude exceeds this (6.0 in LLM.int8).
        fraction: When set, the top ``fraction`` of a linear's input columns by magnitude instead (at least
            one column).

    """

    threshold: float = 6.0
    fraction: float | None = None

    def __post_init__(self) -> None:
        """Check the rule (ConfigError naming the field)."""
        if not self.threshold > 0:
            raise ConfigError(f"scheme.outliers.threshold={self.threshold} must be > 0 (a magnitude above which "
                              "an input column stays in FP16)")
        if self.fraction is not None and not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"scheme.outliers.fraction={self.fraction} must be in (0, 1)")

    def select(self, absmax: torch.Tensor) -> torch.Tensor:
        """The outlier columns (bool, like ``absmax``) from each column's largest magnitude."""
        if self.fraction is None:
            return absmax > self.threshold
        k = max(1, math.ceil(self.fraction * absmax.numel()))
        order = torch.argsort(absmax, descending=True, stable=True)
        keep = torch.zeros_like(absmax, dtype=torch.bool)
        keep[order[:k]] = True
        return keep


def outlier_weight_bits(spec_bits: int, rows: int, kept: int) -> int:
    """Bits a weight's ``kept`` FP16 columns add over their codes (16 per element minus the code, plus the index)."""
    return kept * (rows * (16 - spec_bits) + INDEX_BITS)
