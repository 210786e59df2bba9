"""LoRC (ZeroQuant-V2): low-rank compensation of a quantized weight's error.

After any quantizer, ``E = W - Q(W)`` is approximated by its truncated SVD ``U_r S_r V_r^T``; the layer
keeps ``A = U_r S_r^(1/2)`` (out, r) and ``B = S_r^(1/2) V_r^T`` (r, in), in FP16 or themselves quantized
(INT8 per row by default), and its forward adds ``x B^T A^T``. In fake quantization that sum is folded
into the weight, ``Q(W) + A B``, which gives the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..quant.core import fake_quantize
from ..quant.size import SCALE_BITS
from ..quant.spec import FULL_PRECISION_BITS, QuantSpec
from ..threads import single_thread
from .base import WeightResult


@dataclass(frozen=True)
class LoRCConfig:
    """Options of LoRC.

    Attributes:
        rank: Rank r of the correction (0 changes nothing).
        factor_bits: Bits of the factors: 2..8 (symmetric INT per row) or 16 (kept in full precision).

    """

    rank: int = 8
    factor_bits: int = 8

    def __post_init__(self) -> None:
        """Check the options."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ConfigError(f"lorc.rank={self.rank!r} must be a non-negative integer")
        if self.factor_bits != FULL_PRECISION_BITS and not 2 <= self.factor_bits <= 8:
            raise ConfigError(f"lorc.factor_bits={self.factor_bits} must be 2..8, or 16 for full precision")


class LoRC:
    """Low-rank compensation of a quantized weight (a compensator)."""

    kind: ClassVar[str] = "compensator"
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: LoRCConfig | None = None) -> None:
        """Create LoRC with ``config`` (rank 8, INT8 factors by default)."""
        self.config = config or LoRCConfig()

    def check_shape(self, module: str, rows: int, cols: int) -> None:
        """Raise ConfigError when the rank exceeds ``min(rows, cols)`` of a module."""
        if self.config.rank > min(rows, cols):
            raise ConfigError(
                f"lorc.rank={self.config.rank} is above min(d_out, d_in) = {min(rows, cols)} of module {module}"
            )

    def extra_bits(self, rows: int, cols: int) -> int:
        """Bits the factors of a (rows, cols) weight add: codes plus one FP16 scale per factor row."""
        r = self.config.rank
        if r == 0:
            return 0
        bits = self.config.factor_bits
        scales = 0 if bits == FULL_PRECISION_BITS else (rows + r) * SCALE_BITS
        return r * (rows + cols) * bits + scales

    def factors(self, error: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (possibly quantized) factors ``A`` (out, r) and ``B`` (r, in) of ``error``."""
        r = self.config.rank
        with single_thread():  # LAPACK's result would depend on the thread count
            U, S, Vh = torch.linalg.svd(error.float(), full_matrices=False)  # exact; randomized SVD misses flat spectra
        root = S[:r].sqrt()
        A, B = U[:, :r] * root, root[:, None] * Vh[:r]
        if self.config.factor_bits != FULL_PRECISION_BITS:
            spec = QuantSpec(bits=self.config.factor_bits, symmetric=True, granularity="channel", where="lorc")
            A, B = fake_quantize(A, spec), fake_quantize(B, spec)
        return A, B

    def compensate(self, W: torch.Tensor, result: WeightResult) -> WeightResult:
        """Add the low-rank correction of ``W - result.weight`` to the quantized weight.

        Args:
            W: The weight before quantization (out, in).
            result: The quantizer's result.

        Returns:
            The result with ``weight = Q(W) + A B`` (codes and parameters of ``Q(W)`` kept).

        """
        if self.config.rank == 0:
            return result
        A, B = self.factors(W.float() - result.weight.float())
        weight = result.weight + (A @ B).to(result.weight.dtype)
        return WeightResult(weight=weight, codes=result.codes, qparams=result.qparams, g_idx=result.g_idx)
