"""Quantized inputs of the attention matmuls, through a registered transformers attention function.

The function fake-quantizes query, key and value (B, H, T, D) with the activation spec and hands them
to the attention implementation the model used before (sdpa or eager). Families whose attention code
does not go through the attention interface (BLOOM, Falcon) get a clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from ..errors import ConfigError
from ..quant.spec import QuantSpec
from .context import ForwardContext
from .kv_cache import quantize_kv
from .rows import fake_quantize_sequences

NAME = "ptqlab_quantized_inputs"
_ATTR = "_ptqlab_attention_inputs"


@dataclass(frozen=True)
class _AttentionSetting:
    spec: QuantSpec
    ctx: ForwardContext
    inner: Callable[..., Any]


def quantize_attention_input(x: torch.Tensor, spec: QuantSpec, ctx: ForwardContext) -> torch.Tensor:
    """Fake-quantize a query/key/value (B, H, T, D): per token (over heads), per head group, or per sequence."""
    if spec.granularity == "tensor":
        b, h, t, d = x.shape
        valid = ctx.valid_tokens(b, t)
        seq = fake_quantize_sequences(x.transpose(1, 2), spec, valid)  # (B, T, H, D)
        return seq.transpose(1, 2)
    return quantize_kv(x, spec if spec.granularity == "group" else spec.replace(granularity="token"))


def _quantized_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    setting: _AttentionSetting | None = getattr(module, _ATTR, None)
    if setting is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    q = quantize_attention_input(query, setting.spec, setting.ctx)
    k = quantize_attention_input(key, setting.spec, setting.ctx)
    v = quantize_attention_input(value, setting.spec, setting.ctx)
    return setting.inner(module, q, k, v, attention_mask, **kwargs)


def check_attention(model: nn.Module) -> None:
    """Raise ConfigError when the family hard-codes its attention (no transformers attention interface)."""
    if not getattr(model, "_supports_attention_backend", False):
        raise ConfigError(
            f"scheme.activation.attention: {type(model).__name__} hard-codes its attention (no transformers "
            "attention interface), so the attention matmul inputs cannot be quantized; set attention: false"
        )


def install_attention_quantization(
    model: nn.Module, modules: list[nn.Module], spec: QuantSpec, ctx: ForwardContext
) -> Callable[[], None]:
    """Route the attention ``modules`` (one per decoder layer) through the quantizing function.

    Returns:
        A function that undoes it.

    Raises:
        ConfigError: The family hard-codes its attention (no attention interface).

    """
    check_attention(model)
    config: Any = model.config
    previous = str(config._attn_implementation or "sdpa")
    inner = AttentionInterface().get_interface(previous, sdpa_attention_forward) if previous != "eager" else None
    if inner is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward

        inner = eager_attention_forward
    AttentionInterface.register(NAME, _quantized_attention)
    # transformers builds the attention mask by the implementation's name: without a mask function of
    # its own the model would get none (sdpa then assumes a causal forward from position 0 and eager
    # attends to every token). The eager mask (additive floats, never skipped) is right for both inners.
    AttentionMaskInterface.register(NAME, eager_mask)
    for m in modules:
        setattr(m, _ATTR, _AttentionSetting(spec, ctx, inner))
    config._attn_implementation = NAME

    def undo() -> None:
        config._attn_implementation = previous
        for m in modules:
            if hasattr(m, _ATTR):
                delattr(m, _ATTR)

    return undo
