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
        tokens: (batch, new tokens) of the call, to restore the sequences of a flattened (B*T, C) input.
        handles: Hooks installed for this context (removed with it).

    """

    attention_mask: torch.Tensor | None = None
    decoding: bool = False
    tokens: tuple[int, int] | None = None
    handles: list[RemovableHandle] = field(default_factory=list)

    def valid_tokens(self, batch: int, length: int) -> torch.Tensor | None:
        """Boolean (batch, length) mask of the real tokens among the last ``length`` positions, or None."""
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < length:
            return None
        valid = mask[:, -length:].bool()
        return None if bool(valid.all()) else valid

    def as_sequences(self, x: torch.Tensor) -> torch.Tensor:
        """View ``x`` as (B, T, ...) when it is a flattened (B*T, C) tensor of this call (OPT's MLP)."""
        if x.dim() >= 3 or self.tokens is None:
            return x if x.dim() >= 3 else x.unsqueeze(0)
        b, t = self.tokens
        return x.reshape(b, t, *x.shape[1:]) if x.dim() == 2 and x.shape[0] == b * t else x.unsqueeze(0)

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


def _tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return int(ids.shape[0]), int(ids.shape[1])
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
        return int(embeds.shape[0]), int(embeds.shape[1])
    return None


def _continues_cache(kwargs: dict[str, Any]) -> bool:
    """Whether the call is given a non-empty cache (a decode step)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return False
    try:
        return int(cache.get_seq_length()) > 0
    except ValueError:  # a cache of state-space layers only (Mamba) has no length, only a state
        return bool(cache.has_previous_state())


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
        ctx.decoding = _continues_cache(kwargs)
        ctx.tokens = _tokens(args, kwargs)

    ctx.handles.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
    return ctx
