"""Tiny random models of every supported family, built from configs (no download), for tests.

A helper for tests (ptqlab's and a user's own); nothing in the package imports it (an import contract in
``pyproject.toml`` checks).

Every tiny model has 2 layers, hidden size 64, 4 attention heads (2 key/value heads where the family
has grouped-query attention), intermediate size 128 (BLOOM fixes it at 4 x hidden), vocabulary 128 and
128 positions. The state-space models (Mamba, Mamba-2) have hidden size 64, expansion 2 (inner width
128) and SSM state size 16. The mixture-of-experts models (Mixtral, Qwen3-MoE) have 4 experts of
intermediate size 32 and route each token to 2 of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    Glm4Config,
    GlmConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    Mamba2Config,
    MambaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    StableLmConfig,
)

from ptqlab.errors import ConfigError

VOCAB = 128
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
LAYERS = 2
POSITIONS = 128
EXPERTS = 4
EXPERTS_PER_TOKEN = 2
EXPERT_INTERMEDIATE = 32

TINY_FAMILIES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "opt",
    "bloom",
    "gpt2",
    "gpt_neox",
    "falcon",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "glm",
    "glm4",
    "stablelm",
)
"""One tiny model per attention family, in the default layout of its config class."""

TINY_SSM_FAMILIES: tuple[str, ...] = ("mamba", "mamba2")
"""One tiny model per state-space family: no attention and no KV cache, so not in :data:`TINY_FAMILIES`."""

TINY_MOE_FAMILIES: tuple[str, ...] = ("mixtral", "qwen3_moe")
"""One tiny model per mixture-of-experts family; not in :data:`TINY_FAMILIES`, whose suites run the scaling
transforms and the rotation, which these families refuse (see ``Adapter.scaling_refusal``)."""

TINY_VARIANTS: tuple[str, ...] = (
    "opt_post_ln",
    "gpt_neox_sequential",
    "falcon_new",
    "falcon_new_1ln",
    "falcon_rw",
    "stablelm_qkv_bias",
    "stablelm_parallel",
)
"""Other layouts of the same classes (OPT-350M, NeoX without parallel residual, Falcon-40B/11B/RW,
StableLM-2-1.6B with q/k/v biases, StableLM-2-12B with parallel residual and per-head q/k LayerNorm)."""

_TOKENS: dict[str, Any] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _gqa(head_dim: int | None = None) -> dict[str, Any]:
    """Common arguments of the Llama-style configs."""
    kwargs: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": POSITIONS,
        **_TOKENS,
    }
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    return kwargs


def _gemma_like(cls: Callable[..., PretrainedConfig]) -> PretrainedConfig:
    """Gemma2/3 with one sliding-window and one full-attention layer."""
    return cls(
        **_gqa(HIDDEN // HEADS),
        query_pre_attn_scalar=HIDDEN // HEADS,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )


def _opt(pre_norm: bool) -> PretrainedConfig:
    return OPTConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        word_embed_proj_dim=HIDDEN,
        ffn_dim=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS,
        do_layer_norm_before=pre_norm,
        **_TOKENS,
    )


def _neox(parallel: bool) -> PretrainedConfig:
    return GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS,
        use_parallel_residual=parallel,
        **_TOKENS,
    )


def _falcon(**layout: Any) -> PretrainedConfig:
    return FalconConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        ffn_hidden_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS,
        **layout,
        **_TOKENS,
    )


def _stablelm(**layout: Any) -> PretrainedConfig:
    return StableLmConfig(**_gqa(), **layout)


def _moe(cls: Callable[..., PretrainedConfig], **layout: Any) -> PretrainedConfig:
    """A mixture-of-experts config: attention as ``_gqa``, ``EXPERTS`` experts, ``EXPERTS_PER_TOKEN`` per token."""
    return cls(**{**_gqa(HIDDEN // HEADS), **layout}, num_experts_per_tok=EXPERTS_PER_TOKEN)


def _mamba(cls: Callable[..., PretrainedConfig], **layout: Any) -> PretrainedConfig:
    return cls(vocab_size=VOCAB, hidden_size=HIDDEN, state_size=16, expand=2, num_hidden_layers=LAYERS, **layout,
               **_TOKENS)


_BUILDERS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: LlamaConfig(**_gqa()),
    "mistral": lambda: MistralConfig(**_gqa(), sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_gqa()),
    "qwen3": lambda: Qwen3Config(**_gqa(HIDDEN // HEADS)),
    "gemma": lambda: GemmaConfig(**_gqa(HIDDEN // HEADS)),
    "gemma2": lambda: _gemma_like(Gemma2Config),
    "gemma3": lambda: _gemma_like(Gemma3TextConfig),
    "phi3": lambda: Phi3Config(**_gqa(), original_max_position_embeddings=POSITIONS),
    "opt": lambda: _opt(pre_norm=True),
    "opt_post_ln": lambda: _opt(pre_norm=False),
    "bloom": lambda: BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, **_TOKENS),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_inner=INTERMEDIATE,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=POSITIONS,
        **_TOKENS,
    ),
    "gpt_neox": lambda: _neox(parallel=True),
    "gpt_neox_sequential": lambda: _neox(parallel=False),
    "falcon": lambda: _falcon(),  # Falcon-7B layout: parallel attention, multi-query, one norm
    "falcon_new": lambda: _falcon(new_decoder_architecture=True, num_kv_heads=KV_HEADS),
    "falcon_new_1ln": lambda: _falcon(new_decoder_architecture=True, num_kv_heads=KV_HEADS, num_ln_in_parallel_attn=1),
    "falcon_rw": lambda: _falcon(parallel_attn=False, multi_query=False, alibi=True, bias=True),
    "glm": lambda: GlmConfig(**_gqa(HIDDEN // HEADS)),  # q/k/v biases and half-width rotary by default
    "glm4": lambda: Glm4Config(**_gqa(HIDDEN // HEADS)),
    "stablelm": lambda: _stablelm(),  # sequential residual, no q/k/v bias, quarter-width rotary
    "stablelm_qkv_bias": lambda: _stablelm(use_qkv_bias=True),
    "stablelm_parallel": lambda: _stablelm(use_parallel_residual=True, qk_layernorm=True),
    "mixtral": lambda: _moe(MixtralConfig, num_local_experts=EXPERTS, intermediate_size=EXPERT_INTERMEDIATE,
                            sliding_window=None),
    "qwen3_moe": lambda: _moe(Qwen3MoeConfig, num_experts=EXPERTS, moe_intermediate_size=EXPERT_INTERMEDIATE,
                              norm_topk_prob=True),  # every layer sparse, top-k renormalised, as released
    "mamba": lambda: _mamba(MambaConfig),
    "mamba2": lambda: _mamba(Mamba2Config, num_heads=8, head_dim=16, n_groups=1),
}


def tiny_config(family: str) -> PretrainedConfig:
    """Return the config of a tiny random model of ``family``.

    Args:
        family: One of :data:`TINY_FAMILIES`, :data:`TINY_SSM_FAMILIES`, :data:`TINY_MOE_FAMILIES` or
            :data:`TINY_VARIANTS`.

    Returns:
        A fresh config (safe to modify).

    Raises:
        ConfigError: Unknown family.

    """
    try:
        builder = _BUILDERS[family]
    except KeyError:
        known = ", ".join(TINY_FAMILIES + TINY_SSM_FAMILIES + TINY_MOE_FAMILIES + TINY_VARIANTS)
        raise ConfigError(f"unknown tiny family {family!r}; known: {known}") from None
    return builder()


def tiny_model(family: str, seed: int = 0) -> PreTrainedModel:
    """Build a tiny random causal LM of ``family`` in float32, in eval mode.

    Args:
        family: One of :data:`TINY_FAMILIES`, :data:`TINY_SSM_FAMILIES`, :data:`TINY_MOE_FAMILIES` or
            :data:`TINY_VARIANTS`.
        seed: Seed of the random initialisation.

    Returns:
        The model (``AutoModelForCausalLM.from_config``).

    """
    config = tiny_config(family)
    torch.manual_seed(seed)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(config)
    return model.eval()
