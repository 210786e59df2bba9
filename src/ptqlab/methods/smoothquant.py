"""SmoothQuant: migrate activation outliers into the weights with a per-input-channel scale.

For the linears that read one activation X, ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``; the input
is divided by ``s`` (folded into the op before the group) and the weights' input columns multiplied by
it, so the float function is unchanged while X becomes easier to quantize.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from .base import GroupInputs

EPS = 1e-5


@dataclass(frozen=True)
class SmoothQuantConfig:
    """Options of SmoothQuant.

    Attributes:
        alpha: Migration strength in [0, 1] (0: nothing moves to the weights; 0.5 for OPT/BLOOM).

    """

    alpha: float = 0.5

    def __post_init__(self) -> None:
        """Check alpha."""
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"smoothquant.alpha={self.alpha!r} must be in [0, 1]")


class SmoothQuant:
    """A layer transform: scales chosen from activation and weight ranges, folded so the FP output is kept."""

    kind: ClassVar[str] = "layer_transform"
    needs_calibration: ClassVar[bool] = True

    def __init__(self, config: SmoothQuantConfig | None = None) -> None:
        """Create SmoothQuant with ``config``."""
        self.config = config or SmoothQuantConfig()

    def scales(self, act_absmax: torch.Tensor, weight_absmax: torch.Tensor) -> torch.Tensor:
        """Per-channel scales ``s`` (the input is divided by s, weight columns multiplied by it).

        Args:
            act_absmax: max |X_j| over the calibration tokens, per input channel (or per tied slot).
            weight_absmax: max |W_ij| over the group's rows, per input channel (or slot).

        Returns:
            Positive scales; 1 where a channel never saw a nonzero activation or weight.

        """
        a = self.config.alpha
        act = act_absmax.float().clamp_min(EPS)
        w = weight_absmax.float().clamp_min(EPS)
        s = act.pow(a) / w.pow(1.0 - a)
        dead = (act_absmax <= 0) | (weight_absmax <= 0)
        return torch.where(dead, torch.ones_like(s), s).clamp_min(EPS)

    def default_quantizer(self) -> None:
        """SmoothQuant brings no quantizer of its own (RTN when the recipe names none)."""
        return None

    def slot_scales(self, group: GroupInputs) -> torch.Tensor:
        """Scales per slot of one linear group."""
        return self.scales(group.act_absmax, group.weight_absmax)
