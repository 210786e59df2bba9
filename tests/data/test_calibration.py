"""Calibration windows: c4local documents 1100-1999 under the GPTQ protocol, text files, errors, hashes."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch
from data_testutil import documents_haystack, id_string

from ptqlab.data.calibration import calibration_fingerprint, calibration_windows
from ptqlab.data.corpora import C4_CALIBRATION_DOCS, c4_documents
from ptqlab.errors import ConfigError, DataError

TEXT = "Once upon a time there was a little robot who liked to count the stars in the sky. " * 40


def test_c4local_is_seeded(repo_tokenizer):
    a = calibration_windows(repo_tokenizer, "c4local", samples=16, seqlen=128, seed=0)
    b = calibration_windows(repo_tokenizer, samples=16, seqlen=128)
    c = calibration_windows(repo_tokenizer, "c4local", samples=16, seqlen=128, seed=1)
    assert a.shape == (16, 128) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_c4local_draws_only_from_documents_1100_to_1999(repo_tokenizer):
    windows = calibration_windows(repo_tokenizer, "c4local", samples=32, seqlen=256, seed=3)
    docs = c4_documents()
    haystack = documents_haystack(repo_tokenizer, list(docs[C4_CALIBRATION_DOCS.start : C4_CALIBRATION_DOCS.stop]))
    assert all(id_string(w.tolist()) in haystack for w in windows)


def test_c4local_warns_when_few_documents_are_long_enough(repo_tokenizer, caplog):
    docs = c4_documents()[C4_CALIBRATION_DOCS.start : C4_CALIBRATION_DOCS.stop]
    lengths = sorted((len(repo_tokenizer(d)["input_ids"]) for d in docs), reverse=True)
    seqlen = lengths[10] - 1  # the 10 longest documents (ties aside) have more than seqlen tokens
    long_docs = sum(n > seqlen for n in lengths)
    with caplog.at_level(logging.WARNING, logger="ptqlab.data.calibration"):
        windows = calibration_windows(repo_tokenizer, "c4local", samples=long_docs + 5, seqlen=seqlen)
    assert windows.shape == (long_docs + 5, seqlen)
    assert f"only {long_docs} of documents 1100-1999" in caplog.text and "reuse" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ptqlab.data.calibration"):
        calibration_windows(repo_tokenizer, "c4local", samples=long_docs, seqlen=seqlen)
    assert "reuse" not in caplog.text
    with pytest.raises(DataError, match="none of the 900"):
        calibration_windows(repo_tokenizer, "c4local", samples=1, seqlen=lengths[0])


def test_file_windows_come_from_the_file_and_are_seeded(repo_tokenizer, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT, encoding="utf-8")
    a = calibration_windows(repo_tokenizer, "file", samples=8, seqlen=32, seed=0, path=path)
    b = calibration_windows(repo_tokenizer, "file", samples=8, seqlen=32, seed=0, path=str(path))
    c = calibration_windows(repo_tokenizer, samples=8, seqlen=32, seed=5, path=path)
    assert a.shape == (8, 32) and torch.equal(a, b) and not torch.equal(a, c)
    haystack = id_string(repo_tokenizer(TEXT)["input_ids"])
    assert all(id_string(w.tolist()) in haystack for w in a)


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_file_raises(repo_tokenizer, tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.txt.*0 tokens"):
        calibration_windows(repo_tokenizer, "file", path=path)


def test_short_file_names_file_and_token_count(repo_tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("a tiny story", encoding="utf-8")
    n = len(repo_tokenizer("a tiny story")["input_ids"])
    with pytest.raises(DataError, match=rf"short\.txt has {n} tokens"):
        calibration_windows(repo_tokenizer, "file", seqlen=64, path=path)


def test_missing_or_binary_file_raises(repo_tokenizer, tmp_path):
    with pytest.raises(DataError, match="nowhere.txt"):
        calibration_windows(repo_tokenizer, "file", path=tmp_path / "nowhere.txt")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 100)
    with pytest.raises(DataError, match="not UTF-8"):
        calibration_windows(repo_tokenizer, "file", path=binary)


def test_unavailable_and_inconsistent_datasets(repo_tokenizer, tmp_path):
    with pytest.raises(DataError, match="wikitext2.*not available offline.*c4local"):
        calibration_windows(repo_tokenizer, "wikitext2")
    with pytest.raises(DataError, match="unknown calibration dataset 'pile'"):
        calibration_windows(repo_tokenizer, "pile")
    with pytest.raises(ConfigError, match="needs a path"):
        calibration_windows(repo_tokenizer, "file")
    with pytest.raises(ConfigError, match="dataset 'file'"):
        calibration_windows(repo_tokenizer, "ptb", path=tmp_path / "x.txt")
    with pytest.raises(ConfigError, match="samples"):
        calibration_windows(repo_tokenizer, samples=0)


def test_fingerprint_is_sha256_of_int64_bytes():
    ids = torch.arange(24, dtype=torch.int32).reshape(4, 6)
    expected = hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    assert calibration_fingerprint(ids) == expected
    assert calibration_fingerprint(ids.t().contiguous().t()) == expected  # layout does not matter
    changed = ids.clone()
    changed[3, 5] += 1
    assert calibration_fingerprint(changed) != expected
