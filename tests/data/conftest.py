"""Tokenizers for the data tests: the one that ships in the repository (or a byte-level one), GPT-2 if present."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_testutil import byte_tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ptqlab.data.corpora import ASSETS_DIR

REPO_TOKENIZER = ASSETS_DIR.parent / "models" / "stories260k"
SHARED = Path(__file__).resolve().parents[2].parent / "shared"  # ../shared, beside the project root
GPT2_TOKENIZER = SHARED / "models" / "gpt2-tokenizer"


@pytest.fixture(scope="session")
def repo_tokenizer() -> PreTrainedTokenizerBase:
    """The stories260k tokenizer vendored in the package, or a byte-level one when it is not there yet."""
    if (REPO_TOKENIZER / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(REPO_TOKENIZER)
    return byte_tokenizer()


@pytest.fixture(scope="session")
def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """The GPT-2 tokenizer of the shared folder (skips where it is absent)."""
    if not (GPT2_TOKENIZER / "vocab.json").is_file():
        pytest.skip(f"GPT-2 tokenizer not available (needs {GPT2_TOKENIZER})")
    return AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
