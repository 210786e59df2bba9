"""What every weight quantizer returns, and the Hessian accumulator shared by methods that need it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.integer import QParams
from ..quant.spec import QuantSpec


@dataclass
class WeightResult:
    """A quantized weight.

    Attributes:
        weight: Dequantized weight (out, in), float32 (or float64 when computed so).
        codes: Integer codes (out, in) as whole-number floats.
        qparams: Scales and zero points (out, groups).
        g_idx: Group index of each input column (in,), or None when groups follow the columns.

    """

    weight: torch.Tensor
    codes: torch.Tensor
    qparams: QParams
    g_idx: torch.Tensor | None = None

    def divide_rows(self, rows: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> WeightResult:
        """The same codes with output ``rows`` divided by ``s`` (their scales too: still on the grid).

        A transform that folds a scale into the rows of an already quantized linear (AWQ, SmoothQuant into
        ``v_proj``/``up_proj``) keeps it quantized this way, since ``scale * (code - zero)`` is linear in
        the scale; where ``zero`` is an additive offset (``spec.offset_zero``) it is divided too.
        """
        zero = divide_rows(self.qparams.zero, rows, s) if spec.offset_zero else self.qparams.zero
        qparams = QParams(divide_rows(self.qparams.scale, rows, s), zero)
        return WeightResult(divide_rows(self.weight, rows, s), self.codes, qparams, self.g_idx)


def divide_rows(x: torch.Tensor, rows: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` (rows, ...) with ``rows`` divided by ``s`` (one value per row), in float32 math."""
    out = x.clone()
    d = s.to(x.device, torch.float32).reshape(-1, *([1] * (x.dim() - 1)))
    out[rows] = (x[rows].float() / d).to(x.dtype)
    return out


class HessianAccumulator:
    """Running ``H = 2/n * sum x x^T`` over the input rows seen so far, kept in float32.

    Args:
        width: Input features of the layer.
        device: Where to keep H.

    """

    def __init__(self, width: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(width, width, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs (..., width); padding rows must be removed by the caller."""
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)  # (tokens, width)
        m = x.shape[0]
        if m == 0:
            return
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.t(), x)


_SYMMETRIC_BLOCK = 256
"""Column block of :func:`output_error`'s half-Hessian sum (fastest of 256..2048 at 1536 and 8960 columns)."""


def output_error(D: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``tr(D H D^T)``: the squared output error of a weight change ``D`` on inputs with Hessian ``H``.

    ``H`` is symmetric, so the sum over its blocks takes each diagonal block once and each block below the
    diagonal twice: about half the multiply-adds of ``sum((D @ H) * D)`` at thousands of columns (AWQ's
    scale search evaluates it per alpha on every linear; measured 1.7x at 1536 x 8960, one thread).
    """
    n = D.shape[-1]
    if n < 2 * _SYMMETRIC_BLOCK:
        return torch.sum((D @ H) * D)
    total = D.new_zeros(())
    for start in range(0, n, _SYMMETRIC_BLOCK):
        stop = min(start + _SYMMETRIC_BLOCK, n)
        block = D[:, start:stop]
        total += torch.sum((block @ H[start:stop, start:stop]) * block)
        if stop < n:
            total += 2.0 * torch.sum((D[:, stop:] @ H[stop:, start:stop]) * block)
    return total


def diagonal_blocks(H: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` x ``size`` blocks on ``H``'s diagonal, stacked (blocks, size, size): each range's own block."""
    return torch.stack([H[g * size : (g + 1) * size, g * size : (g + 1) * size] for g in range(H.shape[0] // size)])


def scaled_hessian(H: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Hessian of the inputs divided by ``s`` per channel: ``diag(1/s) H diag(1/s)``."""
    inv = (1.0 / s).to(H.device, H.dtype)
    return H * inv[:, None] * inv[None, :]


def relative_output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """Relative error of the layer output on the calibration inputs, from their Hessian.

    ``||X (Wq - W)^T||_F^2 / ||X W^T||_F^2 = tr(D H D^T) / tr(W H W^T)`` with ``D = Wq - W``.

    Args:
        W: Original weight (out, in).
        Wq: Quantized weight (out, in).
        H: Input Hessian (in, in), any positive multiple of X^T X.

    Returns:
        The relative squared-norm ratio's square root (a relative Frobenius error).

    """
    W = W.to(H.dtype)
    D = Wq.to(H.dtype) - W
    num = output_error(D, H)
    den = output_error(W, H)
    return float(torch.sqrt(num / den.clamp_min(1e-30)))


@dataclass
class GroupInputs:
    """What a scale transform sees of one linear group, per slot (channels tied to one scale share a slot).

    Attributes:
        act_absmax: max |x| per slot over the calibration tokens.
        act_mean: mean |x| per slot.
        weight_absmax: max |W| per slot over the group's weights.
        slot: Slot of each input channel (in,).
        weights: The group's weights (out, in) that will be quantized, after earlier transforms.
        specs: Their specs.
        H: Hessian of the group's input (in, in) after earlier transforms, or None.

    """

    act_absmax: torch.Tensor
    act_mean: torch.Tensor
    weight_absmax: torch.Tensor
    slot: torch.Tensor
    weights: list[torch.Tensor]
    specs: list[QuantSpec]
    H: torch.Tensor | None
