"""Fold a per-input-channel scale of a linear group into the op before it, as the adapter describes.

Dividing a group's input by ``s`` and multiplying its linears' input columns by ``s`` keeps the float
function when the op before the group can absorb ``1/s``: a norm (its weight and bias), or the output
rows of a linear (value rows of a fused qkv, the up half of a fused gate/up, ``v_proj``, ``up_proj``).
Where nothing can absorb it (the output of GELU), an explicit scale op is inserted after the op before
(:class:`ScaledOutput`, ``fold="scale"``): one elementwise division per token, kept in the state dict.
With grouped-query attention several query heads read one value head, so the scales are tied: each
input channel maps to a *slot* (a row of the op before) and channels of one slot share one scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..methods.base import divide_rows
from ..models.adapter import Adapter, LinearGroup
from ..models.heads import attention_heads, prev_rows_read
from ..models.weights import set_weight_matrix, weight_matrix


def can_fold(group: LinearGroup) -> bool:
    """Whether the op before ``group`` can absorb a per-channel scale."""
    return group.fold in ("norm", "linear", "scale") and group.prev_op is not None


class ScaledOutput(nn.Module):
    """``inner(x) / scale``: an explicit per-channel scale after an op that cannot absorb one (GELU).

    Attributes:
        inner: The wrapped op.
        scale: Float32 buffer (channels,), saved with the model's state dict.

    """

    def __init__(self, inner: nn.Module, scale: torch.Tensor) -> None:
        """Wrap ``inner``; its output is divided by ``scale``."""
        super().__init__()
        self.inner = inner
        self.register_buffer("scale", scale.detach().to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the op, then divide by the scale."""
        y = self.inner(x)
        return y / self.scale.to(y.device, y.dtype)


def _scale_after(layer: nn.Module, name: str, s: torch.Tensor) -> None:
    """Divide the output of ``layer.<name>`` by ``s``, wrapping it once (later scales multiply in)."""
    op = layer.get_submodule(name)
    if isinstance(op, ScaledOutput):
        scale: torch.Tensor = op.scale  # type: ignore[assignment]
        scale.mul_(s.to(scale.device, torch.float32))
        return
    parent_name, _, child = name.rpartition(".")
    parent = layer.get_submodule(parent_name) if parent_name else layer
    setattr(parent, child, ScaledOutput(op, s))


def slots(config: Any, adapter: Adapter, layer: nn.Module, group: LinearGroup, width: int) -> torch.Tensor:
    """Map each of the group's ``width`` input channels to its slot (tied channels share one).

    Returns:
        Long tensor (width,) of slot indices in ``0 .. n_slots - 1``.

    """
    if group.fold == "linear":
        n_rows = len(prev_rows_read(config, adapter, layer, group))
        if n_rows != width:  # grouped-query attention: value heads serve several query heads
            c = attention_heads(config)
            per_kv = c.num_heads // c.num_kv_heads
            channel = torch.arange(width)
            head, dim = channel // c.head_dim, channel % c.head_dim
            return (head // per_kv) * c.head_dim + dim
    return torch.arange(width)


def tie(values: torch.Tensor, slot: torch.Tensor, reduce: str = "amax") -> torch.Tensor:
    """Per-slot reduction (``amax`` or ``mean``) of per-channel ``values``."""
    n = int(slot.max()) + 1
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, slot.to(values.device), values, reduce=reduce, include_self=False)


def _fold_norm(norm: nn.Module, s: torch.Tensor, offset: float) -> None:
    """Divide the norm's output by ``s``: it multiplies by ``offset + w`` (see ``Adapter.norm_offset``)."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{type(norm).__name__} has no weight to fold a scale into")
    s = s.to(w.device, torch.float32)
    with torch.no_grad():
        w.copy_(((offset + w.float()) / s - offset).to(w.dtype))
        b = getattr(norm, "bias", None)
        if isinstance(b, torch.Tensor):
            b.copy_((b.float() / s).to(b.dtype))


def _fold_linear_rows(prev: nn.Module, rows: torch.Tensor, s: torch.Tensor) -> None:
    set_weight_matrix(prev, divide_rows(weight_matrix(prev).float(), rows, s))
    b = getattr(prev, "bias", None)
    if isinstance(b, torch.Tensor):
        with torch.no_grad():
            b.copy_(divide_rows(b, rows, s))


RowsDivided = Callable[[nn.Module, torch.Tensor, torch.Tensor], None]


def fold_group_scale(
    config: Any,
    adapter: Adapter,
    layer: nn.Module,
    group: LinearGroup,
    slot_scale: torch.Tensor,
    slot: torch.Tensor,
    on_rows: RowsDivided | None = None,
) -> torch.Tensor:
    """Divide the group's input by the scales and multiply its linears' input columns by them.

    Args:
        config: The model config (head counts).
        adapter: The family adapter.
        layer: The decoder layer.
        group: A group that :func:`can_fold`.
        slot_scale: One positive scale per slot.
        slot: Each input channel's slot (from :func:`slots`).
        on_rows: Told ``(linear, rows, s)`` when rows of the linear before are divided (it may already be
            quantized, and whoever kept its quantization result must divide it too).

    Returns:
        The per-channel scale ``s`` (in,) the group's input is now divided by.

    """
    assert group.prev_op is not None
    s = slot_scale[slot]
    prev = layer.get_submodule(group.prev_op)
    if group.fold == "norm":
        _fold_norm(prev, slot_scale, adapter.norm_offset)
    elif group.fold == "scale":
        _scale_after(layer, group.prev_op, s)
    else:
        rows = prev_rows_read(config, adapter, layer, group)
        _fold_linear_rows(prev, rows, slot_scale)
        if on_rows is not None:
            on_rows(prev, rows, slot_scale)
    for rel in group.linears:
        module = layer.get_submodule(rel)
        W = weight_matrix(module).float()
        set_weight_matrix(module, W * s[None, :].to(W.device))
    return s
