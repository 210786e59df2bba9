"""A fixed greedy generation sample, stored with each run for a person to read."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DEFAULT_PROMPT = "Once upon a time"


def greedy_sample(model: nn.Module, tokenizer: Any, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 32) -> str:
    """Generate greedily from ``prompt`` with the (quantized) model, KV cache quantization included.

    Args:
        model: The causal LM.
        tokenizer: Its tokenizer.
        prompt: The fixed prompt.
        max_new_tokens: Tokens to generate.

    Returns:
        The prompt followed by the generated text.

    """
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen: Any = model
    with torch.inference_mode():
        out = gen.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=pad)
    return str(tokenizer.decode(out[0], skip_special_tokens=True))
