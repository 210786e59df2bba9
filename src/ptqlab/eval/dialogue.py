"""Multi-turn dialogue (qllm-eval's dialogue ability): greedy answers turn by turn with the chat template.

Conversations are read in MT-Bench's question format, one JSON object per line: ``{"question_id": ...,
"category": ..., "turns": ["first user message", "follow-up", ...]}``; ``dialogue.path`` names such a
file, and without one a small built-in set (:data:`BUILTIN`, written for ptqlab) is used. Each user turn
is appended to the conversation, the model's chat template renders it with the generation prompt, and the
(quantized) model answers greedily; the answer joins the conversation before the next turn. A tokenizer
without a chat template gets a plain ``User:`` / ``Assistant:`` transcript (logged).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)

BUILTIN: tuple[dict[str, Any], ...] = (
    {"question_id": "b1", "category": "writing",
     "turns": ["Write a two-sentence story about a cat who finds a key.", "Now give the story a title."]},
    {"question_id": "b2", "category": "reasoning",
     "turns": ["Tom has 3 apples and buys 4 more. How many apples does he have?",
               "He gives half of them to Ann. How many does Ann get?"]},
    {"question_id": "b3", "category": "knowledge",
     "turns": ["What is the boiling point of water at sea level in Celsius?", "And in Fahrenheit?"]},
    {"question_id": "b4", "category": "extraction",
     "turns": ["List the colours in this sentence: the red car passed a blue house near green trees.",
               "Which of them came first?"]},
    {"question_id": "b5", "category": "roleplay",
     "turns": ["Pretend you are a friendly librarian. Greet me.", "Recommend me one book about the sea."]},
)
"""The built-in conversations (MT-Bench question format)."""


@dataclass
class Conversation:
    """One conversation: its id, category, the user turns and the model's answers."""

    question_id: str
    category: str
    turns: list[str]
    answers: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The transcript as stored with the run."""
        return {"question_id": self.question_id, "category": self.category, "turns": self.turns,
                "answers": self.answers}


def load_conversations(path: str | None, limit: int | None) -> list[Conversation]:
    """The conversations of an MT-Bench-format jsonl file (or the built-in set), the first ``limit`` of them.

    Raises:
        DataError: The file is missing or a line is not a conversation (the line is named).

    """
    if path is None:
        rows: list[dict[str, Any]] = [dict(r) for r in BUILTIN]
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise DataError(f"evaluate.dialogue.path {file} does not exist")
        rows = []
        for n, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{file}:{n} is not JSON: {exc}") from exc
    out = []
    for n, row in enumerate(rows, start=1):
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise DataError(f"conversation {n} of {path or 'the built-in set'} has no list of user turns ('turns')")
        out.append(Conversation(str(row.get("question_id", n)), str(row.get("category", "")), list(turns)))
    return out[:limit] if limit is not None else out


def check_dialogue_source(path: str | None) -> None:
    """Refuse a missing conversations file before any work (ConfigError)."""
    if path is not None and not Path(path).expanduser().is_file():
        raise ConfigError(f"evaluate.dialogue.path {path} does not exist")


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    lines = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def run_dialogue(model: nn.Module, tokenizer: Any, conversations: list[Conversation],
                 max_new_tokens: int = 64) -> list[Conversation]:
    """Answer every turn of every conversation greedily with ``model`` (its runtime quantizers included).

    Args:
        model: The causal LM.
        tokenizer: Its tokenizer (its chat template renders the turns).
        conversations: From :func:`load_conversations`; their ``answers`` are filled in.
        max_new_tokens: The longest answer, in tokens.

    Returns:
        ``conversations``, answered.

    """
    if not getattr(tokenizer, "chat_template", None):
        log.info("the tokenizer has no chat template: dialogue turns are rendered as 'User: ... Assistant:'")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen: Any = model
    for conv in conversations:
        messages: list[dict[str, str]] = []
        conv.answers = []
        for turn in conv.turns:
            messages.append({"role": "user", "content": turn})
            ids = tokenizer(_render(tokenizer, messages), return_tensors="pt", add_special_tokens=False).input_ids
            ids = ids.to(device)
            with torch.inference_mode():
                out = gen.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=pad)
            answer = str(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)).strip()
            conv.answers.append(answer)
            messages.append({"role": "assistant", "content": answer})
    return conversations
