"""AWQ: activation-aware scales (a transform) and an output-aware clipping search (a quantizer).

Scale search: for the linears that read one activation, ``s = mean|x|^alpha`` per input channel
(normalised so that ``sqrt(max(s) min(s)) = 1``), alpha on a grid of ``grid`` points in [0, 1); the
alpha whose quantized group has the least output error on the calibration inputs wins. The output error
of a weight ``W`` with quantized ``Q`` is ``tr((Q - W) H (Q - W)^T)`` with the inputs' Hessian ``H``, so
no activations need to be kept; for the scaled weight ``W s`` on the inputs ``x / s`` it is that of
``Q(W s) / s - W`` on ``x``. The scale folds into the op before the group like SmoothQuant's.

Clipping search: per quantization range (a row, or a group of a row), the maximum is shrunk by factors
from 1 down to ``max_shrink`` and the factor with the least output error (the range's block of H) is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..quant.core import choose_qparams, dequantize, fake_quantize, params_from_range, quantize
from ..quant.integer import QParams
from ..quant.spec import QuantSpec
from .base import GroupInputs, WeightResult, diagonal_blocks, output_error
from .rtn import round_with


@dataclass(frozen=True)
class AWQConfig:
    """Options of AWQ.

    Attributes:
        grid: Number of alpha points in [0, 1) (and of clipping points).
        clip: Run the clipping search when AWQ is also the quantizer.
        max_shrink: Smallest clipping factor of the range's maximum.

    """

    grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5

    def __post_init__(self) -> None:
        """Check the options."""
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ConfigError(f"awq.grid={self.grid!r} must be a positive integer")
        if not 0.0 < self.max_shrink <= 1.0:
            raise ConfigError(f"awq.max_shrink={self.max_shrink} must be in (0, 1]")


class AWQScale:
    """The scale-search half of AWQ (a layer transform); its clipping search is the default quantizer."""

    kind: ClassVar[str] = "layer_transform"
    needs_calibration: ClassVar[bool] = True

    def __init__(self, config: AWQConfig | None = None) -> None:
        """Create the search with ``config``."""
        self.config = config or AWQConfig()

    def default_quantizer(self) -> AWQClip:
        """AWQ's clipping search, the quantizer when the recipe names none."""
        return AWQClip(self.config)

    def slot_scales(self, group: GroupInputs) -> torch.Tensor:
        """Scales per slot of one linear group (ones when nothing in it is quantized)."""
        n = int(group.slot.max()) + 1
        if not group.weights or group.H is None:
            return torch.ones(n, device=group.act_mean.device)
        return self.search(group.act_mean, group.weights, group.specs, group.H, group.slot)

    def search(
        self,
        act_mean: torch.Tensor,
        weights: Sequence[torch.Tensor],
        specs: Sequence[QuantSpec],
        H: torch.Tensor,
        slot: torch.Tensor,
    ) -> torch.Tensor:
        """Return per-slot scales minimising the group's quantized output error.

        Args:
            act_mean: Mean |x| per slot.
            weights: The group's quantized weights (out, in), before any scaling.
            specs: Their specs.
            H: Hessian of the group's input (in, in).
            slot: Slot of each input channel.

        Returns:
            Scales per slot (ones when no alpha beats leaving the weights as they are).

        """
        n = int(slot.max()) + 1
        best, best_err = torch.ones(n, device=H.device), float("inf")
        base = act_mean.float().clamp_min(1e-8).to(H.device)
        for k in range(self.config.grid):
            alpha = k / self.config.grid
            s_slot = base.pow(alpha)
            s_slot = s_slot / (s_slot.max() * s_slot.min()).sqrt()
            s = s_slot[slot.to(H.device)]
            err = 0.0
            for W, spec in zip(weights, specs, strict=True):
                Ws = W.float().to(H.device) * s[None, :]
                # the scaled weight's error on the scaled inputs, as the error of Q(W s)/s - W on the inputs:
                # out x in divisions per alpha instead of rescaling H (in x in) for each alpha
                err += float(output_error((fake_quantize(Ws, spec) - Ws) / s[None, :], H))
            if err < best_err:
                best, best_err = s_slot, err
        return best


class AWQClip:
    """The clipping-search half of AWQ: RTN whose ranges are shrunk to minimise the output error (a quantizer)."""

    kind: ClassVar[str] = "quantizer"
    needs_calibration: ClassVar[bool] = True
    permutes_columns: ClassVar[bool] = False
    min_tokens: ClassVar[int] = 1

    def __init__(self, config: AWQConfig | None = None) -> None:
        """Create the quantizer with ``config``."""
        self.config = config or AWQConfig()

    def check_spec(self, spec: QuantSpec) -> None:
        """Every format with ranges (codebooks are refused with the recipe: see ``compile``)."""

    def quantize(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None) -> WeightResult:
        """Quantize ``W`` (out, in) with per-range clipping chosen on the output error.

        Args:
            W: Weight (out, in).
            spec: Its spec.
            H: Input Hessian (in, in); without it (or with ``clip: false``) plain min-max RTN.

        Returns:
            The quantized weight, codes and parameters.

        """
        Wf = W.detach().float()
        if H is not None and self.config.clip and spec.granularity in ("channel", "group"):
            return round_with(Wf, self._search(Wf, spec, H.float().to(Wf.device)), spec)
        return round_with(Wf, choose_qparams(Wf, spec), spec)

    def _search(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor) -> QParams:
        rows, cols = W.shape
        groups = spec.num_groups(cols)
        gs = cols // groups
        view = W.reshape(rows, groups, gs)
        blocks = diagonal_blocks(H, gs)  # (G, gs, gs)
        xmin, xmax = view.amin(dim=-1), view.amax(dim=-1)
        best = params_from_range(xmin, xmax, spec)
        best_err = torch.full((rows, groups), float("inf"), device=W.device)
        steps = self.config.grid
        for k in range(steps):
            ratio = 1.0 - (1.0 - self.config.max_shrink) * k / max(1, steps - 1)
            qp = params_from_range(xmin, xmax, spec, ratio)
            D = dequantize(quantize(W, qp, spec), qp, spec).reshape(rows, groups, gs) - view
            err = torch.einsum("rgi,gij,rgj->rg", D, blocks, D)
            better = err < best_err
            best = QParams(torch.where(better, qp.scale, best.scale), torch.where(better, qp.zero, best.zero))
            best_err = torch.where(better, err, best_err)
        return best
