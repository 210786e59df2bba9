"""What the runtime quantizers need to know about the forward pass in progress (padding, decoding)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass
class ForwardContext:
    """State of the current forward call of the model, set by a pre-hook on the model.

    Attributes:
        attention_mask: The caller's 2-D padding mask (batch, past + new tokens), 1 for real tokens, or
            None (no padding, or a mask of another shape).
        decoding: Whether the call continues a non-empty cache (a decode step).
        handles: Hooks installed for this context (removed with it).

    """

    attention_mask: torch.Tensor | None = None
    decoding: bool = False
    handles: list[RemovableHandle] = field(default_factory=list)

    def valid_tokens(self, batch: int, length: int) -> torch.Tensor | None:
        """Boolean (batch, length) mask of the real tokens among the last ``length`` positions, or None."""
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < length:
            return None
        valid = mask[:, -length:].bool()
        return None if bool(valid.all()) else valid

    def remove(self) -> None:
        """Remove the hooks of this context."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _mask_from(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]  # forward(input_ids, attention_mask, ...)
    return mask if isinstance(mask, torch.Tensor) else None


def _past_length(kwargs: dict[str, Any]) -> int:
    cache = kwargs.get("past_key_values")
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


def track_forward(model: nn.Module, ctx: ForwardContext) -> ForwardContext:
    """Install a pre-hook on ``model`` that records the padding mask and decoding state of each call.

    Args:
        model: The causal LM (its top-level module).
        ctx: The context to fill.

    Returns:
        ``ctx``, with the hook in its handles.

    """

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ctx.attention_mask = _mask_from(args, kwargs)
        ctx.decoding = _past_length(kwargs) > 0

    ctx.handles.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
    return ctx
