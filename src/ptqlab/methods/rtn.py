"""Round-to-nearest (RTN): min-max grid per range, no calibration data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..quant.core import choose_qparams, dequantize, quantize
from ..quant.integer import QParams
from ..quant.spec import QuantSpec
from .base import WeightResult


@dataclass(frozen=True)
class RTNConfig:
    """RTN has no knobs; range setting lives in the QuantSpec."""


class RTN:
    """Quantize each weight to the nearest point of its min-max grid (a quantizer)."""

    kind: ClassVar[str] = "quantizer"
    needs_calibration: ClassVar[bool] = False
    permutes_columns: ClassVar[bool] = False
    min_tokens: ClassVar[int] = 1

    def __init__(self, config: RTNConfig | None = None) -> None:
        self.config = config or RTNConfig()

    def check_spec(self, spec: QuantSpec) -> None:
        """Every weight format: nothing to refuse."""

    def quantize(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None) -> WeightResult:
        """Quantize ``W`` (out, in) with min-max parameters.

        Args:
            W: Weight matrix (out_features, in_features).
            spec: Weight quantization spec.
            H: Ignored (RTN uses no data).

        Returns:
            The dequantized weight (float32), codes and parameters.

        """
        Wf = W.detach().float()
        return round_with(Wf, choose_qparams(Wf, spec), spec)


def round_with(W: torch.Tensor, qp: QParams, spec: QuantSpec) -> WeightResult:
    """Round ``W`` (out, in) float32 to the nearest grid points of the given parameters."""
    codes = quantize(W, qp, spec)
    return WeightResult(weight=dequantize(codes, qp, spec), codes=codes, qparams=qp)
