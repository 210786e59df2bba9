"""Perplexity corpora: texts, GPTQ windowing, c4local random windows, errors and caching."""

from __future__ import annotations

import logging

import pytest
import torch
from data_testutil import byte_tokenizer, documents_haystack, id_string

from ptqlab.data import corpora
from ptqlab.data.corpora import (
    C4_EVAL_DOCS,
    CORPORA,
    EvalWindows,
    c4_documents,
    eval_windows,
    load_text,
    resolve_corpus,
    wikitext2_rows,
)
from ptqlab.errors import ConfigError, DataError


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)


def test_names_and_alias():
    assert {"wikitext2", "wikitext2_new", "ptb", "ptb_new", "c4local", "c4local_new"} <= set(CORPORA)
    assert resolve_corpus("wikitext2_new") is resolve_corpus("wikitext2")
    assert load_text("wikitext2_new") == load_text("wikitext2")


def test_unknown_corpus_lists_valid_names(repo_tokenizer):
    with pytest.raises(DataError, match="unknown corpus 'wikitext3'.*ptb_new"):
        eval_windows("wikitext3", repo_tokenizer, 128)
    with pytest.raises(DataError, match="c4"):
        load_text("c4")


def test_wikitext2_joined_text_is_rows_joined():
    rows = wikitext2_rows()
    assert len(rows) == 4358
    assert load_text("wikitext2") == "\n\n".join(rows)


def test_ptb_variants_join_stripped_lines():
    valid = (corpora.ASSETS_DIR / corpora.PTB_VALID).read_text(encoding="utf-8").splitlines()
    test = (corpora.ASSETS_DIR / corpora.PTB_TEST).read_text(encoding="utf-8").splitlines()
    assert load_text("ptb") == "\n\n".join(line.strip() for line in valid)
    assert load_text("ptb_new") == " ".join(line.strip() for line in test)
    assert not load_text("ptb").startswith(" ") and "  " not in load_text("ptb_new")


def test_c4local_new_text_is_first_1100_documents():
    docs = c4_documents()
    assert len(docs) == 2000
    assert load_text("c4local_new") == " ".join(docs[:1100])
    with pytest.raises(DataError, match="eval_windows"):
        load_text("c4local")


@pytest.mark.parametrize("name", ["wikitext2", "ptb", "ptb_new"])
def test_joined_windows_are_consecutive_floor_n_over_seqlen(repo_tokenizer, name):
    seqlen = 512
    ids = _ids(repo_tokenizer, load_text(name))
    result = eval_windows(name, repo_tokenizer, seqlen)
    assert isinstance(result, EvalWindows)
    assert result.total_tokens == ids.numel()
    assert result.input_ids.shape == (ids.numel() // seqlen, seqlen)
    assert result.input_ids.dtype == torch.int64
    assert torch.equal(result.input_ids.flatten(), ids[: result.windows * seqlen])
    assert result.name == name and result.protocol and result.note == ""


def test_max_windows_keeps_the_first_windows(repo_tokenizer):
    full = eval_windows("ptb_new", repo_tokenizer, 256)
    some = eval_windows("ptb_new", repo_tokenizer, 256, max_windows=7)
    assert some.input_ids.shape == (7, 256)
    assert torch.equal(some.input_ids, full.input_ids[:7])
    more = eval_windows("ptb_new", repo_tokenizer, 256, max_windows=10**6)
    assert more.windows == full.windows and "only" in more.note


def test_windows_do_not_alias_the_cache(repo_tokenizer):
    first = eval_windows("ptb", repo_tokenizer, 128, max_windows=2)
    first.input_ids.zero_()
    assert eval_windows("ptb", repo_tokenizer, 128, max_windows=2).input_ids.any()


def test_c4local_new_truncates_to_256_windows_and_records_shortfall(repo_tokenizer):
    small = eval_windows("c4local_new", repo_tokenizer, 64)
    n = small.total_tokens  # the whole joined text (the count itself is checked for the other corpora)
    assert small.windows == 256 and n > 256 * 64 and small.note == ""
    seqlen = n // 200  # 256 * seqlen > n: use what there is
    short = eval_windows("c4local_new", repo_tokenizer, seqlen)
    assert short.windows == n // seqlen < 256
    assert str(n) in short.note and "short of" in short.note


def test_c4local_random_windows_are_seeded_and_from_eval_documents(repo_tokenizer):
    seqlen = 128
    a = eval_windows("c4local", repo_tokenizer, seqlen)
    b = eval_windows("c4local", repo_tokenizer, seqlen, seed=0)
    c = eval_windows("c4local", repo_tokenizer, seqlen, seed=1)
    assert a.input_ids.shape == (256, seqlen)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    prefix = eval_windows("c4local", repo_tokenizer, seqlen, max_windows=5)
    assert torch.equal(prefix.input_ids, a.input_ids[:5])
    haystack = documents_haystack(repo_tokenizer, list(c4_documents()[: C4_EVAL_DOCS.stop]))
    assert all(id_string(w.tolist()) in haystack for w in a.input_ids)


def test_too_short_text_and_bad_sizes_raise(repo_tokenizer):
    with pytest.raises(DataError, match="fewer than one window"):
        eval_windows("ptb_new", repo_tokenizer, 10**7)
    with pytest.raises(DataError, match="none of the 1100"):
        eval_windows("c4local", repo_tokenizer, 10**7)
    with pytest.raises(ConfigError, match="seqlen"):
        eval_windows("ptb", repo_tokenizer, 1)
    with pytest.raises(ConfigError, match="max_windows"):
        eval_windows("ptb", repo_tokenizer, 128, max_windows=0)


def test_cache_reuses_tokenization_and_tells_tokenizers_apart():
    corpora.clear_cache()
    with_bos, without_bos = byte_tokenizer(bos=True), byte_tokenizer(bos=False)
    first = eval_windows("ptb", with_bos, 64, max_windows=3)
    hits = corpora._joined_ids.cache_info().hits
    again = eval_windows("ptb", with_bos, 64, max_windows=3)
    assert corpora._joined_ids.cache_info().hits == hits + 1
    assert torch.equal(first.input_ids, again.input_ids)
    other = eval_windows("ptb", without_bos, 64, max_windows=3)
    assert first.input_ids[0, 0] == 0 and other.input_ids[0, 0] != 0  # BOS only where the tokenizer adds it
    assert torch.equal(first.input_ids.flatten()[1:64], other.input_ids.flatten()[:63])


def test_gpt2_wikitext2_canonical_token_count(gpt2_tokenizer):
    result = eval_windows("wikitext2", gpt2_tokenizer, 2048)
    assert result.total_tokens == 287_644
    assert result.windows == 287_644 // 2048


def test_gpt2_c4local_protocols(gpt2_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="ptqlab.data.corpora"):
        result = eval_windows("c4local", gpt2_tokenizer, 2048, max_windows=4)
    assert result.input_ids.shape == (4, 2048)
    assert "only 33 of documents 0-1099" in result.note and "only 33" in caplog.text
    new = eval_windows("c4local_new", gpt2_tokenizer, 2048)
    assert new.total_tokens == 521_502 and new.windows == 254 and "short of" in new.note
