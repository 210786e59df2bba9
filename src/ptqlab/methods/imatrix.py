"""Importance-weighted scale search on llama.cpp's block types (llama-quantize's use of an importance matrix).

RTN takes each block's parameters from its range (the largest magnitude for Q4_0, min and max for Q4_1); with
an importance matrix llama-quantize instead searches each block's step for the least importance-weighted squared
error. This quantizer does that search on the calibration Hessian ``H``: for each block of 32 columns of a row,
candidate steps around the range's step (factors in ``[1 - span, 1 + span]``, ``grid`` of them) round the block,
the step (and, for the types that store one, the minimum) is then refitted to those codes by weighted least
squares, rounded to FP16 as the block stores it, and the block rounded again with it. The candidate with the
least weighted error wins. The range's own parameters (what RTN takes) are a candidate, so no block ends worse
than RTN on the objective.

The weighted error of a block's change ``e`` (32 values) is, with ``weighting``:

- ``diagonal`` (default): ``sum_j H_jj e_j^2``, each column weighted by its mean square input on the calibration
  tokens: llama.cpp's importance matrix;
- ``block``: ``e^T H_b e`` with the block's 32 x 32 block ``H_b`` of the Hessian: the block's output error with the
  correlations between its columns.

Formats: the 32-column block types ``gguf_q8_0``, ``gguf_q5_0``, ``gguf_q4_0`` (a step around the fixed zero
point) and ``gguf_q5_1``, ``gguf_q4_1`` (step and minimum). Q4_K's 6-bit sub-block scales are not searched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..errors import ConfigError
from ..quant import gguf
from ..quant.integer import QParams
from ..quant.spec import QuantSpec
from .base import WeightResult, diagonal_blocks
from .rtn import round_with

SEARCHED = ("gguf_q8_0", "gguf_q5_0", "gguf_q4_0", "gguf_q5_1", "gguf_q4_1")
"""The weight formats the search works on."""

_Inner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class IMatrixConfig:
    """Options of the importance-weighted scale search.

    Attributes:
        grid: Candidate steps per block.
        span: The candidates' factors of the range's step lie in ``[1 - span, 1 + span]``.
        weighting: ``diagonal`` (the Hessian's diagonal: llama.cpp's importance matrix) or ``block`` (the
            block's 32 x 32 block of the Hessian).

    """

    grid: int = 21
    span: float = 0.2
    weighting: Literal["diagonal", "block"] = "diagonal"

    def __post_init__(self) -> None:
        """Check the options."""
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ConfigError(f"imatrix.grid={self.grid!r} must be a positive integer")
        if not 0.0 <= self.span < 1.0:
            raise ConfigError(f"imatrix.span={self.span} must be in [0, 1)")
        if self.weighting not in ("diagonal", "block"):
            raise ConfigError(f"imatrix.weighting={self.weighting!r} must be 'diagonal' or 'block'")


class IMatrix:
    """Round each block with the step (and minimum) of least weighted error on the calibration data (a quantizer)."""

    kind: ClassVar[str] = "quantizer"
    needs_calibration: ClassVar[bool] = True
    permutes_columns: ClassVar[bool] = False
    min_tokens: ClassVar[int] = 1

    def __init__(self, config: IMatrixConfig | None = None) -> None:
        """Create the quantizer with ``config``."""
        self.config = config or IMatrixConfig()

    def check_spec(self, spec: QuantSpec) -> None:
        """Refuse a weight format other than the 32-column GGUF block types.

        Raises:
            ConfigError: The format is not one of :data:`SEARCHED`.

        """
        if spec.format not in SEARCHED:
            raise ConfigError(f"recipe imatrix searches the steps of llama.cpp's 32-column block types: set "
                              f"{spec.where}.format to one of {', '.join(SEARCHED)} (it is {spec.format!r}; "
                              "Q4_K's sub-block scales are not searched)")

    def quantize(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None) -> WeightResult:
        """Quantize ``W`` (out, in) block by block with the searched parameters.

        Args:
            W: Weight (out, in); ``in`` a multiple of 32.
            spec: Its spec, a format of :data:`SEARCHED`.
            H: Input Hessian (in, in); without it every column weighs the same.

        Returns:
            The quantized weight, codes and the blocks' parameters.

        """
        self.check_spec(spec)
        Wf = W.detach().float()
        rows, cols = Wf.shape
        blocks = cols // gguf.BLOCK
        x = Wf.reshape(rows, blocks, gguf.BLOCK)
        inner = self._inner(H, blocks, Wf.device)
        qp = _search(x, spec.format, inner, self._factors())
        return round_with(Wf, qp, spec)

    def _factors(self) -> list[float]:
        c = self.config
        if c.grid == 1:
            return [1.0]
        return [1.0 - c.span + 2.0 * c.span * k / (c.grid - 1) for k in range(c.grid)]

    def _inner(self, H: torch.Tensor | None, blocks: int, device: torch.device) -> _Inner:
        """The weighted inner product of two (rows, blocks, 32) tensors, per block: ``a^T M b``."""
        n = gguf.BLOCK
        if H is None:
            return lambda a, b: (a * b).sum(-1)
        Hf = H.float().to(device)
        if self.config.weighting == "diagonal":
            w = Hf.diagonal().reshape(blocks, n)
            w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))  # a silent block: plain MSE
            return lambda a, b: (a * b * w).sum(-1)
        M = diagonal_blocks(Hf, n)
        return lambda a, b: torch.einsum("rgi,gij,rgj->rg", a, M, b)


def _search(x: torch.Tensor, fmt: str, inner: _Inner, factors: list[float]) -> QParams:
    """Each block's parameters of least weighted error among the candidates (see the module docstring)."""
    t = gguf.BLOCK_TYPES[fmt]
    base_scale, base_zero = gguf.block_params(x.amin(-1), x.amax(-1), fmt)
    best_scale, best_zero = base_scale, base_zero
    best = _error(x, base_scale, base_zero, fmt, inner)
    for r in factors:
        scale = gguf.fp16(base_scale * r)
        scale = torch.where(scale == 0, base_scale, scale)
        codes = gguf.block_codes(x, scale[..., None], base_zero[..., None], fmt)
        fitted = _refit_symmetric(x, codes, scale, base_zero, inner) if t.symmetric else \
            _refit_offset(x, codes, scale, base_zero, inner)
        for s, z in ((scale, base_zero), fitted):
            err = _error(x, s, z, fmt, inner)
            better = err < best
            best_scale, best_zero = torch.where(better, s, best_scale), torch.where(better, z, best_zero)
            best = torch.where(better, err, best)
    return QParams(best_scale, best_zero)


def _error(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: str, inner: _Inner) -> torch.Tensor:
    """The weighted squared error of rounding ``x`` with ``(scale, zero)``, per block."""
    s, z = scale[..., None], zero[..., None]
    e = gguf.block_values(gguf.block_codes(x, s, z, fmt), s, z, fmt) - x
    return inner(e, e)


def _refit_symmetric(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     inner: _Inner) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP16 step of least weighted error for fixed codes around the fixed zero point: ``c'Mx / c'Mc``."""
    c = codes - zero[..., None]
    den = inner(c, c)
    fitted = gguf.fp16(inner(c, x) / torch.where(den > 0, den, torch.ones_like(den)))
    ok = (den > 0) & (fitted != 0) & torch.isfinite(fitted)
    return torch.where(ok, fitted, scale), zero


def _refit_offset(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                  inner: _Inner) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP16 step and minimum of least weighted error for fixed codes (a 2 x 2 weighted least squares)."""
    one = torch.ones_like(x)
    cc, c1, ones = inner(codes, codes), inner(codes, one), inner(one, one)
    cx, x1 = inner(codes, x), inner(x, one)
    det = cc * ones - c1 * c1
    safe = torch.where(det.abs() > 1e-12 * (cc * ones).abs().clamp_min(1e-30), det, torch.ones_like(det))
    d = gguf.fp16((cx * ones - c1 * x1) / safe)
    m = gguf.fp16((cc * x1 - c1 * cx) / safe)
    ok = (safe == det) & (d > 0) & torch.isfinite(d) & torch.isfinite(m)
    return torch.where(ok, d, scale), torch.where(ok, m, offset)
