"""Attention geometry read off a model's config: head counts, fused qkv rows, the context length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ptqlab.models.adapter import Adapter, FusedQKV, LinearGroup
from ptqlab.models.weights import in_features, out_features


@dataclass(frozen=True)
class HeadCounts:
    """Head counts of an attention block.

    Attributes:
        num_heads: Query heads H.
        num_kv_heads: Key/value heads K (H divisible by K).
        head_dim: Rows per head.

    """

    num_heads: int
    num_kv_heads: int
    head_dim: int


def fused_head_counts(fused: FusedQKV, config: Any, fused_out_features: int) -> HeadCounts:
    """Return the head counts of a fused qkv projection.

    Args:
        fused: The adapter's description of the fused projection.
        config: The model config (``num_attention_heads`` and, where named, the KV head attribute).
        fused_out_features: Output width of the fused linear, (H + 2K) * head_dim.

    Returns:
        The head counts.

    Raises:
        ValueError: The width does not fit the head counts.

    """
    num_heads = int(config.num_attention_heads)
    if fused.multi_query:
        num_kv = 1
    elif fused.kv_heads_attr is not None and getattr(config, fused.kv_heads_attr, None) is not None:
        num_kv = int(getattr(config, fused.kv_heads_attr))
    else:
        num_kv = num_heads
    head_dim, rest = divmod(fused_out_features, num_heads + 2 * num_kv)
    if rest or num_heads % num_kv:
        raise ValueError(
            f"{fused.module}: width {fused_out_features} does not fit {num_heads} query and {num_kv} KV heads"
        )
    return HeadCounts(num_heads, num_kv, head_dim)


def fused_qkv_rows(
    fused: FusedQKV, config: Any, fused_out_features: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the output-row indices of the queries, keys and values of a fused qkv projection.

    Rows are returned in head order, so ``w[v_rows]`` is the (K * head_dim, in) value projection as a
    separate ``v_proj`` would store it.

    Args:
        fused: The adapter's description of the fused projection.
        config: The model config.
        fused_out_features: Output width of the fused linear.

    Returns:
        ``(q_rows, k_rows, v_rows)``, int64 tensors.

    """
    c = fused_head_counts(fused, config, fused_out_features)
    d = c.head_dim
    q_width, kv_width = c.num_heads * d, c.num_kv_heads * d
    if not fused.interleaved:
        q = torch.arange(0, q_width)
        k = torch.arange(q_width, q_width + kv_width)
        v = torch.arange(q_width + kv_width, q_width + 2 * kv_width)
        return q, k, v
    per_group = c.num_heads // c.num_kv_heads
    rows = torch.arange(fused_out_features).view(c.num_kv_heads, per_group + 2, d)  # (K, H/K + 2, d)
    q = rows[:, :per_group].reshape(-1)
    k = rows[:, per_group].reshape(-1)
    v = rows[:, per_group + 1].reshape(-1)
    return q, k, v


def attention_heads(config: Any) -> HeadCounts:
    """Head counts of a model's attention from its config (query heads, KV heads, head_dim)."""
    num_heads = int(config.num_attention_heads)
    num_kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None)
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        num_kv = 1
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // num_heads
    return HeadCounts(num_heads, int(num_kv or num_heads), int(head_dim))


def prev_rows_read(config: Any, adapter: Adapter, layer: nn.Module, group: LinearGroup) -> torch.Tensor:
    """Output rows of a group's ``prev_op`` linear that its input is made of, in input order.

    The value rows of a fused qkv projection (``prev_part="v"``), the up half of a fused ``[gate; up]``
    (``prev_part="up"``), the first rows, as many as the group reads (``prev_part="lead"``), or every row.
    """
    assert group.prev_op is not None
    width = out_features(layer.get_submodule(group.prev_op))
    if group.prev_part == "v":
        assert adapter.fused_qkv is not None
        return fused_qkv_rows(adapter.fused_qkv, config, width)[2]
    if group.prev_part == "up":
        return torch.arange(width // 2, width)
    if group.prev_part == "lead":
        return torch.arange(in_features(layer.get_submodule(group.linears[0])))
    return torch.arange(width)


def context_length(config: Any) -> int | None:
    """The longest sequence the model's positions allow (``max_position_embeddings``; GPT-2's ``n_positions``)."""
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(value) if value else None
