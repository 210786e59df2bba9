"""ZeroQuant layer-wise knowledge distillation (LKD): train quantized weights with a straight-through estimator.

ZeroQuant-Local (a layer refiner) trains each decoder layer's quantized weights so that the layer's
output matches the FP layer's output on the same calibration inputs (mean squared error);
ZeroQuant-Global (a model refiner) trains every quantized weight of the model so that its logits match
the FP model's (KL). Either starts from the recipe's quantizer (RTN or GPTQ): its scales and zero points
stay fixed, the latent weights move, and the forward sees their fake-quantized values
(``w + (Q(w) - w).detach()``). The iterate with the least loss on the first chunk is kept (the start
included), so distillation never makes it worse there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..metrics import Metric, method_name
from ..models.weights import in_features, stored_transposed
from ..quant.core import to_codes, values
from ..quant.integer import QParams
from ..quant.spec import QuantSpec
from ..threads import fit_threads
from .kinds import QuantizedLinear, Refined

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class LKDConfig:
    """Options of ZeroQuant-Local / ZeroQuant-Global.

    Attributes:
        steps: Optimizer steps (per layer for local, for the model for global).
        lr: Learning rate.
        optimizer: ``adam`` or ``sgd``.

    A step trains on one calibration chunk (``calibration.batch_size`` windows).
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
    """Distil each decoder layer's quantized weights against the FP layer's outputs (a layer refiner)."""

    kind: ClassVar[str] = "layer_refiner"
    needs_calibration: ClassVar[bool] = True

    def __init__(self, config: LKDConfig | None = None) -> None:
        """Create the step with ``config``."""
        self.config = config or LKDConfig()

    def refine_layer(
        self,
        layer: nn.Module,
        linears: Sequence[QuantizedLinear],
        forward: Callable[[int], torch.Tensor],
        targets: Sequence[torch.Tensor],
    ) -> Refined:
        """Train ``linears`` so the layer's output on each chunk matches the FP output (mean squared error).

        Args:
            layer: The decoder layer with quantized weights.
            linears: Its quantized linears.
            forward: ``forward(c)``: the layer's output on calibration chunk ``c`` (autograd-ready inputs).
            targets: The FP layer's outputs on the same chunks.

        Returns:
            The loss on the first chunk at the start and of the kept iterate.

        """

        def loss_on(c: int) -> torch.Tensor:
            return F.mse_loss(forward(c).float(), targets[c].float())

        with ste_weights(layer, linears) as latents, torch.enable_grad():
            return _train(latents, self.config, loss_on, len(targets))

    def metrics(self, losses: Sequence[Refined]) -> list[Metric]:
        """``zeroquant.local.loss_ratio``: the mean over layers of the kept loss over the starting loss."""
        ratios = [d.best / d.start for d in losses if d.start > 0]
        return [Metric(method_name("zeroquant.local", "loss_ratio"), sum(ratios) / len(ratios))] if ratios else []


class ZeroQuantGlobal:
    """Distil every quantized weight against the FP model's logits after the layer loop (a model refiner)."""

    kind: ClassVar[str] = "model_refiner"
    needs_calibration: ClassVar[bool] = True

    def __init__(self, config: LKDConfig | None = None) -> None:
        """Create the step with ``config``."""
        self.config = config or LKDConfig()

    def refine_model(
        self, model: nn.Module, teacher: nn.Module, linears: Sequence[QuantizedLinear], batches: Sequence[torch.Tensor]
    ) -> Refined:
        """Train ``linears`` so the model's next-token distributions match the FP teacher's (KL per token).

        Returns:
            The KL divergence on the first batch at the start and of the kept iterate.

        """

        def loss_on(c: int) -> torch.Tensor:
            with torch.no_grad():
                ref = F.log_softmax(teacher(input_ids=batches[c], use_cache=False).logits.float(), dim=-1)
            out = F.log_softmax(model(input_ids=batches[c], use_cache=False).logits.float(), dim=-1)
            return F.kl_div(out, ref, log_target=True, reduction="batchmean") / batches[c].shape[1]

        with ste_weights(model, linears) as latents, torch.enable_grad():
            return _train(latents, self.config, loss_on, len(batches))

    def metrics(self, losses: Sequence[Refined]) -> list[Metric]:
        """``zeroquant.global.kl_start`` and ``zeroquant.global.kl_best``."""
        out = []
        for d in losses:
            out += [Metric(method_name("zeroquant.global", "kl_start"), d.start),
                    Metric(method_name("zeroquant.global", "kl_best"), d.best)]
        return out


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
        q = values(to_codes(w.float(), scale, zero, self.spec), scale, zero, self.spec)
        return w + (q.to(w.dtype) - w).detach()


@contextmanager
def ste_weights(model: nn.Module, linears: Sequence[QuantizedLinear]) -> Iterator[list[nn.Parameter]]:
    """Make only the linears' latent weights trainable, seen through their fake quantizer.

    The latent weight starts inside the quantized value's rounding bin, offset toward the FP weight (by at
    most 0.49 of a step), so it quantizes to the quantizer's result while small updates can flip it. On
    exit the fake-quantized weights are written back as plain parameters.
    """
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    latents = []
    for t in linears:
        scale, zero = per_column(t.result.qparams, in_features(t.module), t.result.g_idx)
        transposed = stored_transposed(t.module)
        parametrize.register_parametrization(t.module, "weight", STEFakeQuant(t.spec, scale, zero, transposed))
        latent = t.module.get_parameter("parametrizations.weight.original")
        start = _latent_start(t.result.weight.float(), t.original.float(), scale)
        with torch.no_grad():
            latent.copy_((start.t() if transposed else start).to(latent.dtype))
        latent.requires_grad_(True)
        latents.append(latent)
    try:
        yield latents
    finally:
        for t in linears:
            parametrize.remove_parametrizations(t.module, "weight", leave_parametrized=True)
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), False))


def _latent_start(q: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q`` moved toward ``w`` by at most 0.49 of its step (it still rounds to ``q`` on a uniform grid)."""
    step = 0.49 * scale.abs()
    return q + torch.maximum(torch.minimum(w - q, step), -step)


def _train(
    latents: list[nn.Parameter], cfg: LKDConfig, loss_on: Callable[[int], torch.Tensor], n_batches: int
) -> Refined:
    """Optimise ``latents``; keep the iterate with the least loss on batch 0."""
    opt = cfg.make_optimizer(latents)
    with torch.no_grad():
        start = best = float(loss_on(0))
    kept = [p.detach().clone() for p in latents]
    for step in range(cfg.steps):
        fit_threads()
        opt.zero_grad(set_to_none=True)
        loss = loss_on(step % n_batches)
        loss.backward()
        opt.step()
        with torch.no_grad():
            now = float(loss_on(0))
        if now < best:
            best, kept = now, [p.detach().clone() for p in latents]
    with torch.no_grad():
        for p, k in zip(latents, kept, strict=True):
            p.copy_(k)
    return Refined(start, best)
