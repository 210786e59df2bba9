"""KV cache quantization for every family: a DynamicCache whose ``update`` fake-quantizes K and V.

All supported families call ``past_key_values.update(k, v, layer_idx)`` after RoPE and attend with what
it returns, in prefill and in decode. A forward pre-hook on the model makes sure that object is a
:class:`QuantizedKVCache`: it replaces a missing or empty plain cache and forces ``use_cache``, so plain
forwards, lm-eval requests and ``generate()`` all attend with quantized K/V, with no attention code copied.
Pre-RoPE K is quantized at the k projection's output instead (a forward hook on that linear).
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from ..errors import ConfigError
from ..models.adapter import Adapter
from ..models.heads import attention_heads, fused_qkv_rows
from ..models.weights import out_features
from ..quant.rotation import random_rotation
from ..quant.spec import QuantSpec
from .context import ForwardContext
from .rows import fake_quantize_over_tokens, fake_quantize_rows
from .specs import KVSpec

log = logging.getLogger(__name__)


def quantize_kv(x: torch.Tensor, spec: QuantSpec, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize keys or values laid out as (B, H, T, D).

    Args:
        x: The states.
        spec: Granularity ``head`` (one range per token and head, over D), ``group`` (per token and head,
            groups of ``group_size`` along D), ``token`` (per token over all heads) or ``channel`` (per
            head and D-channel across the tokens of this call, as KIVI does for keys).
        valid: Boolean (B, T) mask of real tokens (ranges across tokens leave padding out), or None.

    Returns:
        The fake-quantized states, same shape and dtype.

    """
    if not spec.enabled:
        return x
    b, h, t, d = x.shape
    if spec.granularity in ("head", "group"):
        return fake_quantize_rows(x, spec)
    tokens = x.permute(0, 2, 1, 3).reshape(b, t, h * d)  # (B, T, H*D)
    if spec.granularity == "token":
        out = fake_quantize_rows(tokens, spec)
    else:
        out = fake_quantize_over_tokens(tokens, spec, valid)
    return out.reshape(b, t, h, d).permute(0, 2, 1, 3)


@functools.lru_cache(maxsize=8)
def head_rotation(head_dim: int) -> torch.Tensor:
    """The fixed orthogonal (head_dim, head_dim) rotation used for keys (a normalised Hadamard where it exists)."""
    return random_rotation(head_dim, seed=0).matrix().float()


class QuantizedKVCache(DynamicCache):
    """A DynamicCache that stores (and so attends with) fake-quantized K and V.

    In mode ``all`` every update is quantized; in mode ``decode`` the first update of each layer (the
    prompt) is stored in full precision and only later tokens are quantized.
    """

    def __init__(self, kv: KVSpec, ctx: ForwardContext, config: Any = None) -> None:
        """Create an empty cache for a model with ``config`` (sliding-window layers as the model has them)."""
        super().__init__(config=config)
        self.kv = kv
        self.ctx = ctx

    def _quantize_keys(self, k: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        if not self.kv.rotate_keys:
            return quantize_kv(k, self.kv.key, valid)
        H = head_rotation(k.shape[-1]).to(k.device, k.dtype)
        return quantize_kv(k @ H, self.kv.key, valid) @ H.t()

    def _layer_empty(self, layer_idx: int) -> bool:
        return layer_idx >= len(self.layers) or self.get_seq_length(layer_idx) == 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize the new K/V (unless this is the FP prefill of mode ``decode``), then cache them."""
        if not (self.kv.mode == "decode" and self._layer_empty(layer_idx)):
            valid = self.ctx.valid_tokens(key_states.shape[0], key_states.shape[2])
            if self.kv.where == "post_rope":
                key_states = self._quantize_keys(key_states, valid)
            value_states = quantize_kv(value_states, self.kv.value, valid)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@dataclass
class InstalledKV:
    """Hooks of an installed KV quantization."""

    kv: KVSpec
    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        """Remove every hook."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _head_dim(model: nn.Module) -> int:
    return attention_heads(model.config).head_dim


def check_kv(model: nn.Module, adapter: Adapter, kv: KVSpec) -> None:
    """Check that ``kv`` fits the model before any work.

    Raises:
        ConfigError: A family without a KV cache, pre_rope on a family without RoPE, or a group size that
            does not divide head_dim.

    """
    no_attention = adapter.attention_refusal()
    if no_attention is not None:
        raise ConfigError(f"scheme.kv_cache: family {adapter.family} {no_attention}; remove scheme.kv_cache")
    if kv.rotate_keys and kv.where == "pre_rope":
        raise ConfigError("rotation.kv: rotated keys are quantized after RoPE; use kv_cache.where=post_rope")
    if kv.where == "pre_rope" and not adapter.has_rope:
        raise ConfigError(f"scheme.kv_cache.where=pre_rope: family {adapter.family} has no RoPE; use post_rope")
    head_dim = _head_dim(model)
    for spec in (kv.key, kv.value):
        if spec.enabled and spec.granularity == "group" and head_dim % (spec.group_size or 1):
            raise ConfigError(
                f"{spec.where}.group_size={spec.group_size} does not divide head_dim {head_dim} "
                f"of {type(model).__name__}"
            )


CACHE_KWARGS = ("cache", "past_key_values")  # transformers >= 5.24 names it ``cache``


def cache_kwarg(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes its KV cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_hook(model: nn.Module, kv: KVSpec, ctx: ForwardContext) -> Any:
    name = cache_kwarg(model)

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        given = [kwargs.pop(k) for k in CACHE_KWARGS if kwargs.get(k) is not None]
        cache = given[0] if given else None
        if not isinstance(cache, QuantizedKVCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError(
                    "KV quantization: the model was given a non-empty cache that ptqlab did not create; "
                    "pass no cache (or an empty one) so that every cached K/V is quantized"
                )
            cache = QuantizedKVCache(kv, ctx, config=model.config)
        kwargs[name] = cache
        kwargs["use_cache"] = True
        return args, kwargs

    return pre_hook


def _k_rows(model: nn.Module, adapter: Adapter, layer: nn.Module) -> tuple[str, torch.Tensor | None]:
    """The module whose output holds pre-RoPE K, and its K rows when it is a fused qkv projection."""
    if adapter.fused_qkv is not None:
        width = out_features(layer.get_submodule(adapter.fused_qkv.module))
        _, k, _ = fused_qkv_rows(adapter.fused_qkv, model.config, width)
        return adapter.fused_qkv.module, k
    if adapter.k_proj is None:
        raise ConfigError(f"scheme.kv_cache.where=pre_rope: no k projection is known for family {adapter.family}")
    return adapter.k_proj, None


def _pre_rope_hook(spec: QuantSpec, kv: KVSpec, ctx: ForwardContext, rows: torch.Tensor | None, head_dim: int) -> Any:
    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
        if kv.mode == "decode" and not ctx.decoding:
            return None
        k = out if rows is None else out[..., rows]  # (B, T, K*D)
        b, t, width = k.shape
        states = k.reshape(b, t, width // head_dim, head_dim).transpose(1, 2)  # (B, H, T, D)
        q = quantize_kv(states, spec, ctx.valid_tokens(b, t)).transpose(1, 2).reshape(b, t, width)
        if rows is None:
            return q
        out = out.clone()
        out[..., rows] = q
        return out

    return hook


def install_kv_quantization(model: nn.Module, adapter: Adapter, kv: KVSpec, ctx: ForwardContext) -> InstalledKV:
    """Install KV cache quantization on ``model``.

    Args:
        model: The causal LM.
        adapter: Its family adapter.
        kv: What to quantize.
        ctx: The forward context (padding mask, decoding state).

    Returns:
        The installed hooks.

    """
    check_kv(model, adapter, kv)
    installed = InstalledKV(kv)
    installed.handles.append(model.register_forward_pre_hook(_cache_hook(model, kv, ctx), with_kwargs=True))
    if kv.where == "pre_rope" and kv.key.enabled:
        head_dim = _head_dim(model)
        for layer in adapter.layers(model):
            name, rows = _k_rows(model, adapter, layer)
            hook = _pre_rope_hook(kv.key, kv, ctx, rows, head_dim)
            installed.handles.append(layer.get_submodule(name).register_forward_hook(hook))
    return installed
