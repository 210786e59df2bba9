"""Long-context retrieval: key-value records hidden in filler text, then a question about one of them.

A prompt holds ``pairs`` records ("The pass key of the red fox is 48213. Remember it.") at random places
in repeated filler sentences, padded to a target length in tokens, and ends with a question about one
record ("... The pass key of the red fox is"). It is built deterministically from (seed, length, sample
index, pairs, tokenizer); the answer is scored by exact match of the first number the model generates
(a near miss such as a dropped or extra digit scores 0). Generation is greedy, so the KV cache is
quantized in prefill and in every decode step when KV quantization is installed.

FP SmolLM2-135M on 10 samples of 512 tokens (``retrieval_accuracy(model, tok, 512, 10, seed=0, pairs=p)``):
one record 10/10, four 9/10, eight 5/10. The default is four records (at least 80 % for FP at 512).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.heads import context_length
from ..threads import fit_threads

ANSWER_TOKENS = 8
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_ADJ = (
    "red", "blue", "green", "black", "white", "brown", "silver", "golden", "happy", "quiet", "brave", "clever",
    "gentle", "proud", "swift", "tiny", "giant", "ancient", "young", "wild", "calm", "lucky", "sunny", "frozen",
    "hidden",
)
_NOUN = (
    "fox", "owl", "cat", "dog", "wolf", "bear", "deer", "hawk", "lion", "frog", "duck", "goat", "seal", "crab",
    "swan", "mole", "toad", "lark", "moth", "bee", "eel", "yak", "ram", "hen", "ant",
)
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class RetrievalSample:
    """One prompt and its expected answer."""

    prompt: str
    answer: str
    length: int
    position: float


def make_sample(tokenizer: Any, length: int, seed: int, index: int, pairs: int = 4) -> RetrievalSample:
    """Build the ``index``-th sample of at most ``length`` tokens, deterministically.

    Args:
        tokenizer: Measures the prompt in tokens.
        length: Target prompt length in tokens.
        seed: Seed of the task.
        index: Which sample.
        pairs: Key-value records in the prompt (one is asked for).

    Returns:
        The sample; ``position`` is where the asked record sits (0 = start, 1 = end).

    """
    rng = random.Random(f"{seed}-{length}-{index}-{pairs}")
    keys = rng.sample([f"{a} {b}" for a in _ADJ for b in _NOUN], pairs)
    values = [rng.randrange(10000, 100000) for _ in keys]
    target = rng.randrange(pairs)
    needles = [f"The pass key of the {k} is {v}. Remember it. " for k, v in zip(keys, values, strict=True)]
    question = f"\nWhat is the pass key of the {keys[target]}? The pass key of the {keys[target]} is"
    fixed = len(tokenizer("".join(needles) + question).input_ids)
    if fixed > length:
        raise ValueError(f"long-context length {length} is too short for {pairs} records and the question "
                         f"({fixed} tokens)")
    per_filler = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    n_fill = max(0, (length - fixed) // per_filler)
    while True:
        chunks = [FILLER] * n_fill
        slots = sorted(rng.randrange(n_fill + 1) for _ in needles)
        for offset, (slot, needle) in enumerate(zip(slots, needles, strict=True)):
            chunks.insert(slot + offset, needle)
        prompt = "".join(chunks) + question
        size = len(tokenizer(prompt).input_ids)
        if size <= length or n_fill == 0:
            position = slots[target] / max(1, n_fill)
            return RetrievalSample(prompt, str(values[target]), size, position)
        n_fill -= max(1, (size - length) // per_filler)


def score(generated: str, answer: str) -> bool:
    """Exact match of the first number in the generated text."""
    match = _NUMBER.search(generated)
    return bool(match and match.group(0) == answer)


def model_max_length(model: nn.Module) -> int | None:
    """The longest context the model's config allows, if it says."""
    config: Any = getattr(model, "config", None)
    return None if config is None else context_length(config)


def too_long(model: nn.Module, lengths: list[int]) -> list[int]:
    """The prompt lengths that, with the answer tokens, do not fit the model's context."""
    limit = model_max_length(model)
    return [] if limit is None else [n for n in lengths if n + ANSWER_TOKENS > limit]


def retrieval_accuracy(
    model: nn.Module, tokenizer: Any, length: int, samples: int, seed: int = 0, pairs: int = 4
) -> tuple[float, list[str]]:
    """Accuracy over ``samples`` prompts of ``length`` tokens, and the generated answers.

    Raises:
        ValueError: ``length`` exceeds the model's context.

    """
    if too_long(model, [length]):
        limit = model_max_length(model)
        raise ValueError(f"long-context length {length} exceeds the model's context of {limit} tokens")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen: Any = model
    correct, answers = 0, []
    for i in range(samples):
        fit_threads()
        s = make_sample(tokenizer, length, seed, i, pairs)
        ids = tokenizer(s.prompt, return_tensors="pt").input_ids.to(device)
        with torch.inference_mode():
            out = gen.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_TOKENS,
                               do_sample=False, pad_token_id=pad)
        text = str(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        answers.append(text)
        correct += score(text, s.answer)
    return correct / samples, answers
