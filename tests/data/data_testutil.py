"""Helpers of the data tests: a byte-level tokenizer built in memory, and window containment checks."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast


def byte_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per UTF-8 byte), with a Llama-like BOS when ``bos``."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, **{symbol: i + 1 for i, symbol in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def id_string(ids: list[int]) -> str:
    """Token ids as ",a,b,c," so that a window is contained iff its string is a substring."""
    return "," + ",".join(map(str, ids)) + ","


def documents_haystack(tokenizer: PreTrainedTokenizerBase, docs: list[str]) -> str:
    """Each document tokenized on its own, as id strings separated so no window can span two documents."""
    return "|".join(id_string(tokenizer(doc)["input_ids"]) for doc in docs)
