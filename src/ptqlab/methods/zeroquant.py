"""ZeroQuant layer-wise knowledge distillation (LKD): train quantized weights with a straight-through estimator.

ZeroQuant-Local trains each decoder layer's quantized weights so that the layer's output matches the FP
layer's output on the same calibration inputs; ZeroQuant-Global trains the whole quantized model against
the FP model's logits. Either starts from the recipe's quantizer (RTN or GPTQ): its scales and zero
points stay fixed, the latent weights move, and the forward sees their fake-quantized values
(``w + (Q(w) - w).detach()``). This module holds the pure parts: options and the STE parametrization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..quant.core import to_codes
from ..quant.integer import QParams
from ..quant.spec import QuantSpec

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class LKDConfig:
    """Options of ZeroQuant-Local / ZeroQuant-Global.

    Attributes:
        steps: Optimizer steps (per layer for local, for the model for global).
        lr: Learning rate.
        optimizer: ``adam`` or ``sgd``.

    A step trains on one calibration chunk (``calibration.batch_size`` windows). The iterate with the
    least loss on the first chunk is kept (the start included), so distillation never makes it worse there.
    """

    steps: int = 50
    lr: float = 1e-4
    optimizer: str = "adam"

    def __post_init__(self) -> None:
        """Check the options."""
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"zeroquant.steps={self.steps!r} must be a non-negative integer")
        if not isinstance(self.lr, int | float) or self.lr <= 0:
            raise ConfigError(f"zeroquant.lr={self.lr!r} must be positive")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"zeroquant.optimizer={self.optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}")

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The configured optimizer over ``params``."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr)
        return torch.optim.Adam(params, lr=self.lr)


class ZeroQuantLocal:
    """Marker step of a recipe: distil each layer after its quantizer (see :mod:`ptqlab.pipeline.distill`)."""

    needs_calibration = True

    def __init__(self, config: LKDConfig | None = None) -> None:
        """Create the step with ``config``."""
        self.config = config or LKDConfig()


class ZeroQuantGlobal(ZeroQuantLocal):
    """Marker step: distil the whole quantized model against the FP model's logits after the layer loop."""


def per_column(qp: QParams, cols: int, g_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand (rows, groups) parameters to one scale and zero per weight (rows, cols)."""
    groups = qp.scale.shape[1]
    if g_idx is None:
        g_idx = torch.arange(cols, device=qp.scale.device) // (cols // groups)
    idx = g_idx.to(qp.scale.device)
    return qp.scale[:, idx], qp.zero[:, idx]


class STEFakeQuant(nn.Module):
    """Parametrization ``w -> w + (Q(w) - w).detach()`` with fixed per-weight scale and zero point.

    Args:
        spec: The grid.
        scale: (out, in) scales.
        zero: (out, in) zero points.
        transposed: True when the stored parameter is (in, out) (GPT-2's Conv1D).

    """

    def __init__(self, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor, transposed: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.transposed = transposed
        self.register_buffer("scale", scale.t().contiguous() if transposed else scale)
        self.register_buffer("zero", zero.t().contiguous() if transposed else zero)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The fake-quantized weight, with the identity as its gradient."""
        scale, zero = self.get_buffer("scale"), self.get_buffer("zero")
        q = scale * (to_codes(w.float(), scale, zero, self.spec) - zero)
        return w + (q.to(w.dtype) - w).detach()
