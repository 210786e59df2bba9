"""ZeroQuant LKD loops: train a layer's (or the model's) quantized weights against FP outputs with an STE."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

from ..methods.base import WeightResult
from ..methods.zeroquant import LKDConfig, STEFakeQuant, per_column
from ..models.weights import in_features
from ..quant.spec import QuantSpec
from .capture import LayerCall, layer_output

log = logging.getLogger(__name__)


@dataclass
class Trainable:
    """A quantized linear to train: the module, its quantizer's result (fixed scales), spec and FP weight.

    The latent weight starts inside the quantized value's rounding bin, offset toward the FP weight (by
    at most 0.49 of a step), so it quantizes to the quantizer's result while small updates can flip it.
    """

    module: nn.Module
    result: WeightResult
    spec: QuantSpec
    original: torch.Tensor | None = None


def plain(value: Any) -> Any:
    """Copies of tensors (inference-mode tensors cannot take part in autograd), recursively."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


@contextmanager
def ste_weights(model: nn.Module, trainables: Sequence[Trainable]) -> Iterator[list[nn.Parameter]]:
    """Make only the trainables' latent weights trainable, seen through their fake quantizer.

    On exit the fake-quantized weights are written back as plain parameters.
    """
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    latents = []
    for t in trainables:
        cols = in_features(t.module)
        scale, zero = per_column(t.result.qparams, cols, t.result.g_idx)
        transposed = isinstance(t.module, Conv1D)
        parametrize.register_parametrization(t.module, "weight", STEFakeQuant(t.spec, scale, zero, transposed))
        latent = t.module.get_parameter("parametrizations.weight.original")
        if t.original is not None:
            start = _latent_start(t.result.weight.float(), t.original.float(), scale)
            with torch.no_grad():
                latent.copy_((start.t() if transposed else start).to(latent.dtype))
        latent.requires_grad_(True)
        latents.append(latent)
    try:
        yield latents
    finally:
        for t in trainables:
            parametrize.remove_parametrizations(t.module, "weight", leave_parametrized=True)
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), False))


def _latent_start(q: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q`` moved toward ``w`` by at most 0.49 of its step (it still rounds to ``q`` on a uniform grid)."""
    step = 0.49 * scale.abs()
    return q + torch.maximum(torch.minimum(w - q, step), -step)


def _train(
    latents: list[nn.Parameter], cfg: LKDConfig, loss_on: Any, n_batches: int
) -> tuple[float, float]:
    """Optimise ``latents``; keep the iterate with the least loss on batch 0. Returns (start, best)."""
    opt = cfg.make_optimizer(latents)
    with torch.no_grad():
        start = best = float(loss_on(0))
    kept = [p.detach().clone() for p in latents]
    for step in range(cfg.steps):
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
    return start, best


def distill_layer(
    layer: nn.Module,
    trainables: Sequence[Trainable],
    inputs: Sequence[torch.Tensor],
    calls: Sequence[LayerCall],
    targets: Sequence[torch.Tensor],
    cfg: LKDConfig,
) -> tuple[float, float]:
    """ZeroQuant-Local on one decoder layer.

    Args:
        layer: The decoder layer with quantized weights.
        trainables: Its quantized linears.
        inputs: The layer's calibration inputs, one tensor per chunk.
        calls: The layer's other arguments per chunk.
        targets: The FP layer's outputs on the same inputs.
        cfg: Options.

    Returns:
        The loss (mean squared error) on the first chunk at the start and of the kept iterate.

    """
    xs = [plain(x) for x in inputs]
    kw = [plain(c.kwargs) for c in calls]
    args = [plain(c.args) for c in calls]
    ys = [plain(y) for y in targets]

    def loss_on(c: int) -> torch.Tensor:
        out = layer_output(layer(xs[c], *args[c], **kw[c]))
        return F.mse_loss(out.float(), ys[c].float())

    with ste_weights(layer, trainables) as latents, torch.enable_grad():
        return _train(latents, cfg, loss_on, len(xs))


def distill_model(
    model: nn.Module, teacher: nn.Module, trainables: Sequence[Trainable], calibration: torch.Tensor,
    batch_size: int, cfg: LKDConfig,
) -> tuple[float, float]:
    """ZeroQuant-Global: train every quantized weight so the model's logits match the FP teacher's (KL).

    Returns:
        The KL divergence on the first batch at the start and of the kept iterate.

    """
    device = next(model.parameters()).device
    batches = [b.to(device) for b in calibration.split(batch_size)]

    def loss_on(c: int) -> torch.Tensor:
        with torch.no_grad():
            ref = F.log_softmax(teacher(input_ids=batches[c], use_cache=False).logits.float(), dim=-1)
        out = F.log_softmax(model(input_ids=batches[c], use_cache=False).logits.float(), dim=-1)
        return F.kl_div(out, ref, log_target=True, reduction="batchmean") / batches[c].shape[1]

    with ste_weights(model, trainables) as latents, torch.enable_grad():
        return _train(latents, cfg, loss_on, len(batches))


def fp_copy(model: nn.Module) -> nn.Module:
    """A frozen full-precision copy of ``model`` (the teacher of ZeroQuant-Global)."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
